"""Durable rule state on the engine's side: what a batch changed comes out as rows, and
rows read back continue the state; a changed rule starts afresh."""

from __future__ import annotations

import orjson

from flux.rules import Rule, RuleEngine
from flux.rules.state import StateRow, fingerprint, pack_windows, unpack_windows

from .conftest import make_event, metric

COUNTER = Rule(
    id="st-count",
    topic="devices/+/t",
    script="state.n = (state.n or 0) + 1\nreturn state.n >= 3 and {n = state.n} or false",
)


async def test_a_batch_hands_out_the_state_it_changed(engine: RuleEngine) -> None:
    written = metric("flux_rule_state_writes_total", kind="script")
    await engine.reload([COUNTER, Rule(id="st-plain", topic="devices/+/t", when="true")])
    await engine.evaluate_batch(
        [
            make_event({}, "devices/d1/t"),
            make_event({}, "devices/d1/t"),
            make_event({}, "devices/d2/t"),
        ]
    )
    rows = sorted(engine.take_state_changes(), key=lambda row: row.key)
    assert rows == [
        StateRow("st-count", "script", "d1", fingerprint(COUNTER), {"n": 2}, 1),
        StateRow("st-count", "script", "d2", fingerprint(COUNTER), {"n": 1}, 1),
    ]
    assert engine.take_state_changes() == []  # handed out once
    assert metric("flux_rule_state_writes_total", kind="script") == written + 2
    await engine.evaluate_batch([make_event({}, "devices/d2/t")])
    assert [(row.value, row.version) for row in engine.take_state_changes()] == [({"n": 2}, 2)]


async def test_number_keys_and_bytes_that_are_not_utf8_are_stored_as_json(
    engine: RuleEngine,
) -> None:
    """``state[1] = ...`` is allowed: its row must be JSON (objects have string keys), or
    the store would refuse the batch carrying it again at every redelivery."""
    ring = Rule(
        id="st-ring",
        topic="devices/+/t",
        script="state[1] = 20.5\nstate.tag = string.char(255)\nreturn {first = state[1]}",
    )
    await engine.reload([ring])
    await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    (row,) = engine.take_state_changes()
    assert row.value == [[1, 20.5], ["tag", "\ufffd"]] or row.value == [
        ["tag", "\ufffd"],
        [1, 20.5],
    ]
    orjson.dumps(row.value)  # what the store writes
    async with RuleEngine() as fresh:
        await fresh.reload([ring.model_copy(update={"script": "return {first = state[1]}"})])
        stamp = fingerprint(ring.model_copy(update={"script": "return {first = state[1]}"}))
        assert await fresh.restore_state([StateRow("st-ring", "script", "d1", stamp, row.value)])
        (match,) = await fresh.evaluate_batch([make_event({}, "devices/d1/t")])
        assert match.output == {"first": 20.5}


async def test_shared_devices_take_what_another_instance_wrote_since(engine: RuleEngine) -> None:
    """A device whose messages go back and forth between instances: each batch's devices are
    read, and a row with a newer version than the one held replaces it."""
    stored: dict[str, StateRow] = {}

    async def loader(devices: object) -> list[StateRow]:
        return [row for key, row in stored.items() if key in devices]  # type: ignore[operator]

    await engine.reload([COUNTER])
    engine.load_state_with(loader, every_batch=True)
    await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    (mine,) = engine.take_state_changes()
    assert (mine.value, mine.version) == ({"n": 1}, 1)
    stored["d1"] = mine  # committed; as new as what is held: not read over it
    await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    (mine,) = engine.take_state_changes()
    assert (mine.value, mine.version) == ({"n": 2}, 2)
    # Another instance took the device from version 2 on and counted to 10.
    stored["d1"] = StateRow("st-count", "script", "d1", fingerprint(COUNTER), {"n": 10}, 9)
    (match,) = await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    assert match.output == {"n": 11}
    (mine,) = engine.take_state_changes()
    assert mine.version == 10


async def test_a_shared_device_evicted_from_memory_keeps_its_row() -> None:
    async def nothing(devices: object) -> list[StateRow]:
        return []

    async with RuleEngine(max_state_devices=2) as engine:
        await engine.reload([COUNTER])
        engine.load_state_with(nothing, every_batch=True)
        await engine.evaluate_batch([make_event({}, f"devices/d{i}/t") for i in range(3)])
        rows = engine.take_state_changes()
    assert {row.key for row in rows} == {"d1", "d2"}, "no deletion: the row may be another's"


async def test_rows_read_back_continue_the_state_in_a_new_engine() -> None:
    stored = [
        StateRow("st-count", "script", "d1", fingerprint(COUNTER), {"n": 2}),
        StateRow("st-count", "script", "d9", "0123456789abcdef", {"n": 50}),  # an old rule
        StateRow("st-gone", "script", "d1", "0123456789abcdef", {"n": 7}),
    ]
    loaded = metric("flux_rule_state_loaded_total", when="start")
    async with RuleEngine() as engine:
        await engine.reload([COUNTER])
        assert await engine.restore_state(stored) == 1
        assert metric("flux_rule_state_loaded_total", when="start") == loaded + 1
        assert engine.take_state_changes() == []  # reading back is not a change
        matches = await engine.evaluate_batch(
            [make_event({}, "devices/d1/t"), make_event({}, "devices/d9/t")]
        )
    assert [(m.event.device_id, m.output) for m in matches] == [("d1", {"n": 3})]


