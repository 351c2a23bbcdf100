"""``POST /api/v1/event`` on a short path: the one route devices call per reading.

FastAPI spends most of a single-event request's CPU on routing, dependency solving and
model validation. This ASGI layer answers a
well-formed request itself with the same token check, the same event path (``to_event``,
``store``) and the same JSON answers. Anything else (a bad token, another content type, a
body that is not exactly ``{"topic": str, "payload": object}``) is handed to FastAPI with
its body replayed, so those answers are FastAPI's own; errors after that (an event the
decoder refuses, not ready, not committed in time) are answered as FastAPI's ``FluxError``
handler would. The route's OpenAPI description stays with FastAPI.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux.api.auth import token_accepted
from flux.api.gateway import GatewayView
from flux.api.ingest import store, to_event
from flux.errors import FluxError
from flux.metrics import HTTP_REQUEST_DURATION

PATH = "/api/v1/event"
#: A body larger than this is left to FastAPI (the short path is for readings).
MAX_BODY = 64 * 1024
_HEADERS = [(b"content-type", b"application/json")]


class FastIngest:
    """ASGI middleware answering well-formed ``POST /api/v1/event`` requests itself."""

    def __init__(self, app: ASGIApp, gateway: GatewayView) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body, whole = await _read_body(receive)
        item = self._acceptable(scope, body) if whole else None
        if item is None:
            await self.app(scope, _replay(body, whole, receive), send)
            return
        status, answer = await self._ingest(*item)
        headers = [*_HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        HTTP_REQUEST_DURATION.labels("POST", PATH, str(status)).observe(
            time.perf_counter() - started
        )

    def _acceptable(self, scope: Scope, body: bytes) -> tuple[str, dict[str, Any]] | None:
        """The topic and payload of a request the short path may answer, else None."""
        if not self._authorized(scope):
            return None
        if not _header(scope, b"content-type").startswith(b"application/json"):
            return None
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, dict) or value.keys() != {"topic", "payload"}:
            return None
        topic, payload = value["topic"], value["payload"]
        if not isinstance(topic, str) or not 1 <= len(topic) <= 1024:
            return None
        if not isinstance(payload, dict):
            return None
        return topic, payload

    def _authorized(self, scope: Scope) -> bool:
        # Latin-1, as Starlette decodes headers for FastAPI's ``require_token``.
        authorization = _header(scope, b"authorization").decode("latin-1")
        return token_accepted(self.gateway.settings.server.api_token, authorization)

    async def _ingest(self, topic: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        max_bytes = self.gateway.settings.mqtt.max_payload_bytes
        try:
            event = to_event(topic, payload, max_bytes=max_bytes)
            await store(self.gateway, [event])
        except FluxError as exc:  # refused, not ready, not committed: as FastAPI's handler
            return exc.status_code, orjson.dumps(exc.to_dict())
        return 201, orjson.dumps(
            {"id": event.id, "topic": event.topic, "device_id": event.device_id}
        )


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """Read the request body, stopping past ``MAX_BODY``; return it and whether it is whole."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more and size <= MAX_BODY:
        message = await receive()
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks), not more


def _replay(body: bytes, whole: bool, receive: Receive) -> Receive:
    """A ``receive`` that first returns what was read, then the rest of the stream."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not whole}
        return await receive()

    return replayed


__all__ = ["FastIngest"]
