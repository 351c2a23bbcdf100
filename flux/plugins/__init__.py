"""WebAssembly plugins: a documented ABI (``plugins/README.md``), pools of warm instances,
automatic recycling and hard limits on every call. ``PluginManager`` is the entry point."""

from flux.plugins.errors import (
    PluginError,
    PluginHopLimit,
    PluginLimitExceeded,
    PluginLoadError,
    PluginNotFound,
    PluginOutputError,
    PluginRejected,
    PluginTimeout,
    PluginTrap,
    PoolExhausted,
)
from flux.plugins.manager import BatchOutcome, CallOutcome, PluginManager, ReloadReport
from flux.plugins.manifest import ABI_VERSION, PluginManifest, load_manifest
from flux.plugins.pool import PoolStats

__all__ = [
    "ABI_VERSION",
    "BatchOutcome",
    "CallOutcome",
    "PluginError",
    "PluginHopLimit",
    "PluginLimitExceeded",
    "PluginLoadError",
    "PluginManager",
    "PluginManifest",
    "PluginNotFound",
    "PluginOutputError",
    "PluginRejected",
    "PluginTimeout",
    "PluginTrap",
    "PoolExhausted",
    "PoolStats",
    "ReloadReport",
    "load_manifest",
]
