"""Bearer-token check for ``/api/v1`` when ``server.api_token`` is set."""

from __future__ import annotations

import hmac

from fastapi import Request

from flux.api.gateway import gateway_of
from flux.errors import Unauthorized


def token_accepted(token: str, authorization: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` ("" = no token required);
    compared in constant time."""
    if not token:
        return True
    scheme, _, presented = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


async def require_token(request: Request) -> None:
    """Reject the request unless it carries the configured token (constant-time compare).

    Async on purpose: FastAPI runs a plain function dependency on a worker thread, a thread
    hop per request that cost more than the rest of an ingest request.
    """
    token: str = gateway_of(request).settings.server.api_token
    if not token_accepted(token, request.headers.get("authorization", "")):
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")


__all__ = ["require_token", "token_accepted"]
