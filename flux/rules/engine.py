"""The rules engine: holds the active compiled ruleset and evaluates batches of events against it.

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
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, ParamSpec, TypeVar

import orjson

from flux.coalesce import Coalescer
from flux.events import Event, device_id_for, new_event_id
from flux.rules import metrics
from flux.rules.compiler import (
    RULE_CODE,
    CompileCache,
    CompiledRule,
    Ruleset,
    compile_rule,
    to_python,
)
from flux.rules.errors import ERROR_KINDS, RuleError, RuleRuntimeError, RuleValidationError
from flux.rules.model import Rule, check_plugins, check_sinks
from flux.rules.sandbox import (
    DEFAULT_INSTRUCTION_BUDGET,
    DEFAULT_MAX_STATE_DEVICES,
    DEFAULT_MAX_STATE_KEYS,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIME_LIMIT_S,
    LuaSandbox,
)

log = logging.getLogger(__name__)

_RULE_BITS = RULE_CODE.bit_length() - 1
_RULE_MASK = RULE_CODE - 1

P = ParamSpec("P")
T = TypeVar("T")

RuleSource = Iterable[Rule] | Callable[[], Awaitable[Iterable[Rule]]]
Status = Literal["active", "quarantined", "error", "disabled"]


class RuleMatch(NamedTuple):
    """A rule matched an event; ``output`` is the table a ``script`` returned (else ``None``)."""

    rule: Rule
    event: Event
    output: dict[str, Any] | None
    ruleset_version: int


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """One failed evaluation: which rule, on which event, what kind, where in the rule's source."""

    rule_id: str
    kind: str
    message: str
    line: int | None
    event_id: str | None
    at: float

    def to_error(self) -> RuleError:
        """Return the matching ``RuleError`` (``RuleTimeout``, ``RuleMemoryError``, ...)."""
        cls = ERROR_KINDS.get(self.kind, RuleRuntimeError)
        return cls(self.message, rule_id=self.rule_id, line=self.line, event_id=self.event_id)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "rule_id": self.rule_id,
            "kind": self.kind,
            "message": self.message,
            "line": self.line,
            "event_id": self.event_id,
            "at": self.at,
        }


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


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    """The outcome of evaluating one rule against one sample payload."""

    rule_id: str
    matched: bool
    output: dict[str, Any] | None
    elapsed_s: float
    error: RuleError | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "rule_id": self.rule_id,
            "matched": self.matched,
            "output": self.output,
            "elapsed_s": self.elapsed_s,
            "error": self.error.to_dict() if self.error else None,
        }


@dataclass(slots=True)
class RuleStatus:
    """A rule as the API shows it: definition, status and counters since the engine started."""

    id: str
    status: Status
    rule: Rule | None
    evaluations: int = 0
    matches: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "id": self.id,
            "status": self.status,
            "rule": self.rule.model_dump(mode="json") if self.rule else None,
            "evaluations": self.evaluations,
            "matches": self.matches,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class _Stats:
    evaluations: int = 0
    matches: int = 0
    failures: int = 0
    last_error: RuleFailure | None = None
    children: tuple[Any, Any] | None = None


