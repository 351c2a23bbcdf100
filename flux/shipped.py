"""What ships beside the code: the commented ``config.toml``, the rules and the plugins.

The wheel carries them as package data (``flux/_shipped``); a source checkout has them at its
root. ``flux init`` copies them into a directory, so an installed gateway has what ``flux
run`` needs outside the checkout.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from flux.config import Settings
from flux.errors import FluxError

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
#: What ``flux init`` writes, in the wheel under ``flux/_shipped``.
SHIPPED = ("config.toml", "rules", "plugins")


def packaged(package_name: str, checkout_name: str) -> Path:
    """A data file or folder: the copy installed inside the package, else the checkout's."""
    installed = _PACKAGE / package_name
    return installed if installed.exists() else _CHECKOUT / checkout_name


def shipped_files() -> dict[Path, Path]:
    """Every shipped file: its path relative to a target directory -> where it is now."""
    files: dict[Path, Path] = {}
    for name in SHIPPED:
        source = packaged(f"_shipped/{name}", name)
        if source.is_file():
            files[Path(name)] = source
            continue
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            hidden = any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
            if path.is_file() and not hidden:
                files[Path(name) / relative] = path
    return files


def init(target: Path, *, force: bool = False) -> list[Path]:
    """Copy the shipped configuration, rules and plugins into ``target``; return what was
    written. Raise ``FluxError`` naming the files already there, unless ``force``."""
    files = shipped_files()
    existing = [target / relative for relative in files if (target / relative).exists()]
    if existing and not force:
        shown = ", ".join(str(path) for path in existing[:5])
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise FluxError(f"{shown}{more} already exist; nothing written (--force overwrites)")
    written = []
    for relative, source in files.items():
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        written.append(destination)
    return written


def warn_missing_dirs(settings: Settings) -> None:
    """Warn, naming the setting, about a rules or plugins folder that does not exist."""
    for key, folder in (("rules.dir", settings.rules.dir), ("plugins.dir", settings.plugins.dir)):
        path = Path(folder)
        if not path.is_dir():
            log.warning(
                "%s: %s is not a directory, so no %s are loaded from files (`flux init` "
                "writes the shipped ones, and a config.toml, into a directory)",
                key,
                path.resolve(),
                key.partition(".")[0],
            )


__all__ = ["SHIPPED", "init", "packaged", "shipped_files", "warn_missing_dirs"]
