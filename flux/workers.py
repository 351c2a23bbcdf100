"""``flux run --workers N``: a small supervisor that runs N gateway processes side by side.

One gateway process is bound to one core (one event loop, one GIL). N processes subscribe
with an MQTT shared subscription (``$share/<group>/<topic>``), so the broker hands each
message to one of them, and they write to the same database. The supervisor does only what
must happen once: validate the configuration (for every worker, with its overrides), run the
migrations (so N workers do not race on them), start the embedded broker if one is needed
(so exactly one exists), then start the workers as ``python -m flux run`` children with
per-worker overrides in the environment (``FLUX_<SECTION>__<KEY>``, see ``flux.config``):

- ``mqtt.shared_group``: kept when configured, else ``flux``;
- ``mqtt.client_id``: ``<client_id>-w<i>``, since each worker needs its own persistent session;
- ``server.port`` and ``metrics.port``: ``port + i`` (0 stays 0);
- ``mqtt.embedded``: ``off``, since the supervisor alone decides about the broker;
- ``database.*retention_days`` and ``database.max_size_mb``: 0 but for worker 0, the one
  that purges the shared database.

It forwards SIGTERM/SIGINT to the workers (each drains and exits 0), restarts a worker that
exits on its own with capped backoff, and stops everything with exit code 2 when a worker
reports a configuration error (exit code 2), since restarting it would fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flux.config import RETAINED_TABLES, Settings, load_settings
from flux.errors import ConfigError, FluxError
from flux.ingest.broker import EmbeddedBroker, broker_answers
from flux.retry import Backoff
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Set in a worker's environment: its index, and the supervisor's pid (to die with it).
WORKER_INDEX_ENV = "FLUX_WORKER_INDEX"
SUPERVISOR_PID_ENV = "FLUX_SUPERVISOR_PID"
#: Shared-subscription group used when the configuration names none.
DEFAULT_SHARED_GROUP = "flux"
#: Restart backoff: doubles from the first delay up to the cap; a worker that ran this long
#: before it exited counts as healthy and restarts after the first delay again.
FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
HEALTHY_AFTER_S = 30.0
#: Added to the sum of the [shutdown] stage timeouts before a worker that has not exited
#: after the forwarded signal is killed.
STOP_MARGIN_S = 15.0
EXIT_CONFIG = 2
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerPlan:
    """One worker: its index, its ``FLUX_*`` overrides and the settings they produce."""

    index: int
    overrides: Mapping[str, str]
    settings: Settings

    def environment(self, base: Mapping[str, str], supervisor_pid: int) -> dict[str, str]:
        """The worker's environment: ``base`` with our overrides replacing any spelling of
        the same keys (``_apply_env`` lower-cases names, so two spellings would race)."""
        ours = {_override_key(name) for name in self.overrides}
        env = {name: value for name, value in base.items() if _override_key(name) not in ours}
        env.update(self.overrides)
        env[WORKER_INDEX_ENV] = str(self.index)
        env[SUPERVISOR_PID_ENV] = str(supervisor_pid)
        return env


def _override_key(name: str) -> tuple[str, str] | None:
    if not name.startswith("FLUX_") or "__" not in name:
        return None
    section, _, key = name[5:].lower().partition("__")
    return (section, key)


def _toml_string(value: str) -> str:
    """Quote a string so the override reads back as exactly that string (never a number)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def worker_overrides(settings: Settings, index: int) -> dict[str, str]:
    """The ``FLUX_*`` variables that turn the shared settings into worker ``index``'s."""
    mqtt = settings.mqtt
    overrides = {
        "FLUX_MQTT__SHARED_GROUP": _toml_string(mqtt.shared_group or DEFAULT_SHARED_GROUP),
        "FLUX_MQTT__CLIENT_ID": _toml_string(f"{mqtt.client_id}-w{index}"),
        "FLUX_MQTT__EMBEDDED": _toml_string("off"),
        "FLUX_SERVER__PORT": str(settings.server.port + index if settings.server.port else 0),
        "FLUX_METRICS__PORT": str(settings.metrics.port + index if settings.metrics.port else 0),
    }
    if index:
        # One purger per database: worker 0 (several would each cut the size excess).
        keys = ["retention_days", "max_size_mb", *(f"{t}_retention_days" for t in RETAINED_TABLES)]
        overrides.update({f"FLUX_DATABASE__{key.upper()}": "0" for key in keys})
    return overrides