@dataclass(slots=True)
class _Outcome:
    matches: list[RuleMatch] = field(default_factory=list)
    failures: list[tuple[int, RuleFailure]] = field(default_factory=list)
    undefined: dict[int, int] = field(default_factory=dict)
    quarantined: list[int] = field(default_factory=list)
    evaluations: dict[int, int] = field(default_factory=dict)
    matched: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0


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
        self._load_errors: dict[str, RuleError] = {}
        self._disabled: dict[str, Rule] = {}
        self._quarantined: dict[str, tuple[str, int, str]] = {}
        self._stats: dict[str, _Stats] = {}
        self._tests = 0

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
        metrics.RULES_ACTIVE.set(0)
        metrics.RULES_QUARANTINED.set(0)

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run Lua work on the engine's Lua thread (the loop, or the single worker)."""
        if self._executor is None:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _require(self) -> tuple[LuaSandbox, CompileCache, Ruleset]:
        if self._closed or self._sandbox is None or self._cache is None or self._ruleset is None:
            from flux.errors import NotReady

            raise NotReady("the rules engine is not running")
        return self._sandbox, self._cache, self._ruleset

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
        result: list[RuleStatus] = []
        ruleset = self._ruleset
        if ruleset is not None:
            for k, rule in enumerate(ruleset.rules, start=1):
                status: Status = "quarantined" if k in ruleset.quarantined else "active"
                result.append(self._status(rule.id, status, rule, ruleset.lua_F[k]))
        for rule_id, rule in self._disabled.items():
            result.append(self._status(rule_id, "disabled", rule, 0))
        for rule_id, error in self._load_errors.items():
            status_ = self._status(rule_id, "error", None, 0)
            status_.last_error = error.to_dict()
            result.append(status_)
        return sorted(result, key=lambda s: s.id)

    def status(self, rule_id: str) -> RuleStatus | None:
        """Return the status of one rule, or ``None`` if the engine does not know it."""
        for item in self.rules():
            if item.id == rule_id:
                return item
        return None

    def _status(
        self, rule_id: str, status: Status, rule: Rule | None, consecutive: Any
    ) -> RuleStatus:
        stats = self._stats.get(rule_id) or _Stats()
        return RuleStatus(
            id=rule_id,
            status=status,
            rule=rule,
            evaluations=stats.evaluations,
            matches=stats.matches,
            failures=stats.failures,
            consecutive_failures=int(consecutive or 0),
            last_error=stats.last_error.to_dict() if stats.last_error else None,
        )

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
            if source is None:
                rules: list[Rule] = []
            elif callable(source):
                rules = list(await source())
            else:
                rules = list(source)
            known = self._known_plugins() if callable(self._known_plugins) else self._known_plugins
            prepared = await self._call(self._prepare, rules, set(known))
        except Exception:
            metrics.RULES_RELOAD.labels(result="failed").inc()
            raise
        compiled, disabled, errors, fresh, reused = prepared
        quarantined = {
            c.rule.id for c in compiled if self._quarantined.get(c.rule.id) == c.rule.compile_key
        }
        try:
            ruleset = await self._call(self._build, compiled, self._version + 1, quarantined)
        except Exception:
            metrics.RULES_RELOAD.labels(result="failed").inc()
            raise
        # The swap: from here on new batches see the new ruleset.
        self._version = ruleset.version
        self._ruleset = ruleset
        self._after_swap(ruleset, compiled, disabled, errors)
        await self._call(self._cleanup, ruleset, compiled, disabled)
        result: Literal["ok", "partial", "failed"] = "ok"
        if errors:
            result = "partial" if compiled or disabled else "failed"
        metrics.RULES_RELOAD.labels(result=result).inc()
        report = ReloadReport(
            version=ruleset.version,
            result=result,
            active=len(compiled) - len(ruleset.quarantined),
            disabled=len(disabled),
            quarantined=len(ruleset.quarantined),
            compiled=fresh,
            reused=reused,
            errors=tuple(errors),
            duration_s=time.perf_counter() - started,
        )
        log.info(
            "rules reloaded: version %d, %d active, %d disabled, %d quarantined, %d errors",
            report.version,
            report.active,
            report.disabled,
            report.quarantined,
            len(errors),
        )
        for error in errors:
            log.warning("rule not loaded: %s", error)
        return report

    def _prepare(
        self, rules: Sequence[Rule], known: set[str]
    ) -> tuple[list[CompiledRule], list[Rule], list[RuleError], int, int]:
        _sandbox, cache, _ruleset = self._require()
        hits, misses = cache.hits, cache.misses
        compiled: list[CompiledRule] = []
        disabled: list[Rule] = []
        errors: list[RuleError] = []
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                errors.append(
                    RuleValidationError(f"duplicate rule id {rule.id!r}", rule_id=rule.id)
                )
                continue
            seen.add(rule.id)
            try:
                check_plugins(rule, known)
                check_sinks(rule, self._known_sinks)
                item = cache.get(rule)
            except RuleError as exc:
                errors.append(exc)
                continue
            if rule.enabled:
                compiled.append(item)
            else:
                disabled.append(rule)
        return compiled, disabled, errors, cache.misses - misses, cache.hits - hits

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

    def _after_swap(
        self,
        ruleset: Ruleset,
        compiled: Sequence[CompiledRule],
        disabled: Sequence[Rule],
        errors: Sequence[RuleError],
    ) -> None:
        self._load_errors = {e.rule_id: e for e in errors if e.rule_id}
        self._disabled = {r.id: r for r in disabled}
        self._quarantined = {
            rule.id: rule.compile_key
            for k, rule in enumerate(ruleset.rules, start=1)
            if k in ruleset.quarantined
        }
        known = {c.rule.id for c in compiled} | set(self._disabled) | set(self._load_errors)
        for rule_id in [r for r in self._stats if r not in known]:
            self._forget_metrics(rule_id)
            del self._stats[rule_id]
        metrics.RULES_ACTIVE.set(len(ruleset.rules) - len(ruleset.quarantined))
        metrics.RULES_QUARANTINED.set(len(ruleset.quarantined))

    def _cleanup(
        self, ruleset: Ruleset, compiled: Sequence[CompiledRule], disabled: Sequence[Rule]
    ) -> None:
        sandbox, cache, _ = self._require()
        cache.retain([c.rule.compile_key for c in compiled] + [r.compile_key for r in disabled])
        sandbox.prune_states({r.id for r in ruleset.rules})

    def _forget_metrics(self, rule_id: str) -> None:
        for metric in (metrics.RULE_EVALUATIONS, metrics.RULE_MATCHES):
            with contextlib.suppress(KeyError):
                metric.remove(rule_id)
        for kind in ("runtime", "timeout", "memory", "undefined"):
            with contextlib.suppress(KeyError):
                metrics.RULE_ERRORS.remove(rule_id, kind)

    async def unquarantine(self, rule_id: str) -> bool:
        """Put a quarantined rule back into service (effective from the next batch)."""
        return await self._call(self._unquarantine, rule_id)

    def _unquarantine(self, rule_id: str) -> bool:
        ruleset = self._ruleset
        if ruleset is None or rule_id not in ruleset.index:
            return False
        k = ruleset.index[rule_id]
        if k not in ruleset.quarantined:
            return False
        ruleset.quarantined.discard(k)
        ruleset.lua_F[k] = 0
        ruleset.reset_plans()
        self._quarantined.pop(rule_id, None)
        metrics.RULES_ACTIVE.set(len(ruleset.rules) - len(ruleset.quarantined))
        metrics.RULES_QUARANTINED.set(len(ruleset.quarantined))
        log.info("rule %s taken out of quarantine", rule_id)
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
        outcome = await self._call(self._evaluate, ruleset, events)
        self._account(ruleset, outcome)
        return outcome.matches

    def _evaluate(self, ruleset: Ruleset, events: Sequence[Event]) -> _Outcome:
        sandbox = ruleset.sandbox
        outcome = _Outcome()
        chosen: list[Event] = []
        flat: list[Any] = []
        plans: dict[int, int] = {}
        tables: dict[int, Any] = {}
        to_lua = sandbox.runtime.table_from
        started = time.perf_counter()
        for event in events:
            plan_id, _rules = ruleset.plan(event.topic)
            if plan_id:
                chosen.append(event)
                # One table_from per payload: lupa 2.8's recursive conversion turns a repeated
                # reference to the same dict into an empty table, so shared payloads are
                # converted once and the Lua table is reused (rules cannot modify it).
                payload = event.payload
                table = tables.get(id(payload))
                if table is None:
                    # Payloads decoded from JSON never share nested objects; derived ones may.
                    safe = (
                        payload
                        if event.source != "derived"
                        else orjson.loads(orjson.dumps(payload))
                    )
                    table = tables[id(payload)] = to_lua(safe, recursive=True)
                flat.extend((table, event.topic, event.device_id, event.received_at, plan_id))
                plans[plan_id] = plans.get(plan_id, 0) + 1
        if not chosen:
            return outcome
        batch = sandbox.table(flat)
        codes, outs, errs, _ne, undef, newq = sandbox.host.run(
            ruleset.lua, batch, len(chosen), sandbox.table(list(plans))
        )
        outcome.elapsed = time.perf_counter() - started
        for plan_id, count in plans.items():
            for k in ruleset.plan_rules[plan_id]:
                outcome.evaluations[k] = outcome.evaluations.get(k, 0) + count
        rules, version = ruleset.rules, ruleset.version
        code_list: list[int] = list(codes.values())
        numbered = list(enumerate(code_list, start=1))
        if len(ruleset.groups) > 1:
            numbered.sort(key=lambda item: item[1])
        outputs = dict(outs.items()) if ruleset.has_scripts else {}
        matches = outcome.matches
        counted = outcome.matched
        for index, code in numbered:
            k = code & _RULE_MASK
            rule = rules[k - 1]
            event = chosen[(code >> _RULE_BITS) - 1]
            output: dict[str, Any] | None = None
            raw = outputs.get(index)
            if raw is not None:
                try:
                    converted = to_python(raw)
                except ValueError as exc:
                    outcome.failures.append(
                        (k, self._failure(rule.id, "runtime", f"bad output: {exc}", None, event))
                    )
                    continue
                output = converted if isinstance(converted, dict) else {"values": converted}
            matches.append(RuleMatch(rule, event, output, version))
            counted[k] = counted.get(k, 0) + 1
        record = list(errs.values())
        for pos in range(0, len(record), 6):
            i, k, kind, message, source, line = record[pos : pos + 6]
            text, mapped = ruleset.message_line(k, str(message))
            if kind != "runtime" or mapped is None:
                mapped = ruleset.rule_line(k, source, line) if mapped is None else mapped
            outcome.failures.append(
                (k, self._failure(ruleset.rules[k - 1].id, str(kind), text, mapped, chosen[i - 1]))
            )
        outcome.undefined = dict(undef.items())
        outcome.quarantined = list(newq.values())
        for k in outcome.quarantined:
            ruleset.quarantine(k)
        return outcome

    @staticmethod
    def _failure(
        rule_id: str, kind: str, message: str, line: int | None, event: Event | None
    ) -> RuleFailure:
        return RuleFailure(
            rule_id=rule_id,
            kind=kind,
            message=message,
            line=line,
            event_id=event.id if event else None,
            at=time.time(),
        )

    def _stats_for(self, rule_id: str) -> _Stats:
        stats = self._stats.get(rule_id)
        if stats is None:
            stats = self._stats[rule_id] = _Stats()
        if stats.children is None:
            stats.children = (
                metrics.RULE_EVALUATIONS.labels(rule=rule_id),
                metrics.RULE_MATCHES.labels(rule=rule_id),
            )
        return stats

    def _account(self, ruleset: Ruleset, outcome: _Outcome) -> None:
        if outcome.elapsed:
            metrics.RULE_EVAL_SECONDS.observe(outcome.elapsed)
        rules = ruleset.rules
        for k, count in outcome.evaluations.items():
            stats = self._stats_for(rules[k - 1].id)
            stats.evaluations += count
            assert stats.children is not None
            stats.children[0].inc(count)
        for k, count in outcome.matched.items():
            stats = self._stats_for(rules[k - 1].id)
            stats.matches += count
            assert stats.children is not None
            stats.children[1].inc(count)
        for k, failure in outcome.failures:
            stats = self._stats_for(failure.rule_id)
            stats.failures += 1
            first = stats.last_error is None or ruleset.lua_F[k] == 1
            stats.last_error = failure
            metrics.RULE_ERRORS.labels(rule=failure.rule_id, kind=failure.kind).inc()
            if first:
                log.warning(
                    "rule %s failed (%s) on event %s at line %s: %s",
                    failure.rule_id,
                    failure.kind,
                    failure.event_id,
                    failure.line,
                    failure.message,
                )
        for k, count in outcome.undefined.items():
            metrics.RULE_ERRORS.labels(rule=rules[k - 1].id, kind="undefined").inc(count)
        for k in outcome.quarantined:
            rule = rules[k - 1]
            self._quarantined[rule.id] = rule.compile_key
            stats = self._stats_for(rule.id)
            log.error(
                "rule %s quarantined after %d consecutive failures; last: %s",
                rule.id,
                self._quarantine_after,
                stats.last_error.message if stats.last_error else "?",
            )
        if outcome.quarantined:
            metrics.RULES_ACTIVE.set(len(rules) - len(ruleset.quarantined))
            metrics.RULES_QUARANTINED.set(len(ruleset.quarantined))

    # ------------------------------------------------------------------ single-rule tools

    async def check_rule(self, rule: Rule) -> None:
        """Raise ``RuleValidationError``/``RuleCompileError`` if ``rule`` cannot go live."""
        sandbox, _cache, _ruleset = self._require()
        known = self._known_plugins() if callable(self._known_plugins) else self._known_plugins
        check_plugins(rule, known)
        check_sinks(rule, self._known_sinks)
        await self._call(compile_rule, sandbox, rule)

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
        self._require()
        return await self._call(self._test, rule, payload, topic, device_id, state, received_at)

    def _test(
        self,
        rule: Rule,
        payload: dict[str, Any],
        topic: str | None,
        device_id: str | None,
        state: dict[str, Any] | None,
        received_at: float | None,
    ) -> RuleTestResult:
        sandbox, _cache, _ruleset = self._require()
        if topic is None:
            concrete = [
                device_id or "test-device" if p == "+" else p for p in rule.topic.split("/")
            ]
            topic = "/".join("test" if p == "#" else p for p in concrete)
        event = Event(
            id=new_event_id(),
            topic=topic,
            device_id=device_id or device_id_for(topic, payload),
            payload=payload,
            raw=b"",
            received_at=time.time() if received_at is None else received_at,
            source="http",
        )
        started = time.perf_counter()
        try:
            compiled = compile_rule(sandbox, rule)
        except RuleError as exc:
            return RuleTestResult(rule.id, False, None, time.perf_counter() - started, exc)
        self._tests += 1
        prefix = f"\x00test{self._tests}:"
        try:
            if state:
                sandbox.host.seed_state(prefix + rule.id, event.device_id, sandbox.table(state))
            ruleset = Ruleset(
                sandbox=sandbox,
                version=0,
                compiled=[compiled],
                quarantine_after=1,
                fuse=self._fuse,
                state_prefix=prefix,
            )
            outcome = self._evaluate(ruleset, [event])
        finally:
            sandbox.host.drop_state(prefix + rule.id)
        elapsed = time.perf_counter() - started
        if outcome.failures:
            return RuleTestResult(rule.id, False, None, elapsed, outcome.failures[0][1].to_error())
        if not outcome.evaluations:
            error = RuleValidationError(
                f"topic {topic!r} does not match the rule's filter {rule.topic!r}", rule_id=rule.id
            )
            return RuleTestResult(rule.id, False, None, elapsed, error)
        if outcome.matches:
            return RuleTestResult(rule.id, True, outcome.matches[0].output, elapsed)
        return RuleTestResult(rule.id, False, None, elapsed)


__all__ = [
    "ReloadReport",
    "RuleEngine",
    "RuleFailure",
    "RuleMatch",
    "RuleStatus",
    "RuleTestResult",
]
