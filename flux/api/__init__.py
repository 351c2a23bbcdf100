"""The HTTP API (FastAPI): ingest, queries, health, readiness and metrics."""

from flux.api.app import create_api

__all__ = ["create_api"]