def plan_workers(
    settings: Settings,
    count: int,
    *,
    config_path: Path | None,
    environ: Mapping[str, str],
) -> list[WorkerPlan]:
    """Plan ``count`` workers and validate each one's settings; raise ``ConfigError``.

    Every worker's configuration is loaded exactly as the worker will load it, so a port
    pushed past 65535 or a bad override stops start-up here with exit code 2, not in a
    restart loop.
    """
    if count < 1:
        raise ConfigError("must be at least 1", key="--workers")
    server, metrics = settings.server.port, settings.metrics.port
    if server and metrics and abs(server - metrics) < count:
        raise ConfigError(
            f"ports {metrics}..{metrics + count - 1} of {count} workers overlap the HTTP "
            f"ports {server}..{server + count - 1} (worker i listens on port + i)",
            key="metrics.port",
        )
    plans: list[WorkerPlan] = []
    for index in range(count):
        overrides = worker_overrides(settings, index)
        env = WorkerPlan(index, overrides, settings).environment(environ, 0)
        try:
            worker_settings = load_settings(config_path, environ=env)
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} (worker {index} of {count})", key=exc.key) from None
        plans.append(WorkerPlan(index, overrides, worker_settings))
    return plans


def attach_to_supervisor() -> int | None:
    """In a worker, make sure it does not outlive its supervisor; return its index.

    On Linux the kernel sends SIGTERM (a normal staged stop) when the supervisor dies, even
    by SIGKILL; a supervisor already gone before that was set up is caught by its pid.
    """
    index = os.environ.get(WORKER_INDEX_ENV)
    if index is None:
        return None
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV) or 0)
    if supervisor and os.getppid() != supervisor:
        raise FluxError(f"worker {index}: its supervisor (pid {supervisor}) is gone")
    return int(index)


