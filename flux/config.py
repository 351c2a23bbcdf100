"""Typed, frozen configuration loaded once from ``config.toml`` plus ``FLUX_*`` overrides.

An invalid file stops start-up with the key path and the reason, before any connection opens.
Environment overrides use ``FLUX_<SECTION>__<KEY>``; values are parsed as TOML scalars when
they look like one (``FLUX_EVENTBUS__CAPACITY=2048``), otherwise taken as strings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flux.errors import ConfigError
from flux.net import is_loopback
from flux.topics import validate_filter

OverflowPolicy = Literal["block", "drop_oldest", "drop_newest"]
_SINK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EmbeddedBroker = Literal["auto", "mosquitto", "amqtt", "off"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_token: str = ""
    #: A file holding the token (systemd credentials, Kubernetes secrets); read at start.
    api_token_file: str = ""
    #: Serve a non-loopback ``host`` without a token (refused otherwise).
    allow_unauthenticated: bool = False
    request_timeout_s: float = Field(30.0, gt=0)
    tls_cert_file: str = ""
    tls_key_file: str = Field("", validate_default=True)
    #: When set, clients must present a certificate signed by this CA.
    tls_client_ca_file: str = Field("", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        """Take the token from ``api_token_file`` when ``api_token`` is empty (the file's
        own checks are ``_readable_token_file``'s)."""
        if isinstance(data, dict) and data.get("api_token_file") and not data.get("api_token"):
            token = _read_token(str(data["api_token_file"]))
            if token:
                return {**data, "api_token": token}
        return data

    @field_validator("api_token_file")
    @classmethod
    def _readable_token_file(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        path = Path(value)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"{path} is empty")
        if info.data.get("api_token") != token:
            raise ValueError("set api_token or api_token_file, not both")
        return value

    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    @classmethod
    def _existing_file(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _key_with_cert(cls, value: str, info: ValidationInfo) -> str:
        if bool(value) != bool(info.data.get("tls_cert_file")):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return value

    @field_validator("tls_client_ca_file")
    @classmethod
    def _client_ca_with_cert(cls, value: str, info: ValidationInfo) -> str:
        if value and not info.data.get("tls_cert_file"):
            raise ValueError("requiring client certificates needs tls_cert_file and tls_key_file")
        return value

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_cert_file)


def _read_token(path: str) -> str:
    """The stripped contents of a token file, or "" when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


class MetricsConfig(_Section):
    #: A second port serving only /metrics; 0 (default): /metrics on the API port only.
    port: int = Field(0, ge=0, le=65535)
    host: str = "127.0.0.1"
    #: How often the gateway samples its own metrics for the dashboard and the report.
    sample_interval_s: float = Field(1.0, ge=0.1, le=60)
    #: How far back those samples reach (the dashboard's charts, the report's window).
    history_s: float = Field(300.0, ge=10, le=3600)

    @field_validator("history_s")
    @classmethod
    def _holds_two_samples(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("sample_interval_s")
        if interval is not None and value < 2 * interval:
            raise ValueError("must hold at least two samples (2 x sample_interval_s)")
        return value


def _mqtt_url(value: str) -> str:
    """``value`` if it is an ``mqtt://`` or ``mqtts://`` URL with a host; else ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError("scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    return value


class MqttConfig(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "flux-gateway"
    topics: tuple[str, ...] = ("devices/#",)
    qos: int = Field(1, ge=0, le=1)
    shared_group: str = ""
    username: str = ""
    password: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    tls_insecure: bool = False
    max_payload_bytes: int = Field(262_144, gt=0, le=268_435_455)
    embedded: EmbeddedBroker = "auto"
    embedded_data_dir: str = "data/broker"
    session_expiry_s: int = Field(86_400, ge=0, le=0xFFFFFFFF)
    receive_maximum: int = Field(0, ge=0, le=65535)
    keepalive_s: int = Field(30, ge=5)
    reconnect_max_delay_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return _mqtt_url(value)

    @field_validator("topics")
    @classmethod
    def _valid_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one topic filter is needed")
        for topic in value:
            problem = validate_filter(topic)
            if problem is not None:
                raise ValueError(f"{topic!r}: {problem}")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)

    @property
    def uses_tls(self) -> bool:
        return self.tls or urlsplit(self.url).scheme in ("mqtts", "ssl")


class EventBusConfig(_Section):
    capacity: int = Field(1024, ge=1, le=1_000_000)
    #: What a full queue does, for every subscriber (the store and the pipeline).
    overflow: OverflowPolicy = "block"
    #: Per subscriber, overriding ``overflow`` ("" = as ``overflow``).
    store_overflow: OverflowPolicy | Literal[""] = ""
    pipeline_overflow: OverflowPolicy | Literal[""] = ""

    def overflow_for(self, subscriber: Literal["store", "pipeline"]) -> OverflowPolicy:
        """The policy of ``subscriber``'s queue."""
        own = self.store_overflow if subscriber == "store" else self.pipeline_overflow
        return own or self.overflow


#: The tables retention purges by age and by size (``flux.store.retention``).
RETAINED_TABLES = ("events", "alerts", "dead_letters")


class DatabaseConfig(_Section):
    url: str = "sqlite+aiosqlite:///data/flux.db"
    batch_size: int = Field(500, ge=1, le=50_000)
    flush_interval_ms: int = Field(1, ge=1, le=60_000)
    #: Days of rows to keep in every retained table (0 = forever).
    retention_days: int = Field(30, ge=0)
    #: Per table, overriding ``retention_days`` (None: as it; 0: forever).
    events_retention_days: int | None = Field(None, ge=0)
    alerts_retention_days: int | None = Field(None, ge=0)
    dead_letters_retention_days: int | None = Field(None, ge=0)
    #: How often rows past their retention and the size budget are checked.
    retention_interval_s: float = Field(60.0, gt=0)
    #: The database's size budget in MiB (0 = unlimited): above it the oldest rows go.
    max_size_mb: float = Field(0.0, ge=0)
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "FULL"
    retry_max_delay_s: float = Field(10.0, gt=0)
    #: SQLAlchemy's connection pool: connections kept open, extra ones allowed beyond them,
    #: how long a caller waits for one, and the age after which one is replaced (0: never).
    pool_size: int = Field(5, ge=1, le=1000)
    max_overflow: int = Field(5, ge=0, le=1000)
    pool_timeout_s: float = Field(30.0, gt=0, le=3600)
    pool_recycle_s: float = Field(0.0, ge=0)

    def retention_days_of(self, table: str) -> int:
        """Days of ``table`` (one of ``RETAINED_TABLES``) to keep; 0 = forever."""
        own: int | None = getattr(self, f"{table}_retention_days")
        return self.retention_days if own is None else own

    @field_validator("url")
    @classmethod
    def _supported_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///PATH or postgresql+asyncpg://HOST/DB")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class RulesConfig(_Section):
    dir: str = "rules"
    quarantine_after: int = Field(5, ge=1)
    instruction_budget: int = Field(1_000_000, ge=1000)
    memory_limit_mb: int = Field(64, ge=4, le=4096)
    time_limit_s: float = Field(0.25, gt=0)
    max_hops: int = Field(8, ge=0, le=64)


class PluginsConfig(_Section):
    dir: str = "plugins"
    pool_size: int = Field(4, ge=1, le=256)
    cache_dir: str = ""
    max_hops: int = Field(8, ge=0, le=64)


class WebhooksConfig(_Section):
    max_attempts: int = Field(8, ge=1, le=100)
    base_delay_s: float = Field(1.0, gt=0)
    max_delay_s: float = Field(300.0, gt=0)
    concurrency: int = Field(4, ge=1, le=64)
    poll_interval_s: float = Field(1.0, gt=0)


#: What a sink's ``topic`` template may name.
SINK_TEMPLATE_FIELDS = frozenset({"topic", "device_id", "rule_id", "gateway", "event_id"})
#: Sinks the gateway always has: rule ``publish`` actions (the local broker) and ``webhook``
#: actions. Configured sinks cannot take these names.
BUILTIN_SINKS = frozenset({"local", "webhooks"})


def _template_problem(template: str) -> str | None:
    """Why ``template`` is not a valid sink topic template, or None."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return str(exc)
    unknown = sorted(set(fields) - SINK_TEMPLATE_FIELDS)
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}}; use {sorted(SINK_TEMPLATE_FIELDS)}"
    return None


class BaseSinkConfig(_Section):
    """What every sink has: routing, the backlog bound, alerting and retries."""

    #: MQTT topic filters of the events forwarded automatically; [] = only rule actions.
    topics: tuple[str, ...] = ()
    max_backlog_mb: float = Field(512.0, gt=0)
    overflow: Literal["block", "drop_oldest"] = "block"
    #: ``flux_degraded{reason="sink_backlog"}`` once the oldest row waits longer than this.
    alert_after_s: float = Field(300.0, gt=0)
    #: Cap of the retry backoff while the receiver is away or refuses.
    retry_max_delay_s: float = Field(30.0, gt=0)
    #: Rows read from the outbox and sent per batch.
    batch_size: int = Field(500, ge=1, le=10_000)
    enabled: bool = True

    @field_validator("topics")
    @classmethod
    def _valid_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for topic in value:
            problem = validate_filter(topic)
            if problem is not None:
                raise ValueError(f"{topic!r}: {problem}")
        return value


class MqttSinkConfig(BaseSinkConfig):
    """An upstream MQTT broker, on a persistent session of its own."""

    type: Literal["mqtt"]
    url: str
    client_id: str = Field("", max_length=128)
    username: str = ""
    password: str = ""
    tls_ca_file: str = ""
    tls_insecure: bool = False
    qos: int = Field(1, ge=0, le=1)
    retain: bool = False
    #: The upstream topic: {topic} {device_id} {rule_id} {gateway} {event_id}.
    topic: str = "{topic}"
    #: Send ``{"id", "topic", "device_id", "received_at", "payload"}`` instead of the
    #: payload alone (the event id always rides in the MQTT 5 user property ``flux-event-id``).
    envelope: bool = False
    keepalive_s: int = Field(30, ge=5)
    session_expiry_s: int = Field(86_400, ge=0, le=0xFFFFFFFF)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return _mqtt_url(value)

    @field_validator("topic")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        problem = _template_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_exists(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"{value}: no such file")
        return value

    def broker(self, gateway: str) -> MqttConfig:
        """The connection settings in the form the MQTT adapter takes."""
        return MqttConfig(
            url=self.url,
            client_id=self.client_id or f"{gateway}-sink",
            username=self.username,
            password=self.password,
            tls_ca_file=self.tls_ca_file,
            tls_insecure=self.tls_insecure,
            keepalive_s=self.keepalive_s,
            reconnect_max_delay_s=self.retry_max_delay_s,
            session_expiry_s=self.session_expiry_s,
            embedded="off",
        )


class HttpSinkConfig(BaseSinkConfig):
    """An HTTP ingest endpoint: events POSTed as JSON arrays, ``batch_size`` per request."""

    type: Literal["http"]
    url: str
    headers: dict[str, str] = {}
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("use http://HOST/... or https://HOST/...")
        return value


SinkConfig = Annotated[MqttSinkConfig | HttpSinkConfig, Field(discriminator="type")]


class ShutdownConfig(_Section):
    intake_timeout_s: float = Field(5.0, gt=0)
    drain_timeout_s: float = Field(15.0, gt=0)
    close_timeout_s: float = Field(5.0, gt=0)


class Settings(_Section):
    server: ServerConfig = ServerConfig()
    metrics: MetricsConfig = MetricsConfig()
    mqtt: MqttConfig = MqttConfig()
    eventbus: EventBusConfig = EventBusConfig()
    database: DatabaseConfig = DatabaseConfig()
    rules: RulesConfig = RulesConfig()
    plugins: PluginsConfig = PluginsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    sinks: dict[str, SinkConfig] = {}

    @field_validator("sinks")
    @classmethod
    def _sink_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if name in BUILTIN_SINKS:
                raise ValueError(f"{name!r} is a built-in sink; choose another name")
            if not _SINK_NAME.fullmatch(name):
                raise ValueError(f"{name!r}: use letters, digits, '-' and '_' (up to 64)")
        return value


def _parse_env_value(text: str) -> Any:
    """Read an override as a TOML value when it is one (number, boolean, array), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for name, text in environ.items():
        if not name.startswith("FLUX_") or "__" not in name:
            continue
        section, _, key = name[5:].lower().partition("__")
        if not section or not key:
            continue
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError("is not a section", key=section)
        target[key] = _parse_env_value(text)
    return merged


def _first_error(exc: ValidationError) -> ConfigError:
    error = exc.errors()[0]
    loc = list(error["loc"])
    if len(loc) > 2 and loc[0] == "sinks" and loc[2] in ("mqtt", "http"):
        del loc[2]  # the union's tag, not a key of the file
    key = ".".join(str(part) for part in loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return ConfigError(message, key=key)


def load_settings(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load and validate the configuration; raise ``ConfigError`` naming the bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from None
    data = _apply_env(data, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    _check_exposure(settings.server)
    return settings


def _check_exposure(server: ServerConfig) -> None:
    """Refuse an API reachable beyond this machine without a token, unless asked for."""
    if is_loopback(server.host) or server.api_token or server.allow_unauthenticated:
        return
    raise ConfigError(
        f"the API would listen on {server.host} without a token: set server.api_token (or "
        "server.api_token_file), or server.allow_unauthenticated = true",
        key="server.api_token",
    )


__all__ = [
    "RETAINED_TABLES",
    "DatabaseConfig",
    "EventBusConfig",
    "MetricsConfig",
    "MqttConfig",
    "PluginsConfig",
    "RulesConfig",
    "ServerConfig",
    "Settings",
    "WebhooksConfig",
    "load_settings",
]
