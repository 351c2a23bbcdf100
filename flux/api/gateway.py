"""What the HTTP API sees of the gateway: a small Protocol, so the API never imports the
module that composes the gateway (and the composer can import the API)."""

from __future__ import annotations

from typing import Any, Protocol, cast

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from flux.bus import EventBus
from flux.config import Settings
from flux.errors import NotReady
from flux.events import Event
from flux.ingest.mqtt import MqttIngest
from flux.plugins import PluginManager
from flux.rules import RuleEngine
from flux.rules.sources import RuleSources


class GatewayView(Protocol):
    """The parts of a running gateway the routes use (``flux.app.Gateway`` is one)."""

    settings: Settings
    engine: AsyncEngine | None
    bus: EventBus
    mqtt: MqttIngest | None
    plugins: PluginManager | None
    rules: RuleEngine | None
    rule_sources: RuleSources | None

    @property
    def accepting(self) -> bool: ...

    def readiness(self) -> dict[str, bool]: ...

    def degraded(self) -> dict[str, str]: ...

    async def ingest(self, events: list[Event]) -> None: ...

    async def reload_rules(self) -> dict[str, Any]: ...


def gateway_of(request: Request) -> GatewayView:
    """The gateway the API of ``request`` serves."""
    return cast(GatewayView, request.app.state.gateway)


def engine_of(request: Request) -> AsyncEngine:
    """The database of the gateway ``request`` is for; ``NotReady`` while there is none."""
    engine = gateway_of(request).engine
    if engine is None:
        raise NotReady("the database is not open yet")
    return engine


__all__ = ["GatewayView", "engine_of", "gateway_of"]
