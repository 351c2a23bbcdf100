"""The rules engine: holds the active ruleset, swaps in reloads, and evaluates batches against it.

One ``LuaSandbox`` (one Lua runtime) per engine, used by one thread at a time: either the event
loop itself or, with ``offload=True``, a single dedicated worker thread (lupa releases the GIL
while Lua runs, so the loop keeps serving I/O during long batches).

Reloads compile everything first, then swap the whole ruleset in one assignment; every batch
captures the ruleset it starts with, so each event is evaluated by exactly one ruleset version.
Concurrent reload calls coalesce: calls made while a reload runs share the single next reload,
which uses the rules given by the most recent call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

from flux.coalesce import Coalescer
from flux.config import RulesConfig
from flux.errors import NotFound, NotReady
from flux.events import Event
from flux.rules import metrics
from flux.rules.batch import BatchOutcome, RuleMatch
from flux.rules.compiler import (
    CompileCache,
    CompiledRule,
    CompiledRules,
    compile_rules,
    validate_rule,
)
from flux.rules.errors import RuleError
from flux.rules.model import Rule
from flux.rules.ruleset import Ruleset
from flux.rules.sandbox import (
    DEFAULT_INSTRUCTION_BUDGET,
    DEFAULT_MAX_STATE_DEVICES,
    DEFAULT_MAX_STATE_KEYS,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIME_LIMIT_S,
    LuaError,
    LuaSandbox,
)
from flux.rules.state import (
    StateRow,
    fingerprint,
    pack_windows,
    state_entries,
    state_value,
    unpack_windows,
)
from flux.rules.stats import RuleStats, RuleStatus
from flux.rules.testing import (
    RuleTestResult,
    TimedEvent,
    WindowTestResult,
    run_test,
    run_window_test,
)
from flux.rules.trace import RuleTraces
from flux.rules.windows import WindowStore, evaluate_closed

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RuleSource = Iterable[Rule] | Callable[[], Awaitable[Iterable[Rule]]]
#: Reads the stored script state of devices (another instance may have handled them):
#: device ids -> their rows.
StateLoader = Callable[[Collection[str]], Awaitable[list[StateRow]]]
#: Devices remembered as looked up; past this the memory starts again (a lookup costs one
#: query, and never overwrites a device's state held in memory).
_SEEN_DEVICES = 100_000


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What a reload did: the new version, counts, and per-rule errors with line numbers."""

    version: int
    result: Literal["ok", "partial", "failed"]
    active: int
    disabled: int
    quarantined: int
    compiled: int
    reused: int
    errors: tuple[RuleError, ...]
    duration_s: float

    @classmethod
    def of(cls, ruleset: Ruleset, result: CompiledRules, duration_s: float) -> ReloadReport:
        """Describe the reload that compiled ``result`` into ``ruleset``."""
        outcome: Literal["ok", "partial", "failed"] = "ok"
        if result.errors:
            outcome = "partial" if result.compiled or result.disabled else "failed"
        return cls(
            version=ruleset.version,
            result=outcome,
            active=len(result.compiled) - len(ruleset.quarantined),
            disabled=len(result.disabled),
            quarantined=len(ruleset.quarantined),
            compiled=result.fresh,
            reused=result.reused,
            errors=tuple(result.errors),
            duration_s=duration_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "version": self.version,
            "result": self.result,
            "active": self.active,
            "disabled": self.disabled,
            "quarantined": self.quarantined,
            "compiled": self.compiled,
            "reused": self.reused,
            "errors": [e.to_dict() for e in self.errors],
            "duration_s": self.duration_s,
        }


def _log(report: ReloadReport) -> None:
    """Log a reload's outcome, and each rule left out."""
    log.info(
        "rules reloaded: version %d, %d active, %d disabled, %d quarantined, %d errors",
        report.version,
        report.active,
        report.disabled,
        report.quarantined,
        len(report.errors),
    )
    for error in report.errors:
        log.warning("rule not loaded: %s", error)


async def _read(source: RuleSource | None) -> list[Rule]:
    """Return the rules of ``source``, calling it if it is an async callable."""
    if source is None:
        return []
    if callable(source):
        return list(await source())
    return list(source)


