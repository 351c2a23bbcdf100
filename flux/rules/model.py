"""Rule definitions: the pydantic model, action types, templates and loading from TOML files."""

from __future__ import annotations

import functools
import hashlib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flux.rules.errors import RuleError, RuleValidationError
from flux.topics import validate_filter

#: Rule ids: lowercase slug, 1-64 characters.
RULE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
#: Largest ``when``/``script`` source accepted, in UTF-8 bytes.
MAX_SOURCE_BYTES = 16 * 1024
#: Roots a template placeholder may start with.
TEMPLATE_ROOTS = frozenset(
    {"device_id", "rule_id", "topic", "event_id", "received_at", "payload", "output"}
)
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*$")
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})

Severity = Literal["debug", "info", "warning", "error", "critical"]

#: The aggregate functions of a window rule's ``select``.
AGGREGATES = ("count", "sum", "avg", "min", "max", "first", "last")
_AGGREGATE = re.compile(r"^\s*([a-z]+)\s*\(\s*([A-Za-z_][A-Za-z0-9_-]*)?\s*\)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PAYLOAD_FIELD = r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$"
#: Names a window's output sets itself, or that Lua or the rule environment already use.
RESERVED_NAMES = frozenset(
    {"window_start", "window_end", "topic", "device_id", "received_at", "state", "payload"}
    | {"and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto"}
    | {"if", "in", "local", "nil", "not", "or", "repeat", "return", "then", "true", "until"}
    | {"while"}
)
#: Most windows one event may fall into (a hopping window's ``size_s / every_s``).
MAX_HOPS_PER_EVENT = 100


def template_fields(template: str) -> list[str]:
    """Return the placeholders of ``template`` or raise ``ValueError`` for a malformed one."""
    fields: list[str] = []
    pos = 0
    for found in _PLACEHOLDER.finditer(template):
        between = template[pos : found.start()]
        if "{" in between or "}" in between:
            raise ValueError(f"unbalanced brace in template {template!r}")
        pos = found.end()
        name = found.group(1)
        if name is None:
            continue
        name = name.strip()
        if not _FIELD.match(name):
            raise ValueError(f"bad placeholder {{{name}}} in template {template!r}")
        root = name.split(".", 1)[0]
        if root not in TEMPLATE_ROOTS:
            allowed = ", ".join(sorted(TEMPLATE_ROOTS))
            raise ValueError(f"unknown placeholder {{{name}}}; use one of {allowed}")
        if root in ("payload", "output") or "." not in name:
            fields.append(name)
        else:
            raise ValueError(f"{{{root}}} has no fields")
    rest = template[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"unbalanced brace in template {template!r}")
    return fields


def lookup(context: Mapping[str, Any], name: str) -> Any:
    """Return the value of a dotted placeholder in ``context`` (``None`` when missing)."""
    return _lookup_path(context, tuple(name.split(".")))


def _lookup_path(context: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = context
    for part in path:
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit():
            index = int(part)
            value = value[index] if index < len(value) else None
        else:
            return None
    return value


#: A template as literal text and placeholder paths, in order (a path is ``None`` for text).
_Parts = tuple[tuple[str, tuple[str, ...] | None], ...]


@functools.lru_cache(maxsize=4096)
def _template_parts(template: str) -> _Parts:
    """Split ``template`` once into literal text (``{{``/``}}`` unescaped) and placeholders."""
    parts: list[tuple[str, tuple[str, ...] | None]] = []
    pos = 0
    for found in _PLACEHOLDER.finditer(template):
        literal = template[pos : found.start()]
        if found.group(1) is None:
            literal += found.group(0)[0]
        if literal:
            parts.append((literal, None))
        if found.group(1) is not None:
            parts.append(("", tuple(found.group(1).strip().split("."))))
        pos = found.end()
    if pos < len(template):
        parts.append((template[pos:], None))
    return tuple(parts)


@functools.lru_cache(maxsize=4096)
def _lone_placeholder(value: str) -> tuple[str, ...] | None:
    """The path of a template that is one placeholder and nothing else, else ``None``."""
    found = _PLACEHOLDER.fullmatch(value)
    if found is None or found.group(1) is None:
        return None
    return tuple(found.group(1).strip().split("."))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value))
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def render_template(template: str, context: Mapping[str, Any], *, for_topic: bool = False) -> str:
    """Substitute ``{name}`` placeholders from ``context``; ``{{``/``}}`` are literal braces.

    With ``for_topic``, substituted values cannot add levels or wildcards (``/ + #`` become ``_``).
    """

    pieces: list[str] = []
    for literal, path in _template_parts(template):
        if path is None:
            pieces.append(literal)
            continue
        text = _text(_lookup_path(context, path))
        pieces.append(text.translate(_TOPIC_UNSAFE) if for_topic else text)
    return "".join(pieces)


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """Render templates inside a JSON-like value; a lone placeholder keeps the value's type."""
    if isinstance(value, str):
        path = _lone_placeholder(value)
        if path is not None:
            return _lookup_path(context, path)
        return render_template(value, context)
    if isinstance(value, dict):
        return {key: render_value(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render_value(item, context) for item in value]
    return value


def _check_templates(value: Any) -> None:
    if isinstance(value, str):
        template_fields(value)
    elif isinstance(value, dict):
        for item in value.values():
            _check_templates(item)
    elif isinstance(value, list):
        for item in value:
            _check_templates(item)


class _Action(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AlertAction(_Action):
    """Write a row to ``alerts``."""

    type: Literal["alert"]
    severity: Severity = "warning"


class PublishAction(_Action):
    """Publish an MQTT message; ``topic`` and ``payload`` are templates."""

    type: Literal["publish"]
    topic: str
    payload: str | dict[str, Any] | None = None
    qos: Literal[0, 1] = 0
    retain: bool = False

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        template_fields(value)
        literal = _PLACEHOLDER.sub("x", value)
        if not value or "+" in literal or "#" in literal or "\x00" in literal:
            raise ValueError("publish topic must be non-empty and contain no wildcards")
        return value

    @field_validator("payload")
    @classmethod
    def _payload(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        _check_templates(value)
        return value


class WebhookAction(_Action):
    """POST the event and output as JSON to ``url``."""

    type: Literal["webhook"]
    url: str
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/?#]+[^\s]*$", value):
            raise ValueError("webhook url must be an absolute http:// or https:// URL")
        return value


class PluginAction(_Action):
    """Hand the event (and output) to a WebAssembly plugin."""

    type: Literal["plugin"]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")


class ForwardAction(_Action):
    """Send the event, or the rule's output when it has one, to a sink (``[sinks.<name>]``)."""

    type: Literal["forward"]
    sink: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


Action = Annotated[
    AlertAction | PublishAction | WebhookAction | PluginAction | ForwardAction,
    Field(discriminator="type"),
]


class _Window(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TumblingWindow(_Window):
    """Back-to-back windows of ``size_s`` seconds, aligned to the epoch."""

    type: Literal["tumbling"]
    size_s: float = Field(gt=0, le=7 * 86400)


class HoppingWindow(_Window):
    """Windows of ``size_s`` seconds starting every ``every_s`` (they overlap)."""

    type: Literal["hopping"]
    size_s: float = Field(gt=0, le=7 * 86400)
    every_s: float = Field(gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _hops(self) -> HoppingWindow:
        if self.every_s > self.size_s:
            raise ValueError("every_s must not exceed size_s (use a tumbling window)")
        if self.size_s / self.every_s > MAX_HOPS_PER_EVENT:
            raise ValueError(f"size_s / every_s must be at most {MAX_HOPS_PER_EVENT}")
        return self


class CountWindow(_Window):
    """Windows of ``size_n`` events per group."""

    type: Literal["count"]
    size_n: int = Field(ge=1, le=1_000_000)


class SessionWindow(_Window):
    """A group's window stays open while its events come less than ``gap_s`` apart."""

    type: Literal["session"]
    gap_s: float = Field(gt=0, le=7 * 86400)


Window = Annotated[
    TumblingWindow | HoppingWindow | CountWindow | SessionWindow, Field(discriminator="type")
]


def parse_aggregate(expression: str) -> tuple[str, str | None]:
    """Return ``(function, field)`` of ``avg(temperature)``/``count()``, or raise ``ValueError``."""
    found = _AGGREGATE.match(expression)
    if found is None or found.group(1) not in AGGREGATES:
        known = ", ".join(f"{a}(field)" for a in AGGREGATES)
        raise ValueError(f"{expression!r} is not an aggregate; use {known} (count() counts events)")
    function, name = found.group(1), found.group(2)
    if name is None and function != "count":
        raise ValueError(f"{function}() needs a payload field, e.g. {function}(temperature)")
    return function, name


def _select_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a name Lua can use (letters, digits, _)")
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved; pick another name")
    return name


def _aggregate(expression: str) -> str:
    parse_aggregate(expression)
    return expression


SelectName = Annotated[str, AfterValidator(_select_name)]
Aggregate = Annotated[str, AfterValidator(_aggregate)]
#: Keys only a window rule may set.
WINDOW_KEYS = ("group_by", "select", "time_field", "allowed_lateness_s", "max_groups")


class Rule(BaseModel):
    """One rule: a topic filter, a Lua condition (``when``) or chunk (``script``), and actions.

    ``origin``/``origin_line`` say where the Lua source starts in a rule file; they are not
    part of the rule's identity.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=RULE_ID_PATTERN)
    description: str = Field(default="", max_length=1024)
    topic: str
    when: str | None = None
    script: str | None = None
    actions: tuple[Action, ...] = ()
    enabled: bool = True
    version: int = Field(default=1, ge=1)
    window: Window | None = None
    group_by: str = Field(default="device_id", pattern=r"^$|" + _PAYLOAD_FIELD)
    select: dict[SelectName, Aggregate] = Field(default_factory=dict, max_length=64)
    time_field: str | None = Field(default=None, pattern=_PAYLOAD_FIELD)
    allowed_lateness_s: float = Field(default=0.0, ge=0, le=86400)
    max_groups: int = Field(default=10_000, ge=1, le=1_000_000)
    origin: str | None = Field(default=None, exclude=True)
    origin_line: int | None = Field(default=None, exclude=True)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        problem = validate_filter(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _window_default_when(cls, data: Any) -> Any:
        """A window rule without ``when`` emits every window it closes."""
        if (
            isinstance(data, dict)
            and data.get("window") is not None
            and "when" not in data
            and data.get("script") is None
        ):
            return {**data, "when": "true"}
        return data

    @model_validator(mode="after")
    def _window(self) -> Rule:
        if self.window is None:
            fields = type(self).model_fields
            stray = [
                key
                for key in WINDOW_KEYS
                if getattr(self, key) != fields[key].get_default(call_default_factory=True)
            ]
            if stray:
                verb = "needs" if len(stray) == 1 else "need"
                raise ValueError(
                    f"{', '.join(stray)} {verb} a 'window' "
                    '(e.g. window = { type = "tumbling", size_s = 60 })'
                )
            return self
        if self.script is not None:
            raise ValueError(
                "script: a window rule takes a 'when' over its selected values, not a 'script'"
            )
        if not self.select:
            raise ValueError('select: a window rule needs one, e.g. select = { n = "count()" }')
        if self.group_by in self.select:
            raise ValueError(f"select.{self.group_by}: the group key already has that name")
        if re.search(r"\bstate\b", self.when or ""):
            raise ValueError("when: a window rule cannot use 'state'")
        return self

    @model_validator(mode="after")
    def _source(self) -> Rule:
        if (self.when is None) == (self.script is None):
            raise ValueError("a rule needs exactly one of 'when' (expression) or 'script' (chunk)")
        source = self.source
        if not source.strip():
            raise ValueError(f"'{self.kind}' is empty")
        size = len(source.encode())
        if size > MAX_SOURCE_BYTES:
            raise ValueError(f"'{self.kind}' is {size} bytes, the limit is {MAX_SOURCE_BYTES}")
        if "\x00" in source:
            raise ValueError(f"'{self.kind}' contains a NUL character")
        return self

    @property
    def kind(self) -> Literal["when", "script"]:
        """Return ``when`` for an expression rule, ``script`` for a chunk rule."""
        return "when" if self.when is not None else "script"

    @property
    def source(self) -> str:
        """Return the Lua source (the ``when`` expression or the ``script`` chunk)."""
        return self.when if self.when is not None else (self.script or "")

    @property
    def compile_key(self) -> tuple[str, int, str]:
        """Return the compile-cache key: id, version and a hash of the Lua source."""
        digest = hashlib.sha256(f"{self.kind}\x00{self.source}".encode()).hexdigest()[:16]
        return (self.id, self.version, digest)

    @property
    def uses_state(self) -> bool:
        """Return whether the source mentions the per-device ``state`` table."""
        return re.search(r"\bstate\b", self.source) is not None

    @property
    def aggregates(self) -> list[tuple[str, str, str | None]]:
        """Return a window rule's ``select`` as ``(name, function, field)``, in order."""
        return [(name, *parse_aggregate(text)) for name, text in self.select.items()]

    def plugin_names(self) -> list[str]:
        """Return the plugins this rule's actions call."""
        return [a.name for a in self.actions if isinstance(a, PluginAction)]

    def sink_names(self) -> list[str]:
        """Return the sinks this rule's actions forward to."""
        return [a.sink for a in self.actions if isinstance(a, ForwardAction)]


def check_plugins(rule: Rule, known: Iterable[str]) -> None:
    """Raise ``RuleValidationError`` if ``rule`` calls a plugin that is not in ``known``."""
    names = set(known)
    for name in rule.plugin_names():
        if name not in names:
            available = ", ".join(sorted(names)) or "none loaded"
            raise RuleValidationError(
                f"unknown plugin {name!r} (available: {available})", rule_id=rule.id
            )


def check_sinks(rule: Rule, known: Iterable[str] | None) -> None:
    """Raise ``RuleValidationError`` if ``rule`` forwards to a sink not in ``known`` (None:
    sinks are not checked, as by ``flux rules validate`` without a configuration)."""
    if known is None:
        return
    names = set(known)
    for name in rule.sink_names():
        if name not in names:
            available = ", ".join(sorted(names)) or "none configured"
            raise RuleValidationError(
                f"unknown sink {name!r} (configured: {available})", rule_id=rule.id
            )


def parse_rule(data: Mapping[str, Any], *, origin: str | None = None) -> Rule:
    """Validate one rule definition or raise ``RuleValidationError`` naming the bad fields."""
    try:
        return Rule.model_validate({**data, "origin": origin} if origin else dict(data))
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            message = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
        rule_id = data.get("id") if isinstance(data.get("id"), str) else None
        raise RuleValidationError("; ".join(parts), rule_id=rule_id) from None


@dataclass(slots=True)
class LoadReport:
    """Rules loaded from files, and the per-file/per-rule errors of those that could not be."""

    rules: list[Rule] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return whether everything loaded without error."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary."""
        return {
            "files": self.files,
            "rules": [r.id for r in self.rules],
            "errors": [e.to_dict() for e in self.errors],
        }


def _source_lines(text: str, count: int) -> list[int | None]:
    """Return, per ``[[rules]]`` entry, the file line where its ``when``/``script`` starts."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("[[rules]]")]
    result: list[int | None] = []
    for n, start in enumerate(starts[:count]):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        found: int | None = None
        for i in range(start + 1, end):
            match = re.match(r"^\s*(when|script)\s*=\s*(\"\"\"|''')?", lines[i])
            if match:
                opener = match.group(2)
                rest = lines[i][match.end() :]
                found = i + 1
                if opener and not rest.strip():
                    found = i + 2  # TOML drops the newline right after the opening quotes
                break
        result.append(found)
    result.extend([None] * (count - len(result)))
    return result


def load_rules_text(text: str, *, origin: str = "<string>") -> LoadReport:
    """Load the ``[[rules]]`` of one TOML document; a bad rule is reported, the rest load."""
    report = LoadReport(files=[origin])
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        report.errors.append(
            RuleValidationError(
                f"invalid TOML: {exc}", file=origin, line=int(found.group(1)) if found else None
            )
        )
        return report
    entries = doc.get("rules", [])
    unknown = sorted(set(doc) - {"rules"})
    if unknown:
        report.errors.append(
            RuleValidationError(f"unknown top-level keys {unknown}; use [[rules]]", file=origin)
        )
    if not isinstance(entries, list):
        report.errors.append(RuleValidationError("'rules' must be an array of tables", file=origin))
        return report
    starts = _source_lines(text, len(entries))
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            report.errors.append(
                RuleValidationError(f"rules[{index}] is not a table", file=origin, index=index)
            )
            continue
        try:
            rule = parse_rule(entry)
        except RuleValidationError as exc:
            exc.fields.update(file=origin, index=index)
            report.errors.append(exc)
            continue
        report.rules.append(
            rule.model_copy(update={"origin": origin, "origin_line": starts[index]})
        )
    return report


def load_rules_path(path: str | Path) -> LoadReport:
    """Load a rule file, or every ``*.toml`` in a directory (sorted); duplicate ids are errors."""
    root = Path(path)
    report = LoadReport()
    if root.is_dir():
        files = sorted(root.glob("*.toml"))
    elif root.exists():
        files = [root]
    else:
        report.errors.append(RuleValidationError(f"{root} does not exist", file=str(root)))
        return report
    seen: dict[str, str] = {}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.files.append(str(file))
            report.errors.append(RuleValidationError(f"cannot read: {exc}", file=str(file)))
            continue
        part = load_rules_text(text, origin=str(file))
        report.files.extend(part.files)
        report.errors.extend(part.errors)
        for rule in part.rules:
            if rule.id in seen:
                report.errors.append(
                    RuleValidationError(
                        f"duplicate rule id {rule.id!r} (first defined in {seen[rule.id]})",
                        rule_id=rule.id,
                        file=str(file),
                    )
                )
                continue
            seen[rule.id] = str(file)
            report.rules.append(rule)
    return report


__all__ = [
    "AGGREGATES",
    "MAX_SOURCE_BYTES",
    "RULE_ID_PATTERN",
    "Action",
    "AlertAction",
    "CountWindow",
    "ForwardAction",
    "HoppingWindow",
    "LoadReport",
    "PluginAction",
    "PublishAction",
    "Rule",
    "SessionWindow",
    "TumblingWindow",
    "WebhookAction",
    "Window",
    "check_plugins",
    "check_sinks",
    "load_rules_path",
    "load_rules_text",
    "parse_aggregate",
    "parse_rule",
    "render_template",
    "render_value",
    "template_fields",
]
