"""MQTT topic-filter checks and matching for plugin subscriptions."""

from __future__ import annotations


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` unchanged, or raise ``ValueError`` saying why it is not a filter."""
    if not topic_filter:
        raise ValueError("a topic filter cannot be empty")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Return whether ``topic`` matches the MQTT ``topic_filter`` (``+`` one level, ``#`` rest)."""
    if topic_filter == topic:
        return True
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return not topic.startswith("$") or index > 0
        if index >= len(topic_levels):
            return False
        if level == "+":
            if index == 0 and topic_levels[0].startswith("$"):
                return False
            continue
        if level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


__all__ = ["topic_matches", "validate_filter"]
