"""One exception tree for the gateway; the API maps these to JSON errors in one place.

Every error flux raises on purpose is a ``FluxError`` carrying a message, structured
fields (``rule_id``, ``plugin``, ``line``...) and the HTTP status it answers with. The
rules' and the plugins' own errors live beside their code::

    FluxError
    ├── ConfigError                    an invalid file or FLUX_* override (exit code 2)
    │   └── PortUnavailable            a configured port is taken (exit code 2)
    ├── InvalidEvent                   a message that cannot become an event (422)
    ├── StoreUnavailable               the database is away or refused a write (503)
    ├── BusClosed                      the event bus is stopping or stopped (503)
    ├── NotReady                       starting, stopping, not able yet (503)
    ├── NotFound                       no such resource (404)
    ├── Conflict                       clashes with the current state (409)
    ├── Unauthorized                   a configured bearer token missing (401)
    ├── MqttConnectError               the broker refused the connection (bad password, TLS)
    │   └── MqttUnreachable            nothing answers at the broker's address (yet)
    ├── BrokerStartError               the embedded broker could not start
    ├── SinkSendError                  a sink's receiver did not take a batch (retried)
    ├── flux.rules.errors.RuleError
    │   ├── RuleValidationError        a rule file or body is invalid (422)
    │   ├── RuleCompileError           Lua that does not compile (with its line)
    │   ├── RuleRuntimeError           Lua that failed on an event
    │   ├── RuleTimeout                the instruction budget or time limit ran out
    │   └── RuleMemoryError            the Lua runtime's memory cap was reached
    └── flux.plugins.errors.PluginError
        ├── PluginNotFound             no such plugin (404)
        ├── PluginLoadError            a manifest or module that does not load
        ├── PluginTrap                 the wasm trapped
        ├── PluginTimeout              out of fuel or past its epoch deadline
        ├── PluginLimitExceeded        memory or stack limit
        ├── PluginOutputError          an output that breaks the ABI
        ├── PluginRejected             the plugin refused the input (not a fault)
        ├── PoolExhausted              no instance free in time
        ├── PluginHopLimit             an event that passed too many hops
        └── PoolClosed                 a pool replaced by a reload (retried)
"""

from __future__ import annotations


class FluxError(Exception):
    """Root of every error flux raises on purpose."""

    status_code: int = 500

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready description: the error kind, the message and structured fields."""
        return {"error": type(self).__name__, "message": self.message, **self.fields}


class ConfigError(FluxError):
    """The configuration file or an environment override is invalid."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message, key=key)
        self.key = key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class PortUnavailable(ConfigError):
    """A port the configuration names is already in use (or may not be bound)."""


class InvalidEvent(FluxError):
    """A message cannot become an event (bad JSON, wrong shape, too large)."""

    status_code = 422

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


class StoreUnavailable(FluxError):
    """The database cannot be reached or refused a write; the caller retries later."""

    status_code = 503


class BusClosed(FluxError):
    """The bus is stopping or stopped and takes no more events."""

    status_code = 503


class NotReady(FluxError):
    """The gateway cannot take this request yet (starting, stopping, or degraded)."""

    status_code = 503


class NotFound(FluxError):
    """The requested resource does not exist."""

    status_code = 404


class Conflict(FluxError):
    """The request conflicts with the current state (an id that exists, a file rule)."""

    status_code = 409


class MqttConnectError(FluxError):
    """The broker refused the connection: it will not fix itself (credentials, TLS)."""


class MqttUnreachable(MqttConnectError):
    """Nothing answers at the broker's address, or there is no route to it: retried."""


class BrokerStartError(FluxError):
    """The embedded broker could not be started."""


class SinkSendError(FluxError):
    """A send that did not happen: nothing of the batch reached the receiver; retried."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


class Unauthorized(FluxError):
    """A bearer token is configured and the request did not present it."""

    status_code = 401


__all__ = [
    "BrokerStartError",
    "BusClosed",
    "ConfigError",
    "Conflict",
    "FluxError",
    "InvalidEvent",
    "MqttConnectError",
    "MqttUnreachable",
    "NotFound",
    "NotReady",
    "PortUnavailable",
    "SinkSendError",
    "StoreUnavailable",
    "Unauthorized",
]
