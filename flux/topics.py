"""MQTT topic filters: validation and matching (``+`` one level, ``#`` the rest).

Shared by the configuration, the rules and the plugins, so all three agree on a filter.
"""

from __future__ import annotations

from collections.abc import Sequence

from flux.events import MAX_TOPIC_LENGTH

#: Topics remembered by a ``TopicMatcher`` before its cache is cleared (bounds memory).
CACHE_SIZE = 65_536


def validate_filter(topic_filter: str) -> str | None:
    """Return why ``topic_filter`` is not a valid MQTT subscription filter, or ``None``."""
    if not topic_filter:
        return "topic filter is empty"
    if len(topic_filter) > MAX_TOPIC_LENGTH:
        return f"topic filter is longer than {MAX_TOPIC_LENGTH} characters"
    if "\x00" in topic_filter:
        return "topic filter contains a NUL character"
    if topic_filter.startswith("$share/"):
        return "shared subscriptions ($share/...) are not rule filters"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Return whether ``topic`` matches the (valid) MQTT filter ``topic_filter``.

    Per MQTT, a filter starting with a wildcard does not match topics starting with ``$``.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    for index, pattern in enumerate(flevels):
        if pattern == "#":
            return True
        if index >= len(tlevels):
            return False
        if pattern != "+" and pattern != tlevels[index]:
            return False
    return len(flevels) == len(tlevels)


class TopicMatcher:
    """Map a topic to the indices of the filters it matches; cached per topic string.

    Exact filters are a dict lookup; wildcard filters are tested once per new topic.
    """

    __slots__ = ("_cache", "_exact", "_wild")

    def __init__(self, filters: Sequence[str]) -> None:
        self._exact: dict[str, list[int]] = {}
        self._wild: list[tuple[str, int]] = []
        for index, topic_filter in enumerate(filters):
            if "+" in topic_filter or "#" in topic_filter:
                self._wild.append((topic_filter, index))
            else:
                self._exact.setdefault(topic_filter, []).append(index)
        self._cache: dict[str, tuple[int, ...]] = {}

    def match(self, topic: str) -> tuple[int, ...]:
        """Return the sorted indices of the filters matching ``topic``."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        found = list(self._exact.get(topic, ()))
        found.extend(index for flt, index in self._wild if topic_matches(flt, topic))
        result = tuple(sorted(found))
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[topic] = result
        return result


__all__ = ["TopicMatcher", "topic_matches", "validate_filter"]
