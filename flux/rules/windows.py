"""Window rules: each group's open windows, their running aggregates, and the windows that close.

A window rule (``Rule.window``) keeps, per group key (the device, a payload field, or one
group), its open windows. A window is a flat list: start, end, event count, first and last
event time, then the slots its ``select`` needs (a count, a sum, a minimum ...). The update of
those slots is a function generated once per rule from its ``select``, so an event costs one
call per matching window rule, not a loop over aggregates.

Windows close when an event closes them (count windows, a session gap) or when the clock
passes their end plus ``allowed_lateness_s``: ``WindowStore.due`` is called with the time at
every batch and by the pipeline's timer. A closed window becomes a ``ClosedWindow`` (its
output), which the engine evaluates against the rule's ``when`` and turns into a match.

Everything here runs on the engine's Lua thread; nothing is thread-safe on its own.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from flux.events import Event, json_bytes, new_event_id
from flux.rules import metrics
from flux.rules.batch import BatchOutcome, evaluate
from flux.rules.model import Rule
from flux.rules.ruleset import Ruleset
from flux.rules.state import StateRow, fingerprint
from flux.topics import TopicMatcher

#: Positions in a window's list: its bounds, events, first and last event time.
_START, _END, _N, _FIRST_T, _LAST_T = range(5)
_FIXED = 5
#: Topics whose matching window rules are remembered; beyond that the memo starts again.
_TOPIC_PLANS = 65_536
#: Changed keys kept for ``WindowStore.take_changed_keys()`` before stale ones are
#: forgotten, per group cap.
_CHANGED_SLACK = 2

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
#: Why an event was not added to any window (``flux_window_events_dropped_total``).
DROP_REASONS = ("late", "no_time", "no_group")

Meta = tuple[str, str | None, str | None, int]


class ClosedWindow(NamedTuple):
    """A window that closed: its rule, group key, output, and the group's last event."""

    rule_id: str
    key: str
    output: dict[str, Any]
    topic: str
    device_id: str | None
    event_id: str | None
    hops: int


class _Layout(NamedTuple):
    """Where each aggregate lives in a window's list, and the generated update function."""

    width: int
    update: Callable[[list[Any], dict[str, Any], float], None]
    outputs: tuple[tuple[str, str, int, int], ...]  # name, function, slot, numbers' slot


def _layout(rule: Rule) -> _Layout:
    """Give each (field, statistic) a slot; generate ``update(window, payload, t)`` for them."""
    slots: dict[tuple[str, str], int] = {}

    def slot(name: str, stat: str) -> int:
        return slots.setdefault((name, stat), _FIXED + len(slots))

    outputs: list[tuple[str, str, int, int]] = []
    for name, function, field in rule.aggregates:
        if field is None:
            outputs.append((name, function, _N, -1))
        elif function == "count":
            outputs.append((name, function, slot(field, "present"), -1))
        elif function in ("first", "last"):
            outputs.append((name, function, slot(field, function), -1))
        else:
            numbers = slot(field, "numbers")
            stat = "sum" if function == "avg" else function
            outputs.append((name, function, slot(field, stat), numbers))
    lines = [
        "def update(w, p, t):",
        "    w[2] += 1",
        "    if t < w[3]: w[3] = t",
        "    if t > w[4]: w[4] = t",
    ]
    for field in dict.fromkeys(name for name, _stat in slots):
        stats = {stat: index for (name, stat), index in slots.items() if name == field}
        lines += [f"    v = p.get({field!r})", "    if v is not None:"]
        if "present" in stats:
            lines.append(f"        w[{stats['present']}] += 1")
        if "first" in stats:
            lines.append(f"        if w[{stats['first']}] is None: w[{stats['first']}] = v")
        if "last" in stats:
            lines.append(f"        w[{stats['last']}] = v")
        if "numbers" in stats:
            n = stats["numbers"]
            lines += [
                "        c = v.__class__",
                "        if c is float or c is int:",
                f"            w[{n}] += 1",
            ]
            if "sum" in stats:
                lines.append(f"            w[{stats['sum']}] += v")
            for stat, op in (("min", "<"), ("max", ">")):
                if stat in stats:
                    i = stats[stat]
                    lines.append(f"            if w[{n}] == 1 or v {op} w[{i}]: w[{i}] = v")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), f"<window {rule.id}>", "exec"), namespace)
    return _Layout(_FIXED + len(slots), namespace["update"], tuple(outputs))


