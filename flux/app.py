"""Compose the gateway and own its start-up and staged shutdown.

``Gateway`` builds every stage from its config section and enters them in order: the
database (migrated) and the store writer, plugins, rules, the bus with its two subscribers
(store and pipeline), the window timer (window rules close on time), the broker (the
embedded one if needed), the sinks (rule publishes, webhooks, upstream brokers and HTTP
ingests), MQTT ingest and the metrics sampler.
``serve`` adds the HTTP API and the metrics endpoint around a gateway; ``run`` is
``flux run``.

Shutdown goes in named stages, each bounded by its ``[shutdown]`` timeout: intake stops
(MQTT and HTTP), the bus drains so every queued event is committed and acknowledged, the
last PUBACKs leave, then every stage closes in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, Self

from flux.api import create_api
from flux.api.server import HttpServer, MetricsServer
from flux.bus import EventBus
from flux.config import Settings
from flux.errors import FluxError
from flux.ingest.broker import MqttBroker
from flux.ingest.mqtt import MqttIngest
from flux.metrics import DEGRADED
from flux.pipeline import PIPELINE_SUBSCRIBER, STORE_SUBSCRIBER, Pipeline, WindowTimer
from flux.plugins import PluginManager
from flux.rules import RuleEngine
from flux.rules.sources import RuleSources
from flux.rules.state import fingerprint
from flux.rules.sync import RulesetSync
from flux.sampler import MetricsSampler
from flux.sinks import Sinks, check_forward_sinks
from flux.store.database import create_engine, export_pool_metrics
from flux.store.migrate import upgrade_async
from flux.store.retention import Retention
from flux.store.rule_state import load_keys, load_rule_state, purge_stale
from flux.store.writer import StoreWriter

log = logging.getLogger(__name__)

#: How long a partial pipeline batch waits to fill: one Lua call per batch amortizes the
#: crossing into Lua and the hook set-up.
PIPELINE_WAIT_S = 0.005
#: Events per pipeline batch.
PIPELINE_BATCH = 256
#: Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = 50_000
#: How long a thread may keep the GIL while another waits (CPython's default is 5 ms): the
#: store's SQLite thread and the plugin threads hand it back after every call into C, and
#: each time had to wait up to this long for the busy event loop to let go.
SWITCH_INTERVAL_S = 0.0005

#: Degraded reasons that make the gateway not ready (/ready answers 503).
NOT_READY = frozenset({"not_accepting", "database_unavailable", "disk_full", "mqtt_disconnected"})


class GatewayState(enum.Enum):
    """Where a gateway is in its life; it accepts events only while ``RUNNING``."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Gateway:
    """The running gateway: ``async with Gateway(settings=...) as gw: await gw.wait_stopped()``."""

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self._state = GatewayState.CREATED
        self._stack = AsyncExitStack()
        self._stop_requested = asyncio.Event()
        DEGRADED.labels(reason="not_accepting").set(1)
        self.engine = create_engine(settings.database)
        export_pool_metrics(self.engine)
        self.broker = MqttBroker(settings.mqtt)
        self.sinks = Sinks.from_config(
            settings,
            engine=self.engine,
            delete=self._delete_outbox,
            local_protocol=lambda: self.broker.protocol_version,
        )
        self.writer = StoreWriter.from_config(
            settings.database, engine=self.engine, outbox=self.sinks
        )
        self.retention = Retention.from_config(
            settings.database, engine=self.engine, writer=self.writer
        )
        self.bus = EventBus.from_config(settings.eventbus)
        self.plugins = PluginManager.from_config(settings.plugins)
        rules = settings.rules
        self.rules = RuleEngine.from_config(
            rules, known_plugins=self.plugins.names, known_sinks=self.sinks.names
        )
        self.rule_sources = RuleSources(engine=self.engine, rules_dir=Path(rules.dir))
        self.ruleset_sync = RulesetSync(engine=self.engine, reload=self._reload_rules)
        self.pipeline = Pipeline(
            bus=self.bus,
            plugins=self.plugins,
            rules=self.rules,
            add_rows=self.writer.add_rows,
            dead_letter=self.writer.add_dead_letter,
            action_rows=self.sinks,
            max_hops=max(rules.max_hops, settings.plugins.max_hops),
        )
        #: Closes window rules' windows on time when no event arrives.
        self.window_timer = WindowTimer(self.pipeline)
        self.mqtt = MqttIngest(
            config=settings.mqtt,
            broker=self.broker,
            deliver=self.bus.deliver,
            try_deliver=self.bus.try_deliver,
            dead_letter=self.writer.add_dead_letter,
            binary_topic=self.plugins.wants_raw,
            receive_maximum=settings.mqtt.receive_maximum or 2 * settings.database.batch_size,
            max_pending=settings.eventbus.capacity,
            on_fatal=self.fail,
        )
        self.sampler = MetricsSampler.from_config(
            settings.metrics, before_sample=[self.plugins.observe_memory]
        )
        #: Events per pipeline batch (the tuning report weighs bus capacity against it).
        self.pipeline_batch = PIPELINE_BATCH
        #: Set when a failure that will not fix itself stopped the gateway (``run`` raises it).
        self.fatal: FluxError | None = None

    def _delete_outbox(self, ids: Sequence[str]) -> None:
        """Outbox rows the sinks delivered are deleted on the store's next transaction."""
        self.writer.delete_outbox(ids)

    @property
    def state(self) -> GatewayState:
        return self._state

    @property
    def accepting(self) -> bool:
        """Whether intake is open: the gateway takes events only while running."""
        return self._state is GatewayState.RUNNING

    def _set_state(self, state: GatewayState) -> None:
        self._state = state
        DEGRADED.labels(reason="not_accepting").set(0 if state is GatewayState.RUNNING else 1)

    # -- start-up -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not GatewayState.CREATED:
            raise RuntimeError(f"a gateway starts once; this one is {self._state.value}")
        self._set_state(GatewayState.STARTING)
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        self._set_state(GatewayState.RUNNING)
        log.info("flux is running")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        settings = self.settings
        await upgrade_async(settings.database)
        self._stack.push_async_callback(self.engine.dispose)
        await self._enter("store", self.writer)
        await self._enter("retention", self.retention)
        self.bus.subscribe(
            STORE_SUBSCRIBER,
            self.writer.store_batch,
            overflow=settings.eventbus.overflow_for("store"),
            max_batch=settings.database.batch_size,
            max_wait_s=settings.database.flush_interval_ms / 1000,
            acknowledges=True,
        )
        await self._enter("plugins", self.plugins)
        await self._enter("rules", self.rules)
        await self._check_forwards()
        await self._reload_rules()
        await self._restore_rule_state()
        await self._enter("rules sync", self.ruleset_sync)
        self.bus.subscribe(
            PIPELINE_SUBSCRIBER,
            self.pipeline.handle,
            overflow=settings.eventbus.overflow_for("pipeline"),
            max_batch=PIPELINE_BATCH,
            max_wait_s=PIPELINE_WAIT_S,
            acknowledges=True,
        )
        await self._enter("bus", self.bus)
        await self._enter("window timer", self.window_timer)
        await self._enter("broker", self.broker)
        await self._enter("sinks", self.sinks)
        await self._enter("mqtt ingest", self.mqtt)
        await self._enter("metrics sampler", self.sampler)

    async def _restore_rule_state(self) -> None:
        """Read back the rules' stored state (script state, quarantines), dropping what a
        changed or deleted rule left; later, the devices of each batch are read as they come
        (another instance may have handled them)."""
        rows = await load_rule_state(self.engine)
        used = await self.rules.restore_state(rows)
        statuses = self.rules.rules()
        current = {status.id: fingerprint(status.rule) for status in statuses if status.rule}
        clean = not self.rule_sources.load_errors and all(status.rule for status in statuses)
        purged = await purge_stale(self.engine, current, drop_absent=clean)
        log.info("rule state: %d rows restored, %d stale rows dropped", used, purged)
        if not clean:
            log.warning(
                "rules failed to load: the stored state of rules missing now is kept until "
                "a start where every rule loads"
            )
        group = self.settings.mqtt.shared_group
        stateful = sorted(
            status.id
            for status in self.rules.rules()
            if status.rule and (status.rule.uses_state or status.rule.window is not None)
        )
        if group and stateful:
            log.warning(
                "stateful rules (%s) run on a shared subscription ($share/%s/...): a "
                "device's messages must reach one instance at a time for its state to be "
                "right; use a broker that shares by client id or topic (EMQX: "
                "shared_subscription_strategy = hash_clientid or hash_topic). Mosquitto "
                "hands them out round-robin (see the README, Rules: scale-out)",
                ", ".join(stateful),
                group,
            )
        # Devices shared with other instances (a shared subscription; several hosts on one
        # PostgreSQL) are read back every batch: another instance may have written their
        # state since this one last held it.
        shared = bool(group) or self.engine.dialect.name == "postgresql"
        self.rules.load_state_with(partial(load_keys, self.engine, "script"), every_batch=shared)

    async def _check_forwards(self) -> None:
        """A rule forwarding to a sink that is not configured stops start-up (exit 2)."""
        rules = await self.rule_sources.load()
        check_forward_sinks({rule.id: rule.sink_names() for rule in rules}, self.sinks.names)

    async def _enter(self, name: str, stage: AbstractAsyncContextManager[Any]) -> None:
        """Start ``stage`` and put its close on the exit stack, bounded and named."""
        await stage.__aenter__()
        timeout = self.settings.shutdown.close_timeout_s

        async def close() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await stage.__aexit__(None, None, None)
            except TimeoutError:
                log.warning(
                    "shutdown stage 'close': %s did not close within %gs; still running: %s",
                    name,
                    timeout,
                    _running_tasks(),
                )

        self._stack.push_async_callback(close)

    # -- shutdown -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the gateway to stop (signal handlers call this)."""
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        """Return once ``request_stop`` was called."""
        await self._stop_requested.wait()

    def fail(self, error: FluxError) -> None:
        """Stop because of ``error``, which will not fix itself (e.g. the broker refuses
        our credentials): ``run`` raises it once the gateway has stopped in stages."""
        if self.fatal is None:
            self.fatal = error
        self.request_stop()

    def stop_intake(self) -> None:
        """Stop taking events (stage 'intake'): MQTT messages stay unacknowledged and are
        redelivered later, HTTP ingest answers 503."""
        if self._state in (GatewayState.STOPPING, GatewayState.STOPPED):
            return
        self._set_state(GatewayState.STOPPING)
        self.mqtt.stop_intake()
        log.info("shutdown stage 'intake': intake stopped")

    async def _stop(self) -> None:
        if self._state is GatewayState.STOPPED:
            return
        self.stop_intake()
        timeouts = self.settings.shutdown
        await _stage(
            "drain",
            timeouts.drain_timeout_s,
            self.bus.drain,
            lambda: f"events still queued per subscriber: {self.bus.depth()}",
        )
        await _stage(
            "acknowledge",
            timeouts.intake_timeout_s,
            self.mqtt.wait_idle,
            lambda: f"{self.mqtt.pending} MQTT messages unacknowledged; the broker redelivers them",
        )
        await self._stack.aclose()
        self._set_state(GatewayState.STOPPED)
        log.info("flux stopped")

    # -- what the API and operators see -----------------------------------------------------

    async def reload_rules(self) -> dict[str, Any]:
        """Re-read rules from files and the database and swap them in; return the report;
        then tell the other instances sharing the database to reload too.

        Concurrent calls coalesce (the engine runs one more reload, not one per call).
        """
        result = await self._reload_rules()
        await self.ruleset_sync.announce()
        return result

    async def _reload_rules(self) -> dict[str, Any]:
        report = await self.rules.reload(self.rule_sources.load)
        result = report.to_dict()
        file_errors = [error.to_dict() for error in self.rule_sources.load_errors]
        result["errors"] = file_errors + result["errors"]
        if file_errors and result["result"] == "ok":
            result["result"] = "partial"
        return result

    def readiness(self) -> dict[str, bool]:
        """Return each condition /ready checks; all must hold for the gateway to be ready."""
        return {
            "accepting": self.accepting,
            "database": self.writer.available,
            "mqtt": self.mqtt.connected,
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
            stopping = self._state in (GatewayState.STOPPING, GatewayState.STOPPED)
            reasons["not_accepting"] = "stopping" if stopping else "starting"
        if not self.writer.available:
            reasons[self.writer.unavailable_reason] = self.writer.last_error
        if not self.mqtt.connected:
            reasons["mqtt_disconnected"] = self.settings.mqtt.url
        reasons.update(self.bus.degraded())
        reasons.update(self.sinks.degraded())
        if self.writer.dead_letter_backlog:
            queued = self.writer.dead_letters_queued
            reasons["dead_letter_backlog"] = f"{queued} dead letters queued"
        return reasons


async def _stage(
    name: str,
    timeout: float,
    work: Callable[[float], Awaitable[bool]],
    still_running: Callable[[], str],
) -> None:
    """Run one shutdown stage (``work`` returns False on timeout) and log what it left."""
    if not await work(timeout):
        log.warning("shutdown stage '%s' timed out after %gs; %s", name, timeout, still_running())


def _running_tasks() -> str:
    """The names of the asyncio tasks still running, but the caller's."""
    current = asyncio.current_task()
    names = sorted(t.get_name() for t in asyncio.all_tasks() if t is not current and not t.done())
    return ", ".join(names) or "no tasks"


@contextlib.asynccontextmanager
async def serve(gateway: Gateway) -> AsyncIterator[HttpServer]:
    """Start ``gateway``, then its HTTP API; yield the HTTP server.

    The metrics endpoint and the API's port are bound first, so a taken port stops start-up
    before any connection opens. On exit intake stops first (HTTP ingest answers 503 from
    then on), then the HTTP server closes once its in-flight requests are answered, then
    the gateway stops in stages.
    """
    settings = gateway.settings
    http = HttpServer(
        app=create_api(gateway),
        config=settings.server,
        close_timeout_s=settings.shutdown.close_timeout_s,
    )
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(MetricsServer(settings.metrics))
        http.reserve()
        stack.callback(http.release)
        await stack.enter_async_context(gateway)
        await stack.enter_async_context(http)
        stack.callback(gateway.stop_intake)
        yield http


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
    # Migrations first, in a child process: Alembic would stay loaded for the gateway's
    # lifetime; the gateway's own check then finds the database at head.
    await upgrade_async(settings.database, in_child=True)
    gateway = Gateway(settings=settings)
    # Handlers before start-up: a signal arriving while the gateway starts (/ready may
    # already answer) must stop it in stages, not kill it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gateway.request_stop)
    async with serve(gateway):
        tune_interpreter()
        await gateway.wait_stopped()
        log.info("stopping: intake off, draining the bus")
    if gateway.fatal is not None:
        raise gateway.fatal


__all__ = ["NOT_READY", "Gateway", "GatewayState", "run", "serve"]
