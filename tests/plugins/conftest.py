"""Fixtures for the plugin runtime tests: real wasmtime, real shipped plugins, temp caches."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flux.plugins import PluginManager

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "plugins"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private module cache per test."""
    return tmp_path / "cache"


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    """An empty plugin directory per test."""
    path = tmp_path / "plugins"
    path.mkdir()
    return path


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the shipped plugins that a test may modify."""
    target = tmp_path / "shipped"
    shutil.copytree(SHIPPED, target, ignore=shutil.ignore_patterns("*.md"))
    return target


@pytest.fixture
async def shipped(cache_dir: Path) -> AsyncIterator[PluginManager]:
    """A started manager over the repository's shipped plugins."""
    async with PluginManager(plugins_dir=SHIPPED, cache_dir=cache_dir) as manager:
        yield manager