async def test_a_device_first_seen_here_is_read_from_the_loader(engine: RuleEngine) -> None:
    asked: list[set[str]] = []

    async def loader(devices: object) -> list[StateRow]:
        asked.append(set(devices))  # type: ignore[call-overload]
        return [StateRow("st-count", "script", "d1", fingerprint(COUNTER), {"n": 5})]

    await engine.reload([COUNTER])
    engine.load_state_with(loader)
    first = await engine.evaluate_batch(
        [make_event({}, "devices/d1/t"), make_event({}, "devices/d2/t")]
    )
    again = await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    assert [(m.event.device_id, m.output) for m in first] == [("d1", {"n": 6})]
    assert [m.output for m in again] == [{"n": 7}]  # held in memory, not read again
    assert asked == [{"d1", "d2"}]


async def test_state_survives_a_reload_unless_the_script_changed(engine: RuleEngine) -> None:
    await engine.reload([COUNTER])
    await engine.evaluate_batch([make_event({}, "devices/d1/t"), make_event({}, "devices/d1/t")])
    await engine.reload([COUNTER.model_copy(update={"description": "same code"})])
    assert [m.output for m in await engine.evaluate_batch([make_event({}, "devices/d1/t")])] == [
        {"n": 3}
    ]
    changed = COUNTER.model_copy(update={"script": COUNTER.script + " -- changed"})
    await engine.reload([changed])
    assert await engine.evaluate_batch([make_event({}, "devices/d1/t")]) == []  # n is 1 again
    assert fingerprint(changed) != fingerprint(COUNTER)


async def test_an_evicted_device_deletes_its_row() -> None:
    async with RuleEngine(max_state_devices=2) as engine:
        await engine.reload([COUNTER])
        await engine.evaluate_batch([make_event({}, f"devices/d{i}/t") for i in range(3)])
        rows = engine.take_state_changes()
    assert StateRow("st-count", "script", "d0", fingerprint(COUNTER), None) in rows
    assert {row.key for row in rows if row.value is not None} == {"d1", "d2"}


async def test_a_quarantine_is_a_row_and_is_read_back(engine: RuleEngine) -> None:
    broken = Rule(id="st-broken", topic="devices/+/t", script="error('no')")
    await engine.reload([broken])
    await engine.evaluate_batch(
        [make_event({}, f"devices/d{i}/t") for i in range(3)]
    )  # quarantine_after=3
    (row,) = engine.take_state_changes()
    assert (row.rule_id, row.kind, row.key) == ("st-broken", "quarantine", "")
    async with RuleEngine() as fresh:
        await fresh.reload([broken])
        assert await fresh.restore_state([row]) == 1
        status = fresh.status("st-broken")
        assert status is not None and status.status == "quarantined"
        assert await fresh.unquarantine("st-broken")
        (cleared,) = fresh.take_state_changes()
    assert (cleared.kind, cleared.value) == ("quarantine", None)


async def test_a_rule_test_leaves_no_state_to_write(engine: RuleEngine) -> None:
    await engine.reload([COUNTER])
    result = await engine.test_rule(COUNTER, {}, "devices/d1/t", state={"n": 5})
    assert result.matched and result.output == {"n": 6}
    await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    assert [(row.key, row.value) for row in engine.take_state_changes()] == [("d1", {"n": 1})]


def test_window_rows_pack_by_group_key_and_unpack_again() -> None:
    windows = [[0, 60, 3]]
    parts = {
        "d1": {
            "w1": {"fingerprint": "f1", "value": {"windows": windows}},
            "w2": {"fingerprint": "f2", "value": {"windows": [[0, 60, 4]]}},
        },
        "d2": {},
    }
    packed = pack_windows(["d1", "d2"], parts.__getitem__)
    assert [(row.rule_id, row.kind, row.key) for row in packed] == [
        ("", "windows", "d1"),
        ("", "windows", "d2"),
    ]
    assert packed[1].value is None  # no rule has an open window for d2: the row goes
    windows[0][2] = 99  # the live windows change on: the row holds them as they were
    # as the database gives them back: through JSON
    stored = [
        StateRow(
            row.rule_id, row.kind, row.key, row.fingerprint, orjson.loads(orjson.dumps(row.value))
        )
        for row in packed[:1]
    ]
    script = StateRow("s1", "script", "d1", "f9", {"n": 1})
    assert unpack_windows([*stored, script]) == [
        StateRow("w1", "window", "d1", "f1", {"windows": [[0, 60, 3]]}),
        StateRow("w2", "window", "d1", "f2", {"windows": [[0, 60, 4]]}),
        script,
    ]
