"""One exception tree for the gateway; the API maps these to JSON errors in one place."""

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


class InvalidEvent(FluxError):
    """A message cannot become an event (bad JSON, wrong shape, too large)."""

    status_code = 422

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


class StoreUnavailable(FluxError):
    """The database cannot be reached or refused a write; the caller retries later."""

    status_code = 503


class NotReady(FluxError):
    """The gateway cannot take this request yet (starting, stopping, or degraded)."""

    status_code = 503


class NotFound(FluxError):
    """The requested resource does not exist."""

    status_code = 404


class MqttConnectError(FluxError):
    """The broker refused or did not answer a connection."""


class Unauthorized(FluxError):
    """A bearer token is configured and the request did not present it."""

    status_code = 401


__all__ = [
    "ConfigError",
    "FluxError",
    "InvalidEvent",
    "MqttConnectError",
    "NotFound",
    "NotReady",
    "StoreUnavailable",
    "Unauthorized",
]
