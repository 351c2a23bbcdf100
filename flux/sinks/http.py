"""HTTP sinks: rows POSTed as one JSON array per request, in order, one request at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Self

from flux import __version__
from flux.config import HttpSinkConfig
from flux.errors import SinkSendError
from flux.sinks.rows import OutboxRow
from flux.sinks.sender import Confirm

if TYPE_CHECKING:
    import httpx

#: How much of a refusal's body goes into the error text.
_ERROR_BODY_CHARS = 300


class HttpTransport:
    """POST an ``OrderedSink``'s rows to ``url``: a JSON array of the rows' envelopes
    (``{"id", "topic", "device_id", "received_at", "payload"}``), ``batch_size`` per request.

    Only a 2xx confirms a request's rows; anything else, a timeout or a refused connection
    is a ``SinkSendError`` and the same rows go again, in order, after the sink's backoff.
    """

    def __init__(self, config: HttpSinkConfig) -> None:
        self._config = config
        self._client: httpx.AsyncClient | None = None
        self.connected = False
        self.last_error = ""

    @property
    def window(self) -> int:
        return self._config.batch_size

    def on_change(self, callback: Callable[[], None]) -> None:
        """Nothing to report: a request either works or raises."""

    async def __aenter__(self) -> Self:
        import httpx  # here, not at import: memory a gateway without HTTP sinks never needs

        headers = {
            "user-agent": f"flux/{__version__}",
            "content-type": "application/json",
            **self._config.headers,
        }
        self._client = httpx.AsyncClient(headers=headers, follow_redirects=False)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, rows: list[OutboxRow], confirm: Confirm) -> None:
        import httpx

        assert self._client is not None, "the transport is not running"
        body = b"[" + b",".join(row.payload for row in rows) + b"]"
        timeout = self._config.timeout_s
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.post(self._config.url, content=body, timeout=timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise self._failed(f"no response within {timeout:g}s", "timeout") from None
        except httpx.HTTPError as exc:
            raise self._failed(f"{type(exc).__name__}: {exc}".rstrip(": "), "connect") from None
        if not response.is_success:
            text = response.text[:_ERROR_BODY_CHARS].strip()
            error = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
            raise self._failed(
                f"{error}: {text}" if text else error, f"http_{response.status_code}"
            )
        self.connected, self.last_error = True, ""
        confirm(rows)

    def _failed(self, message: str, reason: str) -> SinkSendError:
        self.connected, self.last_error = False, message
        return SinkSendError(message, reason=reason)


__all__ = ["HttpTransport"]