class RuleEngine:
    """Evaluate batches of events against the active Lua ruleset; reload it atomically.

    Use as ``async with RuleEngine(...) as engine:``; ``reload`` before the first evaluation.
    """

    def __init__(
        self,
        *,
        quarantine_after: int = 5,
        instruction_budget: int = DEFAULT_INSTRUCTION_BUDGET,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        time_limit_s: float = DEFAULT_TIME_LIMIT_S,
        max_state_devices: int = DEFAULT_MAX_STATE_DEVICES,
        max_state_keys: int = DEFAULT_MAX_STATE_KEYS,
        known_plugins: Collection[str] | Callable[[], Collection[str]] = frozenset(),
        known_sinks: Collection[str] | None = None,
        offload: bool = False,
        fuse: bool = True,
    ) -> None:
        if quarantine_after < 1:
            raise ValueError("quarantine_after must be at least 1")
        self._quarantine_after = quarantine_after
        self._sandbox_args = {
            "instruction_budget": instruction_budget,
            "memory_limit": memory_limit,
            "time_limit_s": time_limit_s,
            "max_state_devices": max_state_devices,
            "max_state_keys": max_state_keys,
        }
        self._known_plugins = known_plugins
        self._known_sinks = known_sinks
        self._offload = offload
        self._fuse = fuse
        self._sandbox: LuaSandbox | None = None
        self._cache: CompileCache | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._ruleset: Ruleset | None = None
        self._version = 0
        self._entered = False
        self._closed = False
        self._reloads: Coalescer[ReloadReport] = Coalescer()
        self._pending_source: RuleSource | None = None
        self._stats = RuleStats()
        self._traces = RuleTraces()
        self._state_loader: StateLoader | None = None
        self._seen_devices: set[str] = set()
        self._every_batch = False
        #: (rule id, device) -> version of the script state this process holds.
        self._versions: dict[tuple[str, str], int] = {}
        self._state_changes: list[StateRow] = []
        self._fingerprints: dict[str, str] = {}
        self._windows = WindowStore()

    @classmethod
    def from_config(
        cls,
        config: RulesConfig,
        *,
        known_plugins: Collection[str] | Callable[[], Collection[str]] = frozenset(),
        known_sinks: Collection[str] | None = None,
    ) -> RuleEngine:
        """An engine with the configured quarantine threshold and Lua limits."""
        return cls(
            quarantine_after=config.quarantine_after,
            instruction_budget=config.instruction_budget,
            memory_limit=config.memory_limit_mb * 1024 * 1024,
            time_limit_s=config.time_limit_s,
            known_plugins=known_plugins,
            known_sinks=known_sinks,
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RuleEngine:
        if self._entered:
            raise RuntimeError("RuleEngine is already running; it cannot be entered twice")
        self._entered = True
        if self._offload:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-rules")
        sandbox = await self._call(lambda: LuaSandbox(**self._sandbox_args))  # type: ignore[arg-type]
        self._sandbox = sandbox
        self._cache = CompileCache(sandbox)
        self._ruleset = await self._call(self._build, [], 0, set())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        async with self._reloads.exclusive():
            self._closed = True
            self._ruleset = None
            self._cache = None
            self._sandbox = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        self._stats.closed()

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run Lua work on the engine's Lua thread (the loop, or the single worker)."""
        if self._executor is None:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _require(self) -> tuple[LuaSandbox, CompileCache, Ruleset]:
        if self._closed or self._sandbox is None or self._cache is None or self._ruleset is None:
            raise NotReady("the rules engine is not running")
        return self._sandbox, self._cache, self._ruleset

    def _plugin_names(self) -> Collection[str]:
        known = self._known_plugins
        return known() if callable(known) else known

    # ------------------------------------------------------------------ queries

    @property
    def version(self) -> int:
        """Return the active ruleset version (0 before the first reload)."""
        return self._version

    @property
    def sandbox(self) -> LuaSandbox:
        """Return the Lua sandbox (for diagnostics and tests)."""
        return self._require()[0]

    def rules(self) -> list[RuleStatus]:
        """Return every known rule with its status: active, quarantined, error or disabled."""
        return self._stats.statuses(self._ruleset)

    def status(self, rule_id: str) -> RuleStatus | None:
        """Return the status of one rule, or ``None`` if the engine does not know it."""
        for item in self.rules():
            if item.id == rule_id:
                return item
        return None

    # ------------------------------------------------------------------ reload

    async def reload(self, rules: RuleSource) -> ReloadReport:
        """Compile ``rules`` and swap them in atomically; coalesce with concurrent calls.

        ``rules`` is a collection of rules or an async callable returning one (called when the
        reload actually starts, so a coalesced reload reads the newest files and database rows).
        Rules that fail validation or compilation are reported and left out; the rest go live.
        """
        self._require()
        self._pending_source = rules
        return await self._reloads.run(self._run_reload)

    async def _run_reload(self) -> ReloadReport:
        source, self._pending_source = self._pending_source, None
        started = time.perf_counter()
        try:
            rules = await _read(source)
            result = await self._call(self._compile, rules, set(self._plugin_names()))
            quarantined = self._stats.still_quarantined(result.compiled)
            ruleset = await self._call(self._build, result.compiled, self._version + 1, quarantined)
        except Exception:
            metrics.RULES_RELOAD.labels(result="failed").inc()
            raise
        # The swap: from here on new batches see the new ruleset.
        self._version = ruleset.version
        self._ruleset = ruleset
        self._stats.reloaded(ruleset, result)
        await self._call(self._windows.sync, ruleset.rules)
        await self._call(self._cleanup, ruleset, result)
        report = ReloadReport.of(ruleset, result, time.perf_counter() - started)
        metrics.RULES_RELOAD.labels(result=report.result).inc()
        _log(report)
        return report

    def _compile(self, rules: Sequence[Rule], known_plugins: set[str]) -> CompiledRules:
        _sandbox, cache, _ruleset = self._require()
        return compile_rules(cache, rules, known_plugins, self._known_sinks)

    def _build(
        self, compiled: Sequence[CompiledRule], version: int, quarantined: set[str]
    ) -> Ruleset:
        sandbox = self._sandbox
        assert sandbox is not None
        return Ruleset(
            sandbox=sandbox,
            version=version,
            compiled=compiled,
            quarantine_after=self._quarantine_after,
            quarantined=quarantined,
            fuse=self._fuse,
        )

    def _cleanup(self, ruleset: Ruleset, result: CompiledRules) -> None:
        """Forget compiled rules, and per-device state that no rule uses any more or whose
        rule's condition or script changed (a changed rule starts afresh)."""
        sandbox, cache, _ = self._require()
        cache.retain(result.keys())
        sandbox.prune_states({rule.id for rule in ruleset.rules})
        fingerprints = {rule.id: fingerprint(rule) for rule in ruleset.rules}
        for rule_id, old in self._fingerprints.items():
            if fingerprints.get(rule_id, old) != old:
                sandbox.host.drop_state(rule_id)
        self._fingerprints = fingerprints

    async def unquarantine(self, rule_id: str) -> bool:
        """Put a quarantined rule back into service (effective from the next batch)."""
        return await self._call(self._unquarantine, rule_id)

    def _unquarantine(self, rule_id: str) -> bool:
        ruleset = self._ruleset
        if ruleset is None or rule_id not in ruleset.index:
            return False
        rule_index = ruleset.index[rule_id]
        if not ruleset.unquarantine(rule_index):
            return False
        self._stats.unquarantined(ruleset, rule_id)
        rule = ruleset.rules[rule_index - 1]
        self._state_changes.append(StateRow(rule_id, "quarantine", "", fingerprint(rule), None))
        return True

    # ------------------------------------------------------------------ evaluation

    async def evaluate_batch(self, events: Sequence[Event]) -> list[RuleMatch]:
        """Evaluate ``events`` against every rule whose topic filter matches; return the matches.

        Matches come in event order, then rule order. Failures are counted, logged and recorded
        in the rule's status; they never affect other rules or events.
        """
        _sandbox, _cache, ruleset = self._require()
        if not events or not ruleset.rules:
            return []
        if ruleset.stateful and self._state_loader is not None:
            await self._load_unseen(events)
        outcome, changes = await self._call(self._evaluate, ruleset, events)
        self._state_changes.extend(changes)
        self._stats.record(ruleset, outcome)
        if self._traces:
            self._traces.record(ruleset, outcome)
        return outcome.matches

    def _evaluate(
        self, ruleset: Ruleset, events: Sequence[Event]
    ) -> tuple[BatchOutcome, list[StateRow]]:
        """Evaluate on the Lua thread (``events`` and the windows they or the clock closed),
        and take the state the batch changed there too."""
        windows = self._windows
        if windows:
            now = time.time()
            closed = windows.add(events, now)
            outcome = evaluate_closed(ruleset, events, closed, now)
            index = ruleset.index
            spent = {index[r]: s for r, s in windows.seconds.items() if r in index}
            outcome.window_seconds = spent
            outcome.elapsed += sum(spent.values())  # the rules' cost includes the windows'
        else:
            outcome = evaluate_closed(ruleset, events, (), 0.0)
        changes = self._quarantine_rows(ruleset, outcome)
        if ruleset.stateful:
            versions = self._versions
            prints = ruleset.fingerprints
            for change in ruleset.sandbox.host.take_state_changes().values():
                rule_id, device, data = change[1], change[2], change[3]
                stamp = prints.get(rule_id)
                if stamp is None:
                    continue
                if not data:  # evicted from memory; with other instances it may be theirs now
                    versions.pop((rule_id, device), None)
                    if not self._every_batch:
                        changes.append(StateRow(rule_id, "script", device, stamp, None))
                    continue
                version = versions[rule_id, device] = versions.get((rule_id, device), 0) + 1
                value = state_value(data.items())
                changes.append(StateRow(rule_id, "script", device, stamp, value, version))
        return outcome, changes

    @staticmethod
    def _quarantine_rows(ruleset: Ruleset, outcome: BatchOutcome) -> list[StateRow]:
        """The state rows of the rules ``outcome`` quarantined."""
        rows = []
        for rule_index in outcome.quarantined:
            rule = ruleset.rules[rule_index - 1]
            at = {"at": time.time()}
            rows.append(StateRow(rule.id, "quarantine", "", fingerprint(rule), at))
        return rows

    async def close_windows(self, now: float | None = None) -> list[RuleMatch]:
        """Close the windows due at ``now`` (default: the clock), evaluate their ``when`` and
        return the matches; the pipeline's timer calls it, so windows close without events."""
        if not self._windows:
            return []
        _sandbox, _cache, ruleset = self._require()
        outcome = await self._call(self._close_due, ruleset, now)
        if outcome.evaluations or outcome.failures:
            self._state_changes.extend(self._quarantine_rows(ruleset, outcome))
            self._stats.record(ruleset, outcome)
            if self._traces:
                self._traces.record(ruleset, outcome)
        return outcome.matches

    def _close_due(self, ruleset: Ruleset, now: float | None) -> BatchOutcome:
        at = time.time() if now is None else now
        closed = self._windows.due(at)
        if not closed:
            return BatchOutcome()
        return evaluate_closed(ruleset, (), closed, at)

    # ------------------------------------------------------------------ window state

    @property
    def has_windows(self) -> bool:
        """Return whether the active ruleset has window rules."""
        return bool(self._windows)

    def take_state_changes(self) -> list[StateRow]:
        """The rule state changed since the last call (script state per device, quarantine):
        the rows to commit with the batch's alerts."""
        changes, self._state_changes = self._state_changes, []
        # One packed row per group key a batch or the clock touched (not one per rule); also
        # once the last window rule is gone, so its groups' rows are deleted.
        changes.extend(pack_windows(self._windows.take_changed_keys(), self._windows.parts))
        if changes:
            kinds = Counter(row.kind for row in changes)
            for kind, count in kinds.items():
                metrics.RULE_STATE_WRITES.labels(kind=kind).inc(count)
        return changes

    def load_state_with(self, loader: StateLoader, *, every_batch: bool = False) -> None:
        """Read the stored state of devices first seen here through ``loader`` before their
        batch; with ``every_batch`` (instances share devices) read every batch's devices
        and take what another instance wrote since (a newer version) over what this one
        holds, and let a device evicted from memory keep its row."""
        self._state_loader = loader
        self._every_batch = every_batch

    async def _load_unseen(self, events: Sequence[Event]) -> None:
        if self._every_batch:
            await self._load_newer(events)
            return
        seen = self._seen_devices
        unseen = {e.device_id for e in events if e.device_id is not None} - seen
        if not unseen or self._state_loader is None:
            return
        rows = await self._state_loader(unseen)
        if len(seen) + len(unseen) > _SEEN_DEVICES:
            seen.clear()
        seen.update(unseen)
        if rows:
            used = await self._call(self._restore, rows, False)
            metrics.RULE_STATE_LOADED.labels(when="first_sight").inc(used)

    async def _load_newer(self, events: Sequence[Event]) -> None:
        """Replace the state of the batch's devices that another instance wrote since."""
        assert self._state_loader is not None
        devices = {e.device_id for e in events if e.device_id is not None}
        if not devices:
            return
        versions = self._versions
        newer = [
            row
            for row in await self._state_loader(devices)
            if row.version > versions.get((row.rule_id, row.key), 0)
        ]
        if newer:
            used = await self._call(self._restore, newer, False, True)
            metrics.RULE_STATE_LOADED.labels(when="newer").inc(used)

    async def restore_state(self, rows: Sequence[StateRow]) -> int:
        """Load stored state (at start): script state of matching rules, window rules' open
        windows, and quarantines.
        Rows whose rule is gone or changed are ignored; return how many were used."""
        used = await self._call(self._restore, rows, True)
        metrics.RULE_STATE_LOADED.labels(when="start").inc(used)
        return used

    def _restore(self, rows: Sequence[StateRow], quarantines: bool, replace: bool = False) -> int:
        """Put stored rows into the ruleset: script state (over what is held with
        ``replace``, else only where nothing is), and quarantines."""
        sandbox, _cache, ruleset = self._require()
        used = 0
        for row in unpack_windows(rows):
            rule_index = ruleset.index.get(row.rule_id)
            if rule_index is None or not isinstance(row.value, (dict, list)):
                continue
            rule = ruleset.rules[rule_index - 1]
            if row.fingerprint != fingerprint(rule):
                continue
            if row.kind == "script":
                if not replace and sandbox.host.has_state(row.rule_id, row.key):
                    continue
                entries = sandbox.table(state_entries(row.value))
                load = sandbox.host.replace_state if replace else sandbox.host.seed_state
                try:
                    load(row.rule_id, row.key, entries)
                except LuaError as exc:  # beyond the state's limits now: left out
                    log.warning(
                        "stored state of rule %s for %r left out: %s", rule.id, row.key, exc
                    )
                    continue
                self._versions[row.rule_id, row.key] = row.version
                used += 1
            elif row.kind == "quarantine" and quarantines:
                if rule_index not in ruleset.quarantined:
                    ruleset.quarantine(rule_index)
                self._stats.restored_quarantine(ruleset, rule)
                used += 1
            elif row.kind == "window" and quarantines:
                used += self._windows.restore([row])
        return used

    @property
    def tracing(self) -> bool:
        """Whether a rule trace is open (and batches are handed to it)."""
        return bool(self._traces)

    async def trace(self, rule_id: str, count: int, timeout_s: float) -> dict[str, Any]:
        """Return the next ``count`` evaluations of active rule ``rule_id`` on live traffic
        (``complete`` false if ``timeout_s`` ran out first); see ``flux.rules.trace``."""
        _sandbox, _cache, ruleset = self._require()
        if rule_id not in ruleset.index:
            raise NotFound(f"no active rule {rule_id!r}", rule_id=rule_id)
        return await self._traces.trace(rule_id, count, timeout_s)

    # ------------------------------------------------------------------ single rules

    async def check_rule(self, rule: Rule) -> None:
        """Raise ``RuleValidationError``/``RuleCompileError`` if ``rule`` cannot go live."""
        sandbox, _cache, _ruleset = self._require()
        await self._call(validate_rule, sandbox, rule, self._plugin_names(), self._known_sinks)

    async def test_rule(
        self,
        rule: Rule,
        payload: dict[str, Any],
        topic: str | None = None,
        *,
        device_id: str | None = None,
        state: dict[str, Any] | None = None,
        received_at: float | None = None,
    ) -> RuleTestResult:
        """Evaluate ``rule`` once against ``payload`` (a compile error is returned, not raised).

        The rule runs with its own empty ``state`` (seeded from ``state``), never the live one.
        """
        sandbox, _cache, _ruleset = self._require()
        if rule.window is not None:
            event = TimedEvent(payload=payload, ts=received_at or time.time(), device_id=device_id)
            windowed = await self.test_window_rule(rule, [event], topic=topic, close_open=True)
            return windowed.as_single()
        return await self._call(
            run_test,
            sandbox,
            rule,
            payload,
            topic=topic,
            device_id=device_id,
            state=state,
            received_at=received_at,
            fuse=self._fuse,
        )

    async def test_window_rule(
        self,
        rule: Rule,
        events: Sequence[TimedEvent],
        *,
        topic: str | None = None,
        close_open: bool = False,
    ) -> WindowTestResult:
        """Feed ``events`` (each with its arrival time ``ts``) to a fresh copy of a window rule;
        return the windows that closed (all still open ones too with ``close_open``)."""
        sandbox, _cache, _ruleset = self._require()
        return await self._call(
            run_window_test, sandbox, rule, events, topic=topic, close_open=close_open
        )


__all__ = ["ReloadReport", "RuleEngine", "RuleSource", "StateLoader"]
