"""The plugin manifest: ``plugins/<name>/plugin.toml``, typed, frozen and validated once.

Every error names the key it is about (``limits.fuel``, ``topics.0``) so a plugin author can
fix the file without reading this module.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flux.plugins.errors import PluginLoadError
from flux.topics import validate_filter

#: The only ABI version this host implements (see ``plugins/README.md``).
ABI_VERSION = 1
MANIFEST_NAME = "plugin.toml"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_EXPORT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MiB = 1024 * 1024


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExportsSpec(_Spec):
    """Names of the entry points; at least one of them must be set."""

    on_msg: str | None = "on_msg"
    on_batch: str | None = None

    @field_validator("on_msg", "on_batch")
    @classmethod
    def _export_name(cls, value: str | None) -> str | None:
        if not value:  # "" switches an entry point off
            return None
        if not _EXPORT.match(value):
            raise ValueError(f"{value!r} is not a valid export name")
        return value

    @model_validator(mode="after")
    def _one_entry(self) -> ExportsSpec:
        if self.on_msg is None and self.on_batch is None:
            raise ValueError("set on_msg, on_batch or both")
        return self


class PoolSpec(_Spec):
    """Instance pool bounds; ``size`` falls back to the gateway's ``[plugins] pool_size``."""

    size: int | None = Field(None, ge=1, le=256)
    acquire_timeout_ms: int = Field(1000, ge=0, le=600_000)
    #: Where calls run: on the event loop (cheap calls) or on the gateway's plugin threads
    #: (calls that do enough work to gain from running in parallel). ``None``: the default.
    executor: Literal["inline", "thread"] | None = None


class LimitsSpec(_Spec):
    """Hard limits for every call. Exactly one of ``fuel`` (per message) and ``timeout_ms``.

    ``fuel``, ``max_output_bytes`` and ``max_outputs`` are per message: an ``on_batch`` call
    over N messages gets N times each. Memory, stack and tables are per instance.
    ``max_batch`` is the most messages one ``on_batch`` call receives (larger batches are
    split).
    """

    fuel: int | None = Field(None, ge=1_000, le=10**12)
    timeout_ms: int | None = Field(None, ge=1, le=60_000)
    max_memory_bytes: int = Field(16 * _MiB, ge=65_536, le=4 * 1024 * _MiB)
    max_stack_bytes: int = Field(512 * 1024, ge=16 * 1024, le=64 * _MiB)
    max_table_elements: int = Field(10_000, ge=0, le=10_000_000)
    max_output_bytes: int = Field(_MiB, ge=64, le=64 * _MiB)
    max_outputs: int = Field(256, ge=0, le=100_000)
    max_batch: int = Field(256, ge=1, le=100_000)

    @model_validator(mode="after")
    def _one_budget(self) -> LimitsSpec:
        if self.fuel is not None and self.timeout_ms is not None:
            raise ValueError("set fuel or timeout_ms, not both")
        return self

    @property
    def uses_fuel(self) -> bool:
        """Return whether calls are bounded by fuel (the default) rather than an epoch deadline."""
        return self.timeout_ms is None

    @property
    def fuel_per_message(self) -> int:
        """Return the fuel one message may burn (a batch gets this times its length)."""
        return self.fuel if self.fuel is not None else 10_000_000


class RecycleSpec(_Spec):
    """When an instance is replaced by a fresh one (it always is after a trap)."""

    after_executions: int = Field(10_000, ge=0)
    memory_high_water_bytes: int | None = Field(None, ge=65_536)


class PluginManifest(_Spec):
    """One plugin as declared by its ``plugin.toml``; ``root`` is the folder it came from."""

    name: str
    version: str = Field(min_length=1, max_length=64)
    abi: int
    wasm: str
    description: str = ""
    input: Literal["json", "raw"] = "json"
    topics: tuple[str, ...] = ()
    output_topic: str | None = None
    wasi: bool = False
    exports: ExportsSpec = ExportsSpec()
    pool: PoolSpec = PoolSpec()
    limits: LimitsSpec = LimitsSpec()
    recycle: RecycleSpec = RecycleSpec()
    root: Path = Path()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use 1-64 of a-z, 0-9, '-' and '_', starting with a letter or digit")
        return value

    @field_validator("abi")
    @classmethod
    def _abi(cls, value: int) -> int:
        if value != ABI_VERSION:
            raise ValueError(f"this gateway implements ABI {ABI_VERSION}, not {value}")
        return value

    @field_validator("wasm")
    @classmethod
    def _wasm(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not value.endswith(".wasm"):
            raise ValueError("must be a .wasm file inside the plugin folder")
        return value

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for topic_filter in value:
            problem = validate_filter(topic_filter)
            if problem is not None:
                raise ValueError(f"{topic_filter!r}: {problem}")
        return value

    @field_validator("output_topic")
    @classmethod
    def _output_topic(cls, value: str | None) -> str | None:
        if value is not None and (not value or "+" in value or "#" in value):
            raise ValueError("must be a concrete topic (it may contain {device_id})")
        return value

    @model_validator(mode="after")
    def _high_water(self) -> PluginManifest:
        mark = self.recycle.memory_high_water_bytes
        if mark is not None and mark > self.limits.max_memory_bytes:
            raise ValueError("recycle.memory_high_water_bytes is above limits.max_memory_bytes")
        return self

    @property
    def wasm_path(self) -> Path:
        """Return the absolute path of the module file."""
        return self.root / self.wasm

    @property
    def memory_high_water_bytes(self) -> int:
        """Return the memory size past which an instance is recycled (default 3/4 of the cap)."""
        mark = self.recycle.memory_high_water_bytes
        return mark if mark is not None else self.limits.max_memory_bytes * 3 // 4

    def pool_size(self, default: int) -> int:
        """Return the pool bound: the manifest's ``pool.size`` or the gateway default."""
        return self.pool.size if self.pool.size is not None else default


def _error_key(exc: ValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "is not a known key"
    elif error["type"] == "missing":
        message = "is required"
    return key, message


def parse_manifest(
    data: dict[str, Any], *, root: Path, origin: str = MANIFEST_NAME
) -> PluginManifest:
    """Validate an already-parsed manifest table; raise ``PluginLoadError`` naming the key."""
    plugin = str(data.get("name") or root.name)
    if "root" in data:
        raise PluginLoadError(f"{origin}: is not a known key", plugin=plugin, key="root")
    try:
        return PluginManifest.model_validate({**data, "root": root})
    except ValidationError as exc:
        key, message = _error_key(exc)
        raise PluginLoadError(f"{origin}: {message}", plugin=plugin, key=key) from None


def load_manifest(plugin_dir: Path) -> PluginManifest:
    """Read and validate ``<plugin_dir>/plugin.toml``; the module file must exist."""
    path = plugin_dir / MANIFEST_NAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PluginLoadError(f"{path} does not exist", plugin=plugin_dir.name) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PluginLoadError(f"{path}: {exc}", plugin=plugin_dir.name) from None
    manifest = parse_manifest(data, root=plugin_dir.resolve(), origin=str(path))
    if not manifest.wasm_path.is_file():
        raise PluginLoadError(
            f"{manifest.wasm_path} does not exist (run scripts/build_plugins.sh)",
            plugin=manifest.name,
            key="wasm",
        )
    return manifest


__all__ = [
    "ABI_VERSION",
    "MANIFEST_NAME",
    "ExportsSpec",
    "LimitsSpec",
    "PluginManifest",
    "PoolSpec",
    "RecycleSpec",
    "load_manifest",
    "parse_manifest",
]
