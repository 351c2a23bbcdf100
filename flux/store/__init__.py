"""Persistence: schema, engine, migrations, the batched writer and read queries."""

from flux.store.database import create_engine
from flux.store.writer import StoreWriter

__all__ = ["StoreWriter", "create_engine"]
