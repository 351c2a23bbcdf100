"""Named errors for the WebAssembly plugin runtime; every one carries the plugin's name.

A call that fails with ``PluginTrap``, ``PluginTimeout``, ``PluginLimitExceeded`` or
``PluginOutputError`` has already had its instance recycled; the caller decides whether to
dead-letter the event. ``PluginRejected`` means the plugin looked at the input and refused it
(e.g. a malformed frame): the instance is healthy and the event belongs in the dead letters.
"""

from __future__ import annotations

from flux.errors import FluxError


class PluginError(FluxError):
    """Root of every plugin failure (HTTP 502: the plugin, not the request, failed)."""

    status_code = 502
    #: Label value of ``flux_plugin_executions_total{result}`` for calls that fail this way.
    result = "error"

    def __init__(self, message: str, *, plugin: str, **fields: object) -> None:
        super().__init__(message, plugin=plugin, **fields)
        self.plugin = plugin

    def __str__(self) -> str:
        return f"plugin {self.plugin!r}: {self.message}"


class PluginNotFound(PluginError):
    """No plugin with this name is loaded."""

    status_code = 404


class PluginLoadError(PluginError):
    """The plugin cannot be loaded: bad manifest, bad module, missing export, wrong signature,
    an import the host does not provide (WASI without ``wasi = true``)."""

    status_code = 422

    def __init__(self, message: str, *, plugin: str, key: str = "") -> None:
        super().__init__(message, plugin=plugin, key=key)
        self.key = key

    def __str__(self) -> str:
        where = f" ({self.key})" if self.key else ""
        return f"plugin {self.plugin!r}{where}: {self.message}"


class PluginTrap(PluginError):
    """The module trapped (``unreachable``, out-of-bounds access...); the instance is dropped."""

    result = "trap"

    def __init__(self, message: str, *, plugin: str, trap: str = "") -> None:
        super().__init__(message, plugin=plugin, trap=trap)
        self.trap = trap


class PluginTimeout(PluginError):
    """The call ran out of fuel or passed its epoch deadline; the instance is discarded."""

    result = "timeout"


class PluginLimitExceeded(PluginError):
    """The module hit a hard limit (``memory`` or ``stack``); the instance is discarded."""

    result = "limit"

    def __init__(self, message: str, *, plugin: str, limit: str) -> None:
        super().__init__(message, plugin=plugin, limit=limit)
        self.limit = limit


class PluginOutputError(PluginError):
    """The module returned something the ABI does not allow: a pointer outside its memory,
    output that is not the documented JSON, too many or too large outputs."""

    result = "output_error"


class PluginRejected(PluginError):
    """The plugin refused the input by returning ``{"error": ...}``; the instance stays warm."""

    status_code = 422
    result = "rejected"


class PoolExhausted(PluginError):
    """No instance became free within the acquire timeout; retry later or dead-letter."""

    status_code = 503
    result = "exhausted"


class PluginHopLimit(PluginError):
    """The event has already passed through too many plugins or rules (a likely loop)."""

    status_code = 422
    result = "hop_limit"


class PoolClosed(PluginError):
    """The pool was replaced by a reload or shut down; the manager retries on the new one."""


__all__ = [
    "PluginError",
    "PluginHopLimit",
    "PluginLimitExceeded",
    "PluginLoadError",
    "PluginNotFound",
    "PluginOutputError",
    "PluginRejected",
    "PluginTimeout",
    "PluginTrap",
    "PoolClosed",
    "PoolExhausted",
]
