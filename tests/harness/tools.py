"""System tools a test needs, skipped (or, in CI, failed) with the package to install."""

from __future__ import annotations

import os
import shutil

import pytest

#: ``.ci/run`` sets this to 1: a test whose tool (promtool, Chromium) is missing then fails
#: instead of skipping, so CI cannot pass by not running it.
REQUIRE_TOOLS_ENV = "FLUX_REQUIRE_TOOLS"

def require_tool(name: str, *, install: str) -> str:
    """The path of the executable ``name``; without it skip the test, saying which Debian
    package ``install`` brings it, or fail when ``FLUX_REQUIRE_TOOLS=1``."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian: apt-get install {install})"
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_TOOLS_ENV}=1 requires it")
    pytest.skip(message)

def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None
