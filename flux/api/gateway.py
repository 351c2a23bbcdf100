"""What the HTTP API sees of the gateway: a small Protocol, so the API never imports the
module that composes the gateway (and the composer can import the API)."""

from __future__ import annotations

from typing import Annotated, Any, Protocol, cast

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from flux.bus import EventBus
from flux.config import Settings
from flux.ingest.mqtt import MqttIngest
from flux.plugins import PluginManager
from flux.rules import RuleEngine
from flux.rules.sources import RuleSources
from flux.sampler import MetricsSampler
from flux.sinks import Sinks


class GatewayView(Protocol):
    """The parts of a running gateway the routes use (``flux.app.Gateway`` is one)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def engine(self) -> AsyncEngine: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def mqtt(self) -> MqttIngest: ...

    @property
    def plugins(self) -> PluginManager: ...

    @property
    def rules(self) -> RuleEngine: ...

    @property
    def rule_sources(self) -> RuleSources: ...

    @property
    def sinks(self) -> Sinks: ...

    @property
    def sampler(self) -> MetricsSampler: ...

    @property
    def pipeline_batch(self) -> int: ...

    @property
    def accepting(self) -> bool: ...

    def readiness(self) -> dict[str, bool]: ...

    def degraded(self) -> dict[str, str]: ...

    async def reload_rules(self) -> dict[str, Any]: ...


def gateway_of(request: Request) -> GatewayView:
    """The gateway the API of ``request`` serves (``create_api`` puts it in the app state)."""
    return cast(GatewayView, request.app.state.gateway)


# Typed dependencies for the routes. Async on purpose: FastAPI runs a plain function
# dependency on a worker thread, a thread hop per request.


async def _gateway(request: Request) -> GatewayView:
    return gateway_of(request)


async def _engine(request: Request) -> AsyncEngine:
    return gateway_of(request).engine


async def _rules(request: Request) -> RuleEngine:
    return gateway_of(request).rules


async def _rule_sources(request: Request) -> RuleSources:
    return gateway_of(request).rule_sources


async def _plugins(request: Request) -> PluginManager:
    return gateway_of(request).plugins


async def _sinks(request: Request) -> Sinks:
    return gateway_of(request).sinks


Gateway = Annotated[GatewayView, Depends(_gateway)]
Database = Annotated[AsyncEngine, Depends(_engine)]
Rules = Annotated[RuleEngine, Depends(_rules)]
Sources = Annotated[RuleSources, Depends(_rule_sources)]
Plugins = Annotated[PluginManager, Depends(_plugins)]
SinksOf = Annotated[Sinks, Depends(_sinks)]


__all__ = [
    "Database",
    "Gateway",
    "GatewayView",
    "Plugins",
    "Rules",
    "SinksOf",
    "Sources",
    "gateway_of",
]
