"""Wire the stages together and own start-up and staged shutdown.

Start: migrate, open the database, subscribe the store, load plugins and rules and
subscribe the pipeline that runs them (with the webhook outbox), start the bus, make sure
a broker answers (starting the embedded one if allowed), connect MQTT, serve HTTP.
Stop, each stage with its own timeout: stop intake (MQTT and HTTP), drain the bus so every
queued event is committed and acknowledged, let the last PUBACKs go out, then close the
MQTT connection, the bus, the store and the HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Self

import uvicorn
from prometheus_client import start_http_server
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.api import create_api
from flux.bus import EventBus
from flux.config import Settings
from flux.events import DeadLetter, Event, PublishMessage
from flux.ingest._gmqtt import MQTTv50, MQTTv311
from flux.ingest.broker import EmbeddedBroker, broker_answers
from flux.ingest.mqtt import MqttIngest
from flux.ingest.publisher import MqttPublisher
from flux.metrics import DEGRADED
from flux.pipeline import (
    PIPELINE_SUBSCRIBER,
    STORE_SUBSCRIBER,
    JointAck,
    Pipeline,
    retry_through_outages,
)
from flux.plugins import PluginManager
from flux.rules import ActionExecutor, RuleEngine
from flux.rules.sources import RuleSources
from flux.store.database import create_engine
from flux.store.migrate import upgrade_async
from flux.store.writer import StoreWriter
from flux.webhooks import WebhookOutbox

log = logging.getLogger(__name__)

#: How long a partial pipeline batch waits to fill: one Lua call per batch amortizes the
#: crossing and the hook set-up (README, Benchmarks: 10 rules, cpu 8.5 s -> 6.8-7.6 s).
PIPELINE_WAIT_S = 0.005
#: Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = 50_000
#: How long a thread may keep the GIL while another waits (CPython's default is 5 ms): the
#: store's SQLite thread and the plugin threads hand it back after every call into C, and
#: each time had to wait up to this long for the busy event loop to let go.
SWITCH_INTERVAL_S = 0.0005


#: Degraded reasons that make the gateway not ready (/ready answers 503).
NOT_READY = frozenset({"not_accepting", "database_unavailable", "mqtt_disconnected"})


class Gateway:
    """The running gateway: ``async with Gateway(settings=...) as gw: await gw.wait_stopped()``."""

    def __init__(self, *, settings: Settings, serve_http: bool = True) -> None:
        self.settings = settings
        self._serve_http = serve_http
        self._stack: AsyncExitStack | None = None
        self._stop_requested = asyncio.Event()
        self._accepting = False
        self.stopping = False
        self.engine: AsyncEngine | None = None
        self.bus = EventBus(
            capacity=settings.eventbus.capacity, overflow=settings.eventbus.overflow
        )
        self.writer: StoreWriter | None = None
        self.mqtt: MqttIngest | None = None
        self.publisher: MqttPublisher | None = None
        self.broker: EmbeddedBroker | None = None
        self.plugins: PluginManager | None = None
        self.rules: RuleEngine | None = None
        self.rule_sources: RuleSources | None = None
        self.actions: ActionExecutor | None = None
        self.pipeline: Pipeline | None = None
        self.outbox: WebhookOutbox | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._metrics_server: Any = None

    @property
    def accepting(self) -> bool:
        """Whether intake is open (false while starting and stopping)."""
        return self._accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self._accepting = value
        DEGRADED.labels(reason="not_accepting").set(0 if value else 1)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("the gateway is already running")
        self._stack = AsyncExitStack()
        try:
            await self._start()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._shutdown()

    async def _start(self) -> None:
        assert self._stack is not None
        settings = self.settings
        await upgrade_async(settings.database)
        self.engine = create_engine(settings.database)
        self.writer = await self._stack.enter_async_context(
            StoreWriter(
                engine=self.engine,
                retry_max_delay_s=settings.database.retry_max_delay_s,
                sqlite_synchronous=settings.database.sqlite_synchronous,
            )
        )
        self.bus.subscribe(
            STORE_SUBSCRIBER,
            self.writer.store_batch,
            overflow=settings.eventbus.overflow_for("store"),
            max_batch=settings.database.batch_size,
            max_wait_s=settings.database.flush_interval_ms / 1000,
        )
        await self._start_processing()
        await self.bus.__aenter__()
        await self._ensure_broker()
        receive_maximum = settings.mqtt.receive_maximum or 2 * settings.database.batch_size
        # amqtt speaks MQTT 3.1.1 only and does not answer a v5 CONNECT.
        protocol = MQTTv311 if self.broker and self.broker.kind == "amqtt" else MQTTv50
        self.publisher = MqttPublisher(
            config=settings.mqtt,
            client_id=f"{settings.mqtt.client_id}-pub",
            protocol_version=protocol,
        )
        await self.publisher.__aenter__()
        self.mqtt = MqttIngest(
            config=settings.mqtt,
            publish=self.publish,
            try_publish=self.try_publish,
            binary_topic=self.plugins.wants_raw if self.plugins else None,
            dead_letter=self.dead_letter,
            receive_maximum=receive_maximum,
            max_pending=settings.eventbus.capacity,
            protocol_version=protocol,
        )
        await self.mqtt.__aenter__()
        self.accepting = True
        if self._serve_http:
            await self._start_http()
        log.info("flux is running")

    async def _start_processing(self) -> None:
        """Load plugins and rules, and subscribe the pipeline that runs them."""
        assert self._stack is not None and self.engine is not None and self.writer is not None
        settings = self.settings
        self.plugins = await self._stack.enter_async_context(
            PluginManager(
                plugins_dir=Path(settings.plugins.dir),
                cache_dir=Path(settings.plugins.cache_dir) if settings.plugins.cache_dir else None,
                default_pool_size=settings.plugins.pool_size,
                max_hops=settings.plugins.max_hops,
            )
        )
        rules = settings.rules
        self.rules = await self._stack.enter_async_context(
            RuleEngine(
                quarantine_after=rules.quarantine_after,
                instruction_budget=rules.instruction_budget,
                memory_limit=rules.memory_limit_mb * 1024 * 1024,
                time_limit_s=rules.time_limit_s,
                known_plugins=self.plugins.names,
            )
        )
        self.rule_sources = RuleSources(engine=self.engine, rules_dir=Path(rules.dir))
        await self.reload_rules()
        self.actions = ActionExecutor(max_hops=rules.max_hops)
        hooks = settings.webhooks
        self.outbox = await self._stack.enter_async_context(
            WebhookOutbox(
                engine=self.engine,
                max_attempts=hooks.max_attempts,
                base_delay_s=hooks.base_delay_s,
                max_delay_s=hooks.max_delay_s,
                concurrency=hooks.concurrency,
                poll_interval_s=hooks.poll_interval_s,
                shutdown_timeout_s=settings.shutdown.close_timeout_s,
            )
        )
        self.actions.register(
            "webhook",
            retry_through_outages(
                self.outbox.handler, max_delay_s=settings.database.retry_max_delay_s
            ),
        )
        self.pipeline = Pipeline(
            bus=self.bus,
            plugins=self.plugins,
            rules=self.rules,
            actions=self.actions,
            add_alerts=self.writer.add_alerts,
            dead_letter=self.dead_letter,
            publish=self._publish_mqtt,
            max_hops=max(rules.max_hops, settings.plugins.max_hops),
        )
        self._stack.callback(self.pipeline.close)
        self.bus.subscribe(
            PIPELINE_SUBSCRIBER,
            self.pipeline.handle,
            overflow=settings.eventbus.overflow_for("pipeline"),
            max_batch=256,
            max_wait_s=PIPELINE_WAIT_S,
        )

    async def reload_rules(self) -> dict[str, Any]:
        """Re-read rules from files and the database and swap them in; return the report.

        Concurrent calls coalesce (the engine runs one more reload, not one per call).
        """
        assert self.rules is not None and self.rule_sources is not None
        report = await self.rules.reload(self.rule_sources.load)
        result = report.to_dict()
        file_errors = [error.to_dict() for error in self.rule_sources.load_errors]
        result["errors"] = file_errors + result["errors"]
        if file_errors and result["result"] == "ok":
            result["result"] = "partial"
        return result

    async def _publish_mqtt(self, message: PublishMessage, confirm: Callable[[], None]) -> None:
        if self.publisher is None:
            raise RuntimeError("MQTT is not running; message not published")
        await self.publisher.publish(message, confirm=confirm)

    async def publish(self, event: Event) -> None:
        """Put an ingested event on the bus.

        An event a sender waits on is acknowledged only when the store committed it and the
        pipeline committed everything it caused (see ``flux.pipeline``).
        """
        if event.needs_ack and self.pipeline is not None:
            event.ack = JointAck(event.ack, 2)
        await self.bus.publish(event)

    def try_publish(self, event: Event) -> bool:
        """``publish`` without waiting: False (and the event untouched) when the bus is full."""
        ack = event.ack
        if event.needs_ack and self.pipeline is not None:
            event.ack = JointAck(ack, 2)
        if self.bus.try_publish(event):
            return True
        event.ack = ack
        return False

    async def _ensure_broker(self) -> None:
        mqtt = self.settings.mqtt
        if await broker_answers(mqtt.host, mqtt.port):
            return
        if mqtt.embedded == "off":
            log.warning(
                "no MQTT broker answers at %s:%d; embedded broker is off", mqtt.host, mqtt.port
            )
            return
        if mqtt.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "no MQTT broker answers at %s; the embedded broker only runs on loopback", mqtt.host
            )
            return
        assert self._stack is not None
        self.broker = await self._stack.enter_async_context(EmbeddedBroker.choose(mqtt))

    async def _start_http(self) -> None:
        server_config = self.settings.server
        config = uvicorn.Config(
            create_api(self),
            host=server_config.host,
            port=server_config.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(), name="http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            if loop.time() > deadline:
                raise RuntimeError("the HTTP server did not start within 10 s")
            await asyncio.sleep(0.01)
        metrics = self.settings.metrics
        if metrics.port:
            self._metrics_server = start_http_server(metrics.port, addr=metrics.host)

    @property
    def http_port(self) -> int:
        """The port the HTTP API listens on (useful when configured as 0)."""
        if self._http is None or not self._http.servers:
            raise RuntimeError("the HTTP server is not running")
        socket = self._http.servers[0].sockets[0]
        return int(socket.getsockname()[1])

    def request_stop(self) -> None:
        """Ask the gateway to stop (signal handlers call this)."""
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        await self._stop_requested.wait()

    async def _shutdown(self) -> None:
        if self._stack is None:
            return
        self.stopping = True
        self.accepting = False
        timeouts = self.settings.shutdown
        if self.mqtt is not None:
            self.mqtt.stop_intake()
        drained = await self.bus.drain(timeouts.drain_timeout_s)
        if not drained:
            log.warning("bus not drained at shutdown; still queued: %s", self.bus.depth())
        if self.mqtt is not None:
            if not await self.mqtt.wait_idle(timeouts.intake_timeout_s):
                log.warning(
                    "%d MQTT messages unacknowledged at shutdown; the broker redelivers them",
                    self.mqtt.pending,
                )
            await self.mqtt.stop()
            self.mqtt = None
        if self.publisher is not None:
            await self.publisher.__aexit__(None, None, None)
            self.publisher = None
        await self.bus.__aexit__(None, None, None)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            try:
                await asyncio.wait_for(self._http_task, timeouts.close_timeout_s)
            except (TimeoutError, Exception) as exc:
                log.warning("HTTP server did not stop cleanly: %s", exc)
            self._http = None
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()
            server.server_close()
            self._metrics_server = None
        stack, self._stack = self._stack, None
        await stack.aclose()
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None
        log.info("flux stopped")

    # -- intake ---------------------------------------------------------------------------

    async def dead_letter(self, letter: DeadLetter) -> None:
        """Store a message that cannot become an event; acknowledged after commit."""
        assert self.writer is not None
        await self.writer.add_dead_letter(letter)

    async def ingest(self, events: list[Event]) -> None:
        """Publish events from the HTTP API in order."""
        for event in events:
            await self.publish(event)

    def readiness(self) -> dict[str, bool]:
        """Return each condition /ready checks; all must hold for the gateway to be ready."""
        return {
            "accepting": self.accepting,
            "database": self.writer is not None and self.writer.available,
            "mqtt": self.mqtt is not None and self.mqtt.connected,
        }

    def degraded(self) -> dict[str, str]:
        """Return every reason the gateway is degraded now, each with a detail.

        The reasons in ``NOT_READY`` fail ``readiness()`` (/ready answers 503); the others
        (``bus_backlog``, ``dropping``, ``dead_letter_backlog``) are reported with a 200:
        the gateway still takes and stores what it is sent, only slower or, under a drop
        policy the operator chose, with QoS 0 losses that are counted.
        """
        reasons: dict[str, str] = {}
        if not self.accepting:
            reasons["not_accepting"] = "stopping" if self.stopping else "starting"
        writer = self.writer
        if writer is None or not writer.available:
            reasons["database_unavailable"] = writer.last_error if writer else "not started"
        if self.mqtt is None or not self.mqtt.connected:
            reasons["mqtt_disconnected"] = self.settings.mqtt.url
        reasons.update(self.bus.degraded())
        if writer is not None and writer.dead_letter_backlog:
            reasons["dead_letter_backlog"] = f"{writer.dead_letters_queued} dead letters queued"
        return reasons


def tune_interpreter() -> None:
    """Keep the cyclic GC off the per-message path and the GIL moving between threads.

    Events are plain objects without cycles, but each allocates several, so the default
    thresholds ran a young collection every few messages and a full one (scanning every
    module, route and model loaded at start) every few thousand. Freezing what start-up
    created takes it out of every later scan; larger thresholds make collections rarer.
    A shorter switch interval lets the threads that run outside the GIL (SQLite, plugins)
    get it back without waiting a whole default interval behind the event loop.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def run(settings: Settings) -> None:
    """Run the gateway until SIGINT or SIGTERM, then stop in stages."""
    loop = asyncio.get_running_loop()
    # Migrations first, in a child process: Alembic would stay loaded (~11 MiB) for the
    # gateway's lifetime; the gateway's own check then finds the database at head.
    await upgrade_async(settings.database, in_child=True)
    gateway = Gateway(settings=settings)
    # Handlers before start-up: a signal arriving while the gateway starts (/ready may
    # already answer) must stop it in stages, not kill it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gateway.request_stop)
    async with gateway:
        tune_interpreter()
        await gateway.wait_stopped()
        log.info("stopping: intake off, draining the bus")


__all__ = ["NOT_READY", "Gateway", "run"]