def _empty(layout: _Layout, rule: Rule, start: float, end: float, t: float) -> list[Any]:
    """A new window: counters at 0, sums at 0, first/last/min/max unset (``None``)."""
    window: list[Any] = [start, end, 0, t, t]
    window.extend(None for _ in range(layout.width - _FIXED))
    for _name, function, index, numbers in layout.outputs:
        if function in ("count", "sum", "avg") and index >= _FIXED:
            window[index] = 0
        if numbers >= 0:
            window[numbers] = 0
    return window


class _NoMetric:
    """Stands in for a metric series where nothing is counted."""

    def inc(self, amount: float = 1) -> None:
        """Count nothing."""

    def set(self, value: float) -> None:
        """Record nothing."""


_NO_METRIC = _NoMetric()


class _Group:
    """One group's open windows (start -> window) and the last event that reached it."""

    __slots__ = ("last", "meta", "windows")

    def __init__(self) -> None:
        self.windows: dict[float, list[Any]] = {}
        self.last: Event | None = None
        self.meta: Meta = ("", None, None, 0)

    def last_meta(self) -> Meta:
        event = self.last
        if event is not None:
            return (event.topic, event.device_id, event.id, event.hops)
        return self.meta


class RuleWindows:
    """The open windows of one window rule, by group key, bounded by ``max_groups``."""

    def __init__(self, rule: Rule, *, count: bool = True) -> None:
        window = rule.window
        assert window is not None
        self.rule = rule
        self.fingerprint = fingerprint(rule)
        self.kind = window.type
        self.size = float(getattr(window, "size_s", 0.0))
        self.every = float(getattr(window, "every_s", self.size))
        self.size_n = int(getattr(window, "size_n", 0))
        self.gap = float(getattr(window, "gap_s", 0.0))
        self.lateness = rule.allowed_lateness_s
        self.layout = _layout(rule)
        self.groups: dict[str, _Group] = {}
        self.changed: set[str] = set()
        self.open_windows = 0
        self._heap: list[tuple[float, int, str, float]] = []
        self._seq = itertools.count()
        #: Events not counted, by reason, since this rule's windows started.
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        #: Groups evicted at the cap.
        self.evicted = 0
        self._m_open: Any = _NO_METRIC
        self._m_emitted: Any = _NO_METRIC
        self._m_evicted: Any = _NO_METRIC
        self._m_dropped: dict[str, Any] = dict.fromkeys(DROP_REASONS, _NO_METRIC)
        if count:  # a rule test counts nothing in the live series
            self._m_open = metrics.WINDOWS_OPEN.labels(rule=rule.id)
            self._m_emitted = metrics.WINDOWS_EMITTED.labels(rule=rule.id)
            self._m_evicted = metrics.WINDOW_GROUPS_EVICTED.labels(rule=rule.id)
            self._m_dropped = {
                reason: metrics.WINDOW_EVENTS_DROPPED.labels(rule=rule.id, reason=reason)
                for reason in DROP_REASONS
            }

    # -- events ---------------------------------------------------------------------------

    def spans(self, t: float) -> list[tuple[float, float]]:
        """Return the (start, end) of the tumbling or hopping windows that hold time ``t``."""
        size, every = self.size, self.every
        if self.kind == "tumbling":
            start = math.floor(t / size) * size
            return [(start, start + size)]
        last = math.floor(t / every)
        first = math.floor((t - size) / every) + 1
        found = []
        for k in range(first, last + 1):
            start = k * every
            if start <= t < start + size:
                found.append((start, start + size))
        return found

    def add(self, events: Sequence[Event], now: float) -> list[ClosedWindow]:
        """Add ``events`` (processing time ``now``) to their groups' windows; return those that
        closed (count windows that filled, sessions a later event ended)."""
        closed: list[ClosedWindow] = []
        rule = self.rule
        by_device = rule.group_by == "device_id"
        group_field = rule.group_by
        time_field = rule.time_field
        update = self.layout.update
        groups = self.groups
        changed = self.changed
        kind = self.kind
        timed = kind in ("tumbling", "hopping")
        fixed_spans = self.spans(now) if timed and time_field is None else None
        late = no_time = no_group = 0
        opened = self.open_windows
        if fixed_spans is not None and len(fixed_spans) == 1 and by_device:
            # The common case (a processing-time tumbling window per device), kept lean.
            start, end = fixed_spans[0]
            for event in events:
                key = event.device_id
                if key is None:
                    no_group += 1
                    continue
                group = groups.get(key)
                if group is None:
                    group = self._new_group(key)
                window = group.windows.get(start)
                if window is None:
                    window = self._open(group, key, start, end, now)
                update(window, event.payload, now)
                group.last = event
                changed.add(key)
            events = ()
        for event in events:
            payload = event.payload
            if by_device:
                key = event.device_id
            elif group_field:
                value = payload.get(group_field)
                key = value if value.__class__ is str else _key_text(value)
            else:
                key = ""
            if key is None:
                no_group += 1
                continue
            t: Any = now
            if time_field is not None:
                t = payload.get(time_field)
                if t.__class__ is not float and t.__class__ is not int:
                    no_time += 1
                    continue
            group = groups.get(key)
            if timed:
                spans = fixed_spans if fixed_spans is not None else self.spans(t)
                if spans[-1][1] + self.lateness <= now:
                    late += 1
                    continue
                if group is None:
                    group = self._new_group(key)
                windows = group.windows
                for start, end in spans:
                    window = windows.get(start)
                    if window is None:
                        if end + self.lateness <= now:
                            continue  # this one closed; the event counts in the later ones
                        window = self._open(group, key, start, end, t)
                    update(window, payload, t)
            elif kind == "session":
                if time_field is not None and t + self.gap + self.lateness <= now:
                    late += 1
                    continue
                if group is None:
                    group = self._new_group(key)
                window = next(iter(group.windows.values()), None)
                if window is not None and t - window[_LAST_T] >= self.gap:
                    closed.append(self._close(key, group, window[_START]))
                    window = None
                if window is None:
                    if key not in groups:
                        groups[key] = group
                    window = self._open(group, key, t, t + self.gap, t)
                update(window, payload, t)
            else:
                if group is None:
                    group = self._new_group(key)
                window = next(iter(group.windows.values()), None)
                if window is None:
                    window = self._open(group, key, t, t, t)
                update(window, payload, t)
                if window[_N] >= self.size_n:
                    group.last = event
                    closed.append(self._close(key, group, window[_START]))
                    changed.add(key)
                    continue
            group.last = event
            changed.add(key)
        if late or no_time or no_group:
            for reason, number in (("late", late), ("no_time", no_time), ("no_group", no_group)):
                if number:
                    self.dropped[reason] += number
                    self._m_dropped[reason].inc(number)
        if self.open_windows != opened or closed:
            self._m_open.set(self.open_windows)
        if closed:
            self._m_emitted.inc(len(closed))
        self._bound_changed()
        return closed

    def _new_group(self, key: str) -> _Group:
        """Add a group, first evicting the oldest (its open windows are dropped) at the cap."""
        groups = self.groups
        if len(groups) >= self.rule.max_groups:
            oldest = next(iter(groups))
            self.open_windows -= len(groups.pop(oldest).windows)
            self.changed.add(oldest)
            self.evicted += 1
            self._m_evicted.inc()
        group = groups[key] = _Group()
        return group

    def _open(self, group: _Group, key: str, start: float, end: float, t: float) -> list[Any]:
        window = _empty(self.layout, self.rule, start, end, t)
        group.windows[start] = window
        self.open_windows += 1
        if self.kind != "count":
            heapq.heappush(self._heap, (self._close_at(window), next(self._seq), key, start))
        return window

    def follow(self, rule: Rule) -> None:
        """Take a reloaded rule of the same fingerprint (its when, actions or limits may
        differ); a new ``allowed_lateness_s`` moves the open windows' closing times."""
        self.rule = rule
        if rule.allowed_lateness_s != self.lateness:
            self.lateness = rule.allowed_lateness_s
            self._heap = [
                (self._close_at(window), next(self._seq), key, start)
                for key, group in self.groups.items()
                for start, window in group.windows.items()
            ]
            heapq.heapify(self._heap)

    def _close_at(self, window: list[Any]) -> float:
        """Return when ``window`` closes on the clock (count windows never do)."""
        if self.kind == "session":
            return float(window[_LAST_T]) + self.gap + self.lateness
        return float(window[_END]) + self.lateness

    # -- closing --------------------------------------------------------------------------

    def due(self, now: float) -> list[ClosedWindow]:
        """Close and return every window whose end (plus lateness) is at or before ``now``."""
        heap = self._heap
        if not heap or heap[0][0] > now:
            return []
        closed: list[ClosedWindow] = []
        groups = self.groups
        while heap and heap[0][0] <= now:
            _at, _seq, key, start = heapq.heappop(heap)
            group = groups.get(key)
            window = group.windows.get(start) if group is not None else None
            if group is None or window is None:
                continue  # closed already, or evicted
            real = self._close_at(window)
            if real > now:  # a session that events kept open
                heapq.heappush(heap, (real, next(self._seq), key, start))
                continue
            closed.append(self._close(key, group, start))
        self._m_open.set(self.open_windows)
        if closed:
            self._m_emitted.inc(len(closed))
        return closed

    def flush(self) -> list[ClosedWindow]:
        """Close every open window now, whatever its end (rule tests use it)."""
        closed = [
            self._close(key, group, start)
            for key, group in list(self.groups.items())
            for start in list(group.windows)
        ]
        self._heap.clear()
        self._m_open.set(self.open_windows)
        if closed:
            self._m_emitted.inc(len(closed))
        return closed

    def _close(self, key: str, group: _Group, start: float) -> ClosedWindow:
        window = group.windows.pop(start)
        self.open_windows -= 1
        if not group.windows:
            self.groups.pop(key, None)
        self.changed.add(key)
        topic, device_id, event_id, hops = group.last_meta()
        if self.rule.group_by != "device_id":
            device_id = None  # a window of many devices is no one device's
        output = self.output(key, window)
        return ClosedWindow(self.rule.id, key, output, topic, device_id, event_id, hops)

    def output(self, key: str, window: list[Any]) -> dict[str, Any]:
        """Return a window's match output: the selected values, its bounds and group key."""
        result: dict[str, Any] = {}
        for name, function, index, numbers in self.layout.outputs:
            value = window[index]
            if function in ("sum", "avg", "min", "max") and not window[numbers]:
                value = None
            elif function == "avg":
                value = value / window[numbers]
            elif function == "sum" and value.__class__ is int and not _I64_MIN <= value <= _I64_MAX:
                value = float(value)  # JSON (and Lua) integers stop at 64 bits
            result[name] = value
        if self.kind == "session":
            result["window_start"] = window[_FIRST_T]
            result["window_end"] = window[_LAST_T] + self.gap
        elif self.kind == "count":
            result["window_start"] = window[_FIRST_T]
            result["window_end"] = window[_LAST_T]
        else:
            result["window_start"] = window[_START]
            result["window_end"] = window[_END]
        if self.rule.group_by:
            result[self.rule.group_by] = key
        return result

    # -- state rows -----------------------------------------------------------------------

    def _bound_changed(self) -> None:
        """Without a reader of ``take_changed_keys()``, forget keys that no longer have windows."""
        limit = _CHANGED_SLACK * self.rule.max_groups + 1024
        if len(self.changed) > limit:
            self.changed.intersection_update(self.groups)

    def value(self, key: str) -> dict[str, Any] | None:
        """Return group ``key``'s open windows as stored (None when it has none); the
        windows in it are the live ones: encode or copy them before the next ``add``."""
        group = self.groups.get(key)
        if group is None or not group.windows:
            return None
        return {"windows": list(group.windows.values()), "meta": list(group.last_meta())}

    def restore(self, row: StateRow) -> bool:
        """Load one group's windows from ``row``; return whether it was taken."""
        value = row.value
        if row.fingerprint != self.fingerprint or not isinstance(value, dict):
            return False
        windows = value.get("windows")
        meta = value.get("meta")
        if not isinstance(windows, list) or not isinstance(meta, list) or len(meta) != 4:
            return False
        if not all(isinstance(w, list) and len(w) == self.layout.width for w in windows):
            return False
        group = self.groups.get(row.key)
        if group is None:
            group = self._new_group(row.key)
        else:
            self.open_windows -= len(group.windows)
            group.windows.clear()
        group.meta = (str(meta[0]), meta[1], meta[2], int(meta[3]))
        group.last = None
        for window in windows:
            start = window[_START]
            group.windows[start] = list(window)
            self.open_windows += 1
            if self.kind != "count":
                entry = (self._close_at(window), next(self._seq), row.key, start)
                heapq.heappush(self._heap, entry)
        self._m_open.set(self.open_windows)
        return True

    def forget_metrics(self) -> None:
        """Drop this rule's window series (the rule is gone)."""
        metrics.forget_window_rule(self.rule.id)