class _Worker:
    """A worker slot: the plan, the process running it now, how it last ended."""

    def __init__(self, plan: WorkerPlan, env: dict[str, str]) -> None:
        self.plan = plan
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.last_code: int | None = None

    @property
    def name(self) -> str:
        settings = self.plan.settings
        return f"worker {self.plan.index} ({settings.mqtt.client_id}, http :{settings.server.port})"


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Run one process per plan, keep them running, stop them all on SIGTERM/SIGINT."""

    def __init__(
        self,
        plans: Sequence[WorkerPlan],
        *,
        argv: Sequence[str],
        environ: Mapping[str, str] | None = None,
        stop_timeout_s: float = 60.0,
        first_delay_s: float = FIRST_RESTART_DELAY_S,
        max_delay_s: float = MAX_RESTART_DELAY_S,
        healthy_after_s: float = HEALTHY_AFTER_S,
    ) -> None:
        base = os.environ if environ is None else environ
        self._workers = [_Worker(plan, plan.environment(base, os.getpid())) for plan in plans]
        self._argv = list(argv)
        self._stop_timeout_s = stop_timeout_s
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._healthy_after_s = healthy_after_s
        self._stopping = asyncio.Event()
        self._stop_signal = signal.SIGTERM
        self._config_error = False
        self._failed = False

    @property
    def pids(self) -> list[int]:
        """Pids of the workers running now."""
        return [
            w.process.pid
            for w in self._workers
            if w.process is not None and w.process.returncode is None
        ]

    def request_stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop: forward ``sig`` to every worker (again on a repeated signal) and restart none."""
        if not self._stopping.is_set():
            log.info("stopping %d workers (%s)", len(self._workers), sig.name)
        self._stop_signal = sig
        self._stopping.set()
        for worker in self._workers:
            self._signal(worker, sig)

    def _signal(self, worker: _Worker, sig: signal.Signals) -> None:
        process = worker.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def run(self, *, handle_signals: bool = True) -> int:
        """Run until stopped; return 0 if every worker exited cleanly, 2 on a worker's
        configuration error, 1 otherwise."""
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, self.request_stop, sig)
                    handled.append(sig)
        tasks = [
            asyncio.create_task(self._keep(worker), name=f"worker-{worker.plan.index}")
            for worker in self._workers
        ]
        try:
            await self._stopping.wait()
            _done, pending = await asyncio.wait(tasks, timeout=self._stop_timeout_s)
            if pending:
                await self._kill_laggards(pending)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await cancel_and_wait(*tasks)
            for worker in self._workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
        if self._config_error:
            return EXIT_CONFIG
        if self._failed:
            return 1
        # None: not running when the stop came (between restarts), so nothing to drain.
        clean = (None, 0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if all(w.last_code in clean for w in self._workers) else 1

    async def _kill_laggards(self, pending: set[asyncio.Task[None]]) -> None:
        self._failed = True
        for worker in self._workers:
            process = worker.process
            if process is not None and process.returncode is None:
                log.error(
                    "%s did not stop within %.0fs; killing it", worker.name, self._stop_timeout_s
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        await asyncio.wait(pending, timeout=10)

    async def _keep(self, worker: _Worker) -> None:
        """Run one worker and restart it when it exits, until the supervisor stops."""
        try:
            await self._keep_running(worker)
        except Exception:
            log.exception("%s: the supervisor failed to run it; stopping all workers", worker.name)
            self._failed = True
            self.request_stop()

    async def _keep_running(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(first_s=self._first_delay_s, max_s=self._max_delay_s)
        while not self._stopping.is_set():
            started = loop.time()
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                env=worker.env,
                stdin=asyncio.subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C reaches the supervisor only, which then
                # stops the workers itself (no worker restarted for exiting "on its own").
                start_new_session=True,
            )
            worker.process = process
            if self._stopping.is_set():  # stop requested while the process was starting
                self._signal(worker, self._stop_signal)
            log.info("%s started, pid %d", worker.name, process.pid)
            code = await process.wait()
            worker.last_code = code
            if self._stopping.is_set():
                log.info("%s stopped with %s", worker.name, _describe_exit(code))
                return
            if code == EXIT_CONFIG:
                log.error(
                    "%s exited with a configuration error (exit code 2); stopping all workers",
                    worker.name,
                )
                self._config_error = True
                self.request_stop()
                return
            if loop.time() - started >= self._healthy_after_s:
                backoff.reset()
            delay = backoff.next()
            log.warning(
                "%s exited unexpectedly with %s; restarting it in %.1fs",
                worker.name,
                _describe_exit(code),
                delay,
            )
            worker.last_code = None  # handled: a stop during the backoff is a clean one
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)


async def _embedded_broker(settings: Settings) -> EmbeddedBroker | None:
    """Start the one embedded broker the workers share, when the gateway would start one.

    Only a child Mosquitto qualifies: amqtt speaks MQTT 3.1.1 only, lives inside one process
    and has no shared subscriptions, so ``--workers`` with it is refused (exit code 2).
    """
    mqtt = settings.mqtt
    broker = EmbeddedBroker.allowed(mqtt)
    if broker is None or await broker_answers(mqtt.host, mqtt.port):
        return None  # the workers log it themselves if nothing answers
    if broker.kind != "mosquitto":
        raise ConfigError(
            f"no broker answers at {mqtt.host}:{mqtt.port} and the embedded broker would be "
            "amqtt, which cannot serve --workers (MQTT 3.1.1 only, no shared subscriptions): "
            "install mosquitto or point mqtt.url at a broker",
            key="mqtt.embedded",
        )
    return broker


async def _supervise(plans: Sequence[WorkerPlan], settings: Settings, argv: Sequence[str]) -> int:
    shutdown = settings.shutdown
    stop_timeout_s = (
        shutdown.intake_timeout_s
        + shutdown.drain_timeout_s
        + shutdown.close_timeout_s
        + STOP_MARGIN_S
    )
    supervisor = Supervisor(plans, argv=argv, stop_timeout_s=stop_timeout_s)
    broker = await _embedded_broker(settings)
    if broker is None:
        return await supervisor.run()
    # The broker outlives the workers: their last PUBACKs and clean disconnects need it.
    async with broker:
        return await supervisor.run()


def run_workers(
    settings: Settings,
    *,
    count: int,
    config: str,
    config_path: Path | None,
    log_level: str = "INFO",
) -> int:
    """``flux run --workers N``: plan and validate, migrate once, supervise; the exit code."""
    from flux.store.migrate import upgrade

    plans = plan_workers(settings, count, config_path=config_path, environ=os.environ)
    first, last = plans[0].settings, plans[-1].settings
    log.info(
        "supervising %d workers: shared group %r, client ids %s..%s, HTTP ports %d..%d",
        count,
        first.mqtt.shared_group,
        first.mqtt.client_id,
        last.mqtt.client_id,
        first.server.port,
        last.server.port,
    )
    upgrade(settings.database, "head")
    argv = [sys.executable, "-m", "flux", "--log-level", log_level, "run", "--config", config]
    return asyncio.run(_supervise(plans, settings, argv))


__all__ = [
    "DEFAULT_SHARED_GROUP",
    "SUPERVISOR_PID_ENV",
    "WORKER_INDEX_ENV",
    "Supervisor",
    "WorkerPlan",
    "attach_to_supervisor",
    "plan_workers",
    "run_workers",
    "worker_overrides",
]
