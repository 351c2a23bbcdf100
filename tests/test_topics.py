from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux.topics import TopicMatcher, topic_matches, validate_filter


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("devices/+/telemetry", "devices/a/telemetry", True),
        ("devices/+/telemetry", "devices/a/b/telemetry", False),
        ("devices/+/telemetry", "devices//telemetry", True),
        ("devices/#", "devices", True),
        ("devices/#", "devices/a/b", True),
        ("#", "anything/at/all", True),
        ("#", "$SYS/broker/load", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/+", "a", False),
        ("+", "a", True),
        ("+/+", "a/", True),
    ],
)
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a/+b", "$share/g/a", "a\x00"])
def test_invalid_filters_are_reported(bad: str) -> None:
    assert validate_filter(bad)


def test_matcher_returns_sorted_indices_and_caches() -> None:
    matcher = TopicMatcher(["devices/#", "devices/+/telemetry", "devices/a/telemetry", "x"])
    assert matcher.match("devices/a/telemetry") == (0, 1, 2)
    assert matcher.match("devices/b/telemetry") == (0, 1)
    assert matcher.match("x") == (3,)
    assert matcher.match("y") == ()
    assert matcher.match("devices/a/telemetry") == (0, 1, 2)


levels = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4)


@given(levels, st.data())
def test_matcher_agrees_with_a_reference(topic_levels: list[str], data: st.DataObject) -> None:
    topic = "/".join(topic_levels)
    flt_levels = [data.draw(st.sampled_from([lvl, "+"])) for lvl in topic_levels]
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(min_value=0, max_value=len(flt_levels) - 1))
        flt_levels = [*flt_levels[:cut], "#"]
    flt = "/".join(flt_levels)
    assert validate_filter(flt) is None
    assert topic_matches(flt, topic)
    assert TopicMatcher([flt]).match(topic) == (0,)