def _key_text(value: Any) -> str | None:
    """Return a group key for a payload value: numbers as text, anything else has none."""
    if value.__class__ in (int, float):
        return str(value)
    return None


class WindowStore:
    """The open windows of every window rule in the active ruleset."""

    def __init__(self) -> None:
        self._rules: dict[str, RuleWindows] = {}
        self._matcher = TopicMatcher([])
        self._order: list[RuleWindows] = []
        self._plans: dict[str, tuple[RuleWindows, ...]] = {}
        #: Group keys of windows dropped by a reload (their rows must be written again).
        self._deleted: set[str] = set()
        #: Seconds each rule's windows took over the last ``add``'s events, by rule id.
        self.seconds: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def get(self, rule_id: str) -> RuleWindows | None:
        """Return the windows of rule ``rule_id``, if it is a live window rule."""
        return self._rules.get(rule_id)

    def sync(self, rules: Iterable[Rule]) -> None:
        """Follow a reload: keep a rule's windows when its fingerprint is unchanged, else
        start it empty; the groups of dropped windows come out of ``take_changed_keys()``."""
        kept: dict[str, RuleWindows] = {}
        for rule in rules:
            if rule.window is None:
                continue
            old = self._rules.get(rule.id)
            if old is not None and old.fingerprint == fingerprint(rule):
                old.follow(rule)
                kept[rule.id] = old
            else:
                kept[rule.id] = RuleWindows(rule)
        for rule_id, old in self._rules.items():
            if kept.get(rule_id) is not old:
                self._deleted |= old.groups.keys() | old.changed
                if rule_id not in kept:
                    old.forget_metrics()
        self._rules = kept
        self._order = list(kept.values())
        self._matcher = TopicMatcher([windows.rule.topic for windows in self._order])
        self._plans = {}

    def _plan(self, topic: str) -> tuple[RuleWindows, ...]:
        order = self._order
        plan = tuple(order[index] for index in self._matcher.match(topic))
        if len(self._plans) >= _TOPIC_PLANS:
            self._plans.clear()
        self._plans[topic] = plan
        return plan

    def add(self, events: Sequence[Event], now: float) -> list[ClosedWindow]:
        """Close what is due at ``now``, then add ``events`` to the windows of the rules whose
        topic filter they match; return every window that closed."""
        closed = self.due(now)
        buckets: dict[tuple[RuleWindows, ...], list[Event]] = {}
        plans = self._plans
        for event in events:
            plan = plans.get(event.topic)
            if plan is None:
                plan = self._plan(event.topic)
            if plan:
                bucket = buckets.get(plan)
                if bucket is None:
                    buckets[plan] = [event]
                else:
                    bucket.append(event)
        per_rule: dict[RuleWindows, list[Event]]
        if len(buckets) == 1:
            [(plan, bucket)] = buckets.items()
            per_rule = dict.fromkeys(plan, bucket)
        else:
            per_rule = {}
            for plan, bucket in buckets.items():
                for windows in plan:
                    per_rule.setdefault(windows, []).extend(bucket)
        seconds = self.seconds = {}
        clock = time.perf_counter
        for windows, bucket in per_rule.items():
            started = clock()
            closed.extend(windows.add(bucket, now))
            seconds[windows.rule.id] = clock() - started
        return closed

    def due(self, now: float) -> list[ClosedWindow]:
        """Close and return every window due at ``now``."""
        closed: list[ClosedWindow] = []
        for windows in self._order:
            closed.extend(windows.due(now))
        return closed

    def take_changed_keys(self) -> list[str]:
        """Return the group keys whose windows changed (in any rule, or with a rule gone)
        since the last call, and forget them: what ``pack_windows`` writes."""
        keys = dict.fromkeys(self._deleted)
        self._deleted = set()
        for windows in self._order:
            if windows.changed:
                keys.update(dict.fromkeys(windows.changed))
                windows.changed.clear()
        return list(keys)

    def parts(self, key: str) -> dict[str, dict[str, Any]]:
        """Every window rule's open windows of group ``key`` (rule id -> fingerprint and
        value; live windows, see ``RuleWindows.value``)."""
        parts = {}
        for windows in self._order:
            value = windows.value(key)
            if value is not None:
                parts[windows.rule.id] = {"fingerprint": windows.fingerprint, "value": value}
        return parts

    def restore(self, rows: Iterable[StateRow]) -> int:
        """Load window rows of live rules whose fingerprint matches; return how many loaded."""
        loaded = 0
        for row in rows:
            windows = self._rules.get(row.rule_id)
            if row.kind == "window" and windows is not None and windows.restore(row):
                loaded += 1
        return loaded


