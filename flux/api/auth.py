"""Bearer-token check for ``/api/v1`` when ``server.api_token`` is set."""

from __future__ import annotations

import hmac

from fastapi import Request

from flux.errors import Unauthorized


async def require_token(request: Request) -> None:
    """Reject the request unless it carries the configured token (constant-time compare).

    Async on purpose: FastAPI runs a plain function dependency on a worker thread, a thread
    hop per request that cost more than the rest of an ingest request.
    """
    token: str = request.app.state.gateway.settings.server.api_token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), token.encode()
    ):
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")


__all__ = ["require_token"]
