"""Window rules: each window type, grouping, aggregates, when, event time, the clock, the cap,
reloads and the state rows (real Lua for ``when``; times are given, never waited for)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from flux.events import Event
from flux.rules import RuleEngine, RuleValidationError, load_rules_text, parse_rule
from flux.rules.model import Rule
from flux.rules.state import StateRow, fingerprint, pack_windows, unpack_windows
from flux.rules.testing import TimedEvent
from flux.rules.windows import RuleWindows, WindowStore

from .conftest import make_event, metric

T0 = 1_700_000_040.0  # a multiple of 60


def window_rule(**changes: Any) -> Rule:
    data: dict[str, Any] = {
        "id": "win",
        "topic": "devices/+/telemetry",
        "window": {"type": "tumbling", "size_s": 60},
        "select": {"avg_t": "avg(temperature)", "n": "count()"},
        "actions": [{"type": "alert"}],
    }
    data.update(changes)
    return parse_rule(data)


def ev(payload: dict[str, Any], device: str = "d1", topic: str | None = None) -> Event:
    return make_event(payload, topic or f"devices/{device}/telemetry")


def outputs(closed: list[Any]) -> list[dict[str, Any]]:
    return [c.output for c in closed]


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"window": {"type": "tumbling", "size_s": 0}}, "window.tumbling.size_s"),
        ({"window": {"type": "tumbling"}}, "window.tumbling.size_s"),
        ({"window": {"type": "hopping", "size_s": 10, "every_s": 20}}, "every_s must not exceed"),
        ({"window": {"type": "hopping", "size_s": 1000, "every_s": 1}}, "at most 100"),
        ({"window": {"type": "count", "size_n": 0}}, "window.count.size_n"),
        ({"window": {"type": "session"}}, "window.session.gap_s"),
        ({"window": {"type": "sliding", "size_s": 5}}, "'tumbling', 'hopping', 'count'"),
        ({"select": {"m": "median(temperature)"}}, "select.m: 'median(temperature)' is not"),
        ({"select": {"m": "avg()"}}, "select.m: avg() needs a payload field"),
        ({"select": {"end": "count()"}}, "'end' is reserved"),
        ({"select": {"window_start": "count()"}}, "reserved"),
        ({"select": {}}, "select: a window rule needs one"),
        ({"select": {"device_id": "count()"}}, "reserved"),
        ({"group_by": "site", "select": {"site": "count()"}}, "select.site"),
        ({"group_by": "a b"}, "group_by"),
        ({"time_field": "1ts"}, "time_field"),
        ({"allowed_lateness_s": -1}, "allowed_lateness_s"),
        ({"max_groups": 0}, "max_groups"),
        ({"script": "return true"}, "not a 'script'"),
        ({"when": "state.x"}, "cannot use 'state'"),
    ],
)
def test_bad_window_definitions_name_the_key(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(RuleValidationError) as info:
        window_rule(**change)
    assert fragment in str(info.value)


def test_window_keys_need_a_window() -> None:
    with pytest.raises(RuleValidationError, match="select, max_groups need a 'window'"):
        parse_rule(
            {"id": "x", "topic": "a", "when": "true", "select": {"n": "count()"}, "max_groups": 3}
        )


def test_file_rule_errors_carry_file_and_index() -> None:
    report = load_rules_text(
        '[[rules]]\nid = "w"\ntopic = "a"\nwindow = { type = "count", size_n = 2 }\n'
        'select = { n = "nope()" }\n',
        origin="w.toml",
    )
    assert not report.rules
    [error] = report.errors
    assert error.fields["file"] == "w.toml"
    assert "select.n" in str(error)


def test_a_window_rule_without_when_emits_every_window() -> None:
    rule = window_rule()
    assert rule.when == "true"
    assert parse_rule(rule.model_dump(mode="json")) == rule  # the database round trip


async def test_bad_when_fails_through_the_api_path_with_its_line() -> None:
    async with RuleEngine() as engine:
        with pytest.raises(Exception, match="does not compile") as info:
            await engine.check_rule(window_rule(when="avg_t >"))
        assert info.value.fields["rule_id"] == "win"  # type: ignore[attr-defined]


def test_fingerprint_follows_the_window_not_the_actions() -> None:
    rule = window_rule()
    assert fingerprint(rule) == fingerprint(window_rule(actions=[], when="n > 3"))
    assert fingerprint(rule) != fingerprint(window_rule(window={"type": "tumbling", "size_s": 30}))
    assert fingerprint(rule) != fingerprint(window_rule(group_by=""))
    assert fingerprint(rule) != fingerprint(window_rule(select={"n": "count()"}))
    assert fingerprint(rule) != fingerprint(window_rule(time_field="ts"))


# -- window types ------------------------------------------------------------------------


def test_tumbling_windows_close_on_the_clock() -> None:
    windows = RuleWindows(window_rule(), count=False)
    assert windows.add([ev({"temperature": 10}), ev({"temperature": 20})], T0 + 1) == []
    assert windows.add([ev({"temperature": 30})], T0 + 59.9) == []
    assert windows.due(T0 + 59.99) == []
    [closed] = windows.due(T0 + 60)
    assert closed.output == {
        "avg_t": 20.0,
        "n": 3,
        "window_start": T0,
        "window_end": T0 + 60,
        "device_id": "d1",
    }
    assert (closed.topic, closed.device_id) == ("devices/d1/telemetry", "d1")
    assert windows.open_windows == 0 and not windows.groups


def test_an_event_after_the_end_closes_the_window_before_it_counts() -> None:
    store = WindowStore()
    store.sync([window_rule()])
    store.add([ev({"temperature": 10})], T0 + 5)
    closed = store.add([ev({"temperature": 50})], T0 + 61)
    assert outputs(closed) == [
        {"avg_t": 10.0, "n": 1, "window_start": T0, "window_end": T0 + 60, "device_id": "d1"}
    ]
    [late] = store.due(T0 + 120)
    assert late.output["avg_t"] == 50.0


def test_hopping_windows_overlap() -> None:
    rule = window_rule(window={"type": "hopping", "size_s": 60, "every_s": 20})
    windows = RuleWindows(rule, count=False)
    windows.add([ev({"temperature": 10})], T0 + 25)  # in [T0-20, T0+40) [T0, T0+60) [T0+20, T0+80)
    windows.add([ev({"temperature": 30})], T0 + 45)  # in [T0, T0+60) [T0+20, T0+80) [T0+40, T0+100)
    assert windows.open_windows == 4
    first = windows.due(T0 + 40)
    assert [(o["window_start"], o["n"], o["avg_t"]) for o in outputs(first)] == [(T0 - 20, 1, 10.0)]
    rest = windows.due(T0 + 100)
    assert [(o["window_start"], o["n"], o["avg_t"]) for o in outputs(rest)] == [
        (T0, 2, 20.0),
        (T0 + 20, 2, 20.0),
        (T0 + 40, 1, 30.0),
    ]


def test_count_windows_close_on_their_nth_event() -> None:
    windows = RuleWindows(window_rule(window={"type": "count", "size_n": 3}), count=False)
    assert windows.add([ev({"temperature": 1}), ev({"temperature": 2})], T0) == []
    assert windows.due(T0 + 1e6) == []  # time never closes a count window
    closed = windows.add([ev({"temperature": 3}), ev({"temperature": 10})], T0 + 7)
    assert outputs(closed) == [
        {"avg_t": 2.0, "n": 3, "window_start": T0, "window_end": T0 + 7, "device_id": "d1"}
    ]
    assert windows.open_windows == 1
    [rest] = windows.flush()
    assert rest.output["n"] == 1


def test_session_windows_close_after_the_gap() -> None:
    windows = RuleWindows(window_rule(window={"type": "session", "gap_s": 30}), count=False)
    windows.add([ev({"temperature": 1})], T0)
    windows.add([ev({"temperature": 3})], T0 + 20)
    assert windows.due(T0 + 45) == []  # the second event kept it open
    [closed] = windows.due(T0 + 50)
    assert closed.output["n"] == 2
    assert (closed.output["window_start"], closed.output["window_end"]) == (T0, T0 + 50)
    windows.add([ev({"temperature": 5})], T0 + 100)
    closed_by_event = windows.add([ev({"temperature": 7})], T0 + 140)
    assert [o["avg_t"] for o in outputs(closed_by_event)] == [5.0]


# -- groups and aggregates ---------------------------------------------------------------


def test_group_by_device_field_or_one_group() -> None:
    batch = [
        ev({"temperature": 10, "site": "a"}, "d1"),
        ev({"temperature": 20, "site": "b"}, "d2"),
        ev({"temperature": 30, "site": "a"}, "d3"),
        ev({"temperature": 40}, "d4"),
    ]
    by_device = RuleWindows(window_rule(), count=False)
    by_device.add(batch, T0)
    assert sorted(o["device_id"] for o in outputs(by_device.flush())) == ["d1", "d2", "d3", "d4"]

    by_site = RuleWindows(window_rule(group_by="site"), count=False)
    by_site.add(batch, T0)
    assert by_site.dropped["no_group"] == 1
    found = {o["site"]: (o["n"], o["avg_t"]) for o in outputs(by_site.flush())}
    assert found == {"a": (2, 20.0), "b": (1, 20.0)}

    one = RuleWindows(window_rule(group_by=""), count=False)
    one.add(batch, T0)
    [closed] = one.flush()
    assert closed.output["n"] == 4 and "device_id" not in closed.output
    assert closed.device_id is None  # a window of many devices is no one device's


def test_every_aggregate() -> None:
    select = {
        "n": "count()",
        "n_t": "count(temperature)",
        "s": "sum(temperature)",
        "a": "avg(temperature)",
        "lo": "min(temperature)",
        "hi": "max(temperature)",
        "f": "first(status)",
        "l": "last(status)",
        "s_missing": "sum(pressure)",
        "a_missing": "avg(pressure)",
        "lo_missing": "min(pressure)",
    }
    windows = RuleWindows(window_rule(select=select), count=False)
    windows.add(
        [
            ev({"temperature": 4, "status": "boot"}),
            ev({"temperature": "hot", "status": "ok"}),  # counted, not summed
            ev({"temperature": True}),  # a bool is no number
            ev({"temperature": -2.5}),
            ev({"humidity": 1, "status": "ok2"}),
        ],
        T0,
    )
    [closed] = windows.flush()
    output = closed.output
    assert {k: output[k] for k in select} == {
        "n": 5,
        "n_t": 4,
        "s": 1.5,
        "a": 0.75,
        "lo": -2.5,
        "hi": 4,
        "f": "boot",
        "l": "ok2",
        "s_missing": None,
        "a_missing": None,
        "lo_missing": None,
    }


def test_a_sum_beyond_64_bits_becomes_a_float() -> None:
    windows = RuleWindows(window_rule(select={"s": "sum(big)"}), count=False)
    windows.add([ev({"big": 2**62}), ev({"big": 2**62}), ev({"big": 2**62})], T0)
    [closed] = windows.flush()
    assert closed.output["s"] == float(3 * 2**62)


# -- when, actions and the engine ---------------------------------------------------------


async def test_when_filters_closed_windows_and_matches_carry_the_output() -> None:
    rule = window_rule(when="avg_t > 25 and n >= 2 and window_end > window_start")
    async with RuleEngine() as engine:
        await engine.reload([rule])
        now = time.time()
        assert await engine.evaluate_batch([ev({"temperature": 20}, "d1")]) == []
        await engine.evaluate_batch([ev({"temperature": 30}, "d2"), ev({"temperature": 40}, "d2")])
        await engine.evaluate_batch([ev({"temperature": 50}, "d1")])  # avg 35, n 2
        matches = await engine.close_windows(now + 120)
        assert sorted(m.event.device_id for m in matches) == ["d1", "d2"]
        match = next(m for m in matches if m.event.device_id == "d2")
        assert match.output == match.event.payload == orjson.loads(match.event.raw)
        assert match.output is not None and match.output["avg_t"] == 35.0
        assert match.event.topic == "devices/d2/telemetry"
        status = engine.status("win")
        assert status is not None and status.to_dict()["matches"] == 2
        assert await engine.close_windows(now + 240) == []


async def test_when_sees_the_group_key() -> None:
    rule = window_rule(group_by="site", when='site == "north"')
    async with RuleEngine() as engine:
        await engine.reload([rule])
        await engine.evaluate_batch(
            [ev({"temperature": 1, "site": "north"}), ev({"temperature": 2, "site": "south"})]
        )
        matches = await engine.close_windows(time.time() + 120)
        assert [m.output["site"] for m in matches if m.output] == ["north"]


async def test_a_window_rule_is_not_evaluated_on_events_and_stateless_rules_still_are() -> None:
    plain = parse_rule({"id": "hot", "topic": "devices/+/telemetry", "when": "temperature > 5"})
    async with RuleEngine() as engine:
        await engine.reload([plain, window_rule()])
        matches = await engine.evaluate_batch([ev({"temperature": 9})])
        assert [m.rule.id for m in matches] == ["hot"]
        closed = await engine.close_windows(time.time() + 120)
        assert [m.rule.id for m in closed] == ["win"]


async def test_a_failing_when_is_recorded_like_any_rule_error() -> None:
    rule = window_rule(when='error("boom")')
    async with RuleEngine() as engine:
        await engine.reload([rule])
        await engine.evaluate_batch([ev({"temperature": 9})])
        assert await engine.close_windows(time.time() + 120) == []
        status = engine.status("win")
        assert status is not None and status.to_dict()["failures"] == 1


# -- event time -----------------------------------------------------------------------------


def test_event_time_places_events_by_their_own_time_and_drops_late_ones() -> None:
    rule = window_rule(time_field="ts", allowed_lateness_s=10, id="evt")
    windows = RuleWindows(rule)
    late_before = metric("flux_window_events_dropped_total", rule="evt", reason="late")
    windows.add([ev({"temperature": 10, "ts": T0 + 50})], T0 + 55)
    windows.add([ev({"temperature": 30, "ts": T0 + 59})], T0 + 65)  # late by 5 s: still taken
    windows.add([ev({"temperature": 99, "ts": T0 + 61})], T0 + 65)  # the next window
    assert windows.due(T0 + 69) == []  # open until end + allowed_lateness_s
    windows.add([ev({"temperature": 50, "ts": T0 + 30})], T0 + 70.5)  # beyond lateness: dropped
    windows.add([ev({"temperature": 50})], T0 + 70.5)  # no time: dropped
    closed = windows.due(T0 + 70.5)
    assert [(o["window_start"], o["avg_t"]) for o in outputs(closed)] == [(T0, 20.0)]
    assert windows.dropped == {"late": 1, "no_time": 1, "no_group": 0}
    assert metric("flux_window_events_dropped_total", rule="evt", reason="late") == late_before + 1
    windows.forget_metrics()


def changed(store: WindowStore) -> dict[str, dict[str, Any]]:
    """The groups changed since the last call, each with every rule's windows of it ({}:
    its row is deleted)."""
    return {key: store.parts(key) for key in store.take_changed_keys()}


def stored_rows(store: WindowStore) -> list[StateRow]:
    """The changed groups' rows as a restart reads them: packed, through the database's
    JSON, unpacked."""
    return unpack_windows(through_json(pack_windows(store.take_changed_keys(), store.parts)))


def through_json(rows: list[StateRow]) -> list[StateRow]:
    """``rows`` as the database gives them back."""
    return [
        StateRow(r.rule_id, r.kind, r.key, r.fingerprint, orjson.loads(orjson.dumps(r.value)))
        for r in rows
    ]


# -- the cap ------------------------------------------------------------------------------


def test_the_oldest_group_is_evicted_at_the_cap_and_counted() -> None:
    rule = window_rule(max_groups=2, id="capped")
    store = WindowStore()
    store.sync([rule])
    before = metric("flux_window_groups_evicted_total", rule="capped")
    store.add([ev({"temperature": 1}, "d1"), ev({"temperature": 2}, "d2")], T0)
    store.add([ev({"temperature": 3}, "d3")], T0 + 1)
    windows = store.get("capped")
    assert windows is not None
    assert list(windows.groups) == ["d2", "d3"] and windows.evicted == 1
    assert metric("flux_window_groups_evicted_total", rule="capped") == before + 1
    assert metric("flux_windows_open", rule="capped") == 2
    rows = changed(store)
    assert rows["d1"] == {} and rows["d3"] != {}  # d1's row goes, d3's is written
    store.sync([])


# -- reloads and state rows ----------------------------------------------------------------


def test_reload_keeps_windows_when_the_fingerprint_holds_and_drops_them_otherwise() -> None:
    store = WindowStore()
    store.sync([window_rule()])
    store.add([ev({"temperature": 10})], T0)
    store.take_changed_keys()
    store.sync([window_rule(when="n > 0", actions=[])])  # only when/actions changed: kept
    [kept] = store.due(T0 + 60)
    assert kept.output["n"] == 1

    store.add([ev({"temperature": 10})], T0 + 61)
    store.take_changed_keys()
    store.sync([window_rule(select={"n": "count()"})])  # the select changed: dropped
    assert store.due(T0 + 1000) == []
    assert changed(store) == {"d1": {}}  # d1's row goes
    store.sync([])


async def test_engine_reload_keeps_or_drops_open_windows() -> None:
    async with RuleEngine() as engine:
        await engine.reload([window_rule()])
        await engine.evaluate_batch([ev({"temperature": 10})])
        await engine.reload([window_rule(when="n >= 1", version=2)])
        [kept] = await engine.close_windows(time.time() + 120)
        assert kept.output is not None and kept.output["n"] == 1
        await engine.evaluate_batch([ev({"temperature": 10})])
        await engine.reload([window_rule(window={"type": "tumbling", "size_s": 30})])
        assert await engine.close_windows(time.time() + 120) == []
        await engine.evaluate_batch([ev({"temperature": 10})])
        await engine.reload([])
        assert not engine.has_windows
        assert {(r.kind, r.key, r.value) for r in engine.take_state_changes()} == {
            ("windows", "d1", None)
        }


def test_a_reload_with_another_lateness_moves_the_closing_time() -> None:
    store = WindowStore()
    store.sync([window_rule(time_field="ts", allowed_lateness_s=30)])
    store.add([ev({"temperature": 1, "ts": T0 + 1})], T0 + 1)
    assert store.due(T0 + 60) == []
    store.sync([window_rule(time_field="ts", allowed_lateness_s=5)])
    assert len(store.due(T0 + 65)) == 1
    store.sync([])


def test_changes_and_restore_round_trip() -> None:
    rule = window_rule(window={"type": "session", "gap_s": 30}, select={"s": "sum(temperature)"})
    first = WindowStore()
    first.sync([rule])
    assert first.take_changed_keys() == []
    first.add([ev({"temperature": 1}, "d1"), ev({"temperature": 2}, "d2")], T0)
    stored = stored_rows(first)
    assert sorted(r.key for r in stored) == ["d1", "d2"]
    assert all(r.kind == "window" and r.fingerprint == fingerprint(rule) for r in stored)
    assert first.take_changed_keys() == []

    second = WindowStore()
    second.sync([rule])
    stale = StateRow("win", "window", "d3", "other-fingerprint", stored[0].value)
    assert second.restore([*stored, stale, StateRow("gone", "window", "d1", "x", {})]) == 2
    second.add([ev({"temperature": 10}, "d1")], T0 + 20)
    closed = {c.key: c for c in second.due(T0 + 100)}
    assert closed["d1"].output["s"] == 11 and closed["d2"].output["s"] == 2
    assert closed["d2"].topic == "devices/d2/telemetry"
    assert changed(second) == {"d1": {}, "d2": {}}
    first.sync([])
    second.sync([])


def test_changed_keys_come_out_once_with_every_rules_windows_of_the_key() -> None:
    first, second = window_rule(id="w1"), window_rule(id="w2", select={"n": "count()"})
    store = WindowStore()
    store.sync([first, second])
    store.add([ev({"temperature": 10}, "d1"), ev({"temperature": 20}, "d2")], T0)
    assert sorted(store.take_changed_keys()) == ["d1", "d2"]
    assert store.take_changed_keys() == []  # handed out once
    parts = store.parts("d1")
    assert {rule_id: part["fingerprint"] for rule_id, part in parts.items()} == {
        "w1": fingerprint(first),
        "w2": fingerprint(second),
    }
    assert parts["w2"]["value"]["meta"][1] == "d1"
    store.sync([first])  # w2 gone: its groups change
    assert sorted(store.take_changed_keys()) == ["d1", "d2"]
    assert list(store.parts("d1")) == ["w1"]
    store.sync([])
    assert sorted(store.take_changed_keys()) == ["d1", "d2"]
    assert store.parts("d1") == {}


async def test_engine_hands_out_one_packed_row_per_group_and_restores_it() -> None:
    rule = window_rule()
    async with RuleEngine() as engine:
        await engine.reload([rule])
        await engine.evaluate_batch([ev({"temperature": 12})])
        rows = engine.take_state_changes()
        assert [(r.kind, r.key) for r in rows] == [("windows", "d1")]
    async with RuleEngine() as engine:
        await engine.reload([rule])
        assert await engine.restore_state(through_json(rows)) == 1
        [match] = await engine.close_windows(time.time() + 120)
        assert match.output is not None and match.output["avg_t"] == 12.0


async def test_stored_window_rows_are_loaded_at_start_with_the_other_state() -> None:
    rule = window_rule()
    async with RuleEngine() as engine:
        await engine.reload([rule])
        await engine.evaluate_batch([ev({"temperature": 14})])
        rows = engine.take_state_changes()
    async with RuleEngine() as engine:
        await engine.reload([window_rule(when="n >= 1", actions=[])])
        assert await engine.restore_state(through_json(rows)) == 1
        [match] = await engine.close_windows(time.time() + 120)
        assert match.output is not None and match.output["avg_t"] == 14.0


# -- rule tests -----------------------------------------------------------------------------


async def test_window_rule_test_over_timed_events() -> None:
    rule = window_rule(when="avg_t > 25")
    events = [
        TimedEvent({"temperature": 20}, T0 + 1, "d1"),
        TimedEvent({"temperature": 40}, T0 + 2, "d1"),
        TimedEvent({"temperature": 10}, T0 + 3, "d2"),
        TimedEvent({"temperature": 99}, T0 + 61, "d1"),
    ]
    async with RuleEngine() as engine:
        result = await engine.test_window_rule(rule, events)
        found = [(w.output["device_id"], w.matched, w.by) for w in result.windows]
        assert found == [("d1", True, "clock"), ("d2", False, "clock")]
        assert result.still_open == 1
        closing = await engine.test_window_rule(rule, events, close_open=True)
        assert [w.by for w in closing.windows] == ["clock", "clock", "end"]
        assert closing.to_dict()["matched"] == 2
        single = await engine.test_rule(rule, {"temperature": 30}, device_id="d9")
        assert single.matched and single.output is not None and single.output["n"] == 1
        wrong = await engine.test_window_rule(rule, [TimedEvent({}, T0, topic="other/x")])
        assert wrong.error is not None and "does not match" in wrong.error.message