def evaluate_closed(
    ruleset: Ruleset, events: Sequence[Event], closed: Sequence[ClosedWindow], now: float
) -> BatchOutcome:
    """Evaluate ``events`` and the ``when`` of each closed window in one pass over the ruleset.

    A closed window is evaluated as an event of its own on the rule's internal topic, with
    its output as the payload; its match then carries the group's last topic, and the output.
    """
    if not closed:
        return evaluate(ruleset, events)
    window_events: dict[int, Event] = {}
    topics: list[tuple[Event, str]] = []
    for item in closed:
        topic = ruleset.window_topics.get(item.rule_id)
        if topic is None:
            continue  # the rule left with a reload while its window closed
        event = Event(
            id=item.event_id or new_event_id(),
            topic=topic,
            device_id=item.device_id,
            payload=item.output,
            raw=json_bytes(item.output),  # what a plugin taking raw input reads
            received_at=now,
            source="derived",
            hops=item.hops,
        )
        window_events[id(event)] = event
        topics.append((event, item.topic))
    outcome = evaluate(ruleset, [*events, *window_events.values()])
    for event, topic in topics:
        event.topic = topic
    if window_events:
        matches = outcome.matches
        for position, match in enumerate(matches):
            if id(match.event) in window_events:
                matches[position] = match._replace(output=match.event.payload)
    return outcome


__all__ = [
    "DROP_REASONS",
    "ClosedWindow",
    "RuleWindows",
    "WindowStore",
    "evaluate_closed",
    "fingerprint",
]
