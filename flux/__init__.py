"""flux: an IoT edge gateway (MQTT/HTTP ingest, Lua rules, WebAssembly plugins, SQL)."""

from flux.config import Settings, load_settings
from flux.errors import FluxError
from flux.events import DeadLetter, Event

__version__ = "0.1.0"

__all__ = ["DeadLetter", "Event", "FluxError", "Settings", "__version__", "load_settings"]
