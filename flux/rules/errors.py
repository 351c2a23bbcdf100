"""Rule errors: every failure a rule author or operator can see, with the rule id and Lua line."""

from __future__ import annotations

from flux.errors import FluxError


class RuleError(FluxError):
    """Root of the rule errors, with ``rule_id`` and ``line`` (1-based, in the rule source)."""

    #: Short machine-readable kind, also the ``kind`` label of ``flux_rule_errors_total``.
    kind: str = "error"

    def __init__(
        self, message: str, *, rule_id: str | None = None, line: int | None = None, **fields: object
    ) -> None:
        super().__init__(message, rule_id=rule_id, line=line, **fields)
        self.rule_id = rule_id
        self.line = line

    def __str__(self) -> str:
        where = self.rule_id or "?"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.message}" if self.rule_id else self.message


class RuleValidationError(RuleError):
    """A rule definition is malformed: bad id, topic filter, action, template or size."""

    status_code = 422
    kind = "validation"


class RuleCompileError(RuleError):
    """A rule's Lua source does not compile; ``line`` points into the rule's ``when``/``script``."""

    status_code = 422
    kind = "compile"


class RuleRuntimeError(RuleError):
    """A rule raised a Lua error while evaluating an event."""

    status_code = 422
    kind = "runtime"


class RuleTimeout(RuleError):
    """A rule used up its instruction budget (or CPU time limit) for one evaluation."""

    status_code = 422
    kind = "timeout"


class RuleMemoryError(RuleError):
    """A rule hit the Lua memory cap."""

    status_code = 422
    kind = "memory"


#: Error class for each runtime ``kind`` reported by the sandbox.
ERROR_KINDS: dict[str, type[RuleError]] = {
    "runtime": RuleRuntimeError,
    "timeout": RuleTimeout,
    "memory": RuleMemoryError,
    "compile": RuleCompileError,
    "validation": RuleValidationError,
}

__all__ = [
    "ERROR_KINDS",
    "RuleCompileError",
    "RuleError",
    "RuleMemoryError",
    "RuleRuntimeError",
    "RuleTimeout",
    "RuleValidationError",
]
