"""The Lua sandbox: one hardened ``lupa.lua54`` runtime with an instruction budget and memory cap.

What rules can reach: ``math`` (no randomseed), ``string`` (costly functions charged against the
budget; no dump/pack), ``table``, ``utf8``, ``pairs ipairs next select tonumber tostring type
error assert unpack``, the payload fields as globals, ``msg``, ``topic``, ``device_id``,
``received_at`` and, for rules that mention it, ``state``. Everything else (``io os require
package load loadstring dofile debug collectgarbage getmetatable setmetatable rawget rawset
rawequal pcall xpcall coroutine python``) is absent, globals cannot be assigned, and the library
tables are read-only proxies.

Budget: a count hook fires every ``tick`` instructions and charges them to the rule being
evaluated; C functions whose cost grows with their input (pattern matching, ``rep``, ``concat``,
``sort``, ...) are wrapped and charge an estimate first, because hooks never fire inside C. Lua
patterns backtrack: ``q`` variable-length items on an ``n``-byte subject cost about
``n^(q+1)`` steps (a short pattern on a few KiB can run for seconds), so that estimate is
charged and a call that would exceed the budget fails at once. A rule that has run
``16 * tick`` instructions also has its CPU time checked (``os.clock``) against
``time_limit_s``: instructions such as ``..`` on long strings are O(n).

Memory: ``max_memory`` caps the whole runtime (rules, per-device state, the batch in flight).

Thread-safety: a runtime must only be used by one thread at a time; the engine serialises.
"""

from __future__ import annotations

import weakref
from importlib import resources
from typing import Any, ClassVar

import lupa.lua54 as lua54

#: What a host function raises when Lua refuses (for example a ``state`` beyond its limits).
LuaError = lua54.LuaError

#: Instructions between two count-hook calls (the budget's granularity).
DEFAULT_TICK = 1000
DEFAULT_INSTRUCTION_BUDGET = 1_000_000
DEFAULT_MEMORY_LIMIT = 64 * 1024 * 1024
DEFAULT_TIME_LIMIT_S = 0.25
DEFAULT_MAX_STATE_DEVICES = 10_000
DEFAULT_MAX_STATE_KEYS = 32
MAX_STATE_STRING = 1024
MAX_PATTERN = 512
#: A match reaches Python as ``event position * RULE_CODE + rule index`` (so at most 2**20 rules).
RULE_CODE = 1 << 20
#: The host's meter holds ``rule index * METER_SHIFT + budget units used`` in one number.
METER_SHIFT = 1 << 40


def _deny_attributes(obj: object, attr_name: object, is_setting: bool) -> str:
    """Refuse every Python attribute access from Lua (no Python object is ever handed to rules)."""
    raise AttributeError("Python attribute access is disabled in rules")


class LuaSandbox:
    """Own one hardened Lua 5.4 runtime and the host functions that run rules inside it."""

    _live: ClassVar[weakref.WeakSet[LuaSandbox]] = weakref.WeakSet()

    def __init__(
        self,
        *,
        instruction_budget: int = DEFAULT_INSTRUCTION_BUDGET,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        time_limit_s: float = DEFAULT_TIME_LIMIT_S,
        max_state_devices: int = DEFAULT_MAX_STATE_DEVICES,
        max_state_keys: int = DEFAULT_MAX_STATE_KEYS,
        tick: int = DEFAULT_TICK,
    ) -> None:
        if instruction_budget < tick:
            raise ValueError(f"instruction_budget must be at least {tick}")
        self.instruction_budget = instruction_budget
        self.memory_limit = memory_limit
        self.runtime: Any = lua54.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attributes,
            max_memory=memory_limit,
        )
        source = resources.files("flux.rules").joinpath("_host.lua").read_text(encoding="utf-8")
        bootstrap = self.runtime.execute("return load(...)", source, "=flux-host", "t")
        self.host: Any = bootstrap(
            tick,
            instruction_budget,
            time_limit_s,
            max_state_devices,
            max_state_keys,
            MAX_STATE_STRING,
            MAX_PATTERN,
            RULE_CODE,
            METER_SHIFT,
        )
        LuaSandbox._live.add(self)

    @classmethod
    def live_count(cls) -> int:
        """Return how many sandboxes (Lua runtimes) are alive in this process."""
        return len(cls._live)

    def compile(self, source: str, chunkname: str) -> tuple[Any, str | None]:
        """Load ``source`` in text mode with the rule environment: ``(function, None)`` or error."""
        fn, err = self.host.compile(source, chunkname)
        if fn is False:
            return None, str(err)
        return fn, None

    def table(self, items: Any, *, recursive: bool = False) -> Any:
        """Return a new Lua table built from a Python list or dict."""
        return self.runtime.table_from(items, recursive=recursive)

    def memory_kib(self) -> float:
        """Return Lua's own heap size in KiB (``collectgarbage("count")``)."""
        return float(self.host.memory_kib())

    def memory_used(self) -> int:
        """Return the bytes the runtime's allocator holds (what ``memory_limit`` caps)."""
        return int(self.runtime.get_memory_used())

    def collect(self) -> None:
        """Run a full Lua garbage collection."""
        self.host.full_gc()

    def state_devices(self, rule_id: str) -> int:
        """Return how many devices have a ``state`` table for ``rule_id``."""
        return int(self.host.state_devices(rule_id))

    def prune_states(self, keep: set[str]) -> None:
        """Drop the per-device state of rules not in ``keep``."""
        self.host.prune_states(self.table({rule_id: True for rule_id in keep}))


__all__ = [
    "DEFAULT_INSTRUCTION_BUDGET",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_TIME_LIMIT_S",
    "METER_SHIFT",
    "RULE_CODE",
    "LuaError",
    "LuaSandbox",
]
