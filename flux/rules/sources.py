"""Where rules come from: ``rules/*.toml`` (shipped, edited by rule authors) and the database.

A database rule (created through the API) overrides a file rule with the same id, so an
operator can change or disable a shipped rule without editing files; deleting that row
brings the file's version back. Every write bumps the rule's version, so the compile cache
(keyed by id and version) never serves a stale function.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.rules.errors import RuleError, RuleValidationError
from flux.rules.model import Rule, load_rules_path, parse_rule
from flux.store.database import writer_connection
from flux.store.schema import rules as rules_table


def _definition(rule: Rule) -> dict[str, Any]:
    return rule.model_dump(mode="json", exclude={"enabled", "version"})


class RuleSources:
    """Read rules from files and the database; create, change and delete database rules."""

    def __init__(self, *, engine: AsyncEngine, rules_dir: Path) -> None:
        self._engine = engine
        self._rules_dir = rules_dir
        dialect = engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        #: Per-file and per-rule errors of the last ``load`` (they never stop the others).
        self.load_errors: list[RuleError] = []

    def file_rules(self) -> dict[str, Rule]:
        """Return the rules of ``rules/`` by id (errors go to ``load_errors``)."""
        if not self._rules_dir.exists():
            self.load_errors = []
            return {}
        report = load_rules_path(self._rules_dir)
        self.load_errors = list(report.errors)
        return {rule.id: rule for rule in report.rules}

    async def database_rules(self) -> dict[str, Rule]:
        """Return the rules stored through the API, by id."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(rules_table))).mappings().all()
        found: dict[str, Rule] = {}
        for row in rows:
            data = {**row["definition"], "enabled": row["enabled"], "version": row["version"]}
            try:
                found[row["id"]] = parse_rule(data, origin="database")
            except RuleValidationError as exc:
                self.load_errors.append(exc)
        return found

    async def load(self) -> list[Rule]:
        """Return the merged rule set: file rules, overridden by database rules."""
        merged = self.file_rules()
        merged.update(await self.database_rules())
        return list(merged.values())

    async def find(self, rule_id: str) -> Rule | None:
        """Return the rule with ``rule_id`` as it is defined now (database first)."""
        stored = (await self.database_rules()).get(rule_id)
        return stored if stored is not None else self.file_rules().get(rule_id)

    async def save(self, rule: Rule) -> Rule:
        """Store ``rule`` in the database with a version above any it had; return it."""
        current = await self.find(rule.id)
        version = max(rule.version, current.version + 1 if current else 1)
        saved = rule.model_copy(update={"version": version, "origin": "database"})
        now = datetime.now(UTC)
        statement = self._insert(rules_table).values(
            id=saved.id,
            definition=_definition(saved),
            enabled=saved.enabled,
            version=saved.version,
            created_at=now,
            updated_at=now,
        )
        statement = statement.on_conflict_do_update(
            index_elements=[rules_table.c.id],
            set_={
                "definition": statement.excluded.definition,
                "enabled": statement.excluded.enabled,
                "version": statement.excluded.version,
                "updated_at": statement.excluded.updated_at,
            },
        )
        conn = await writer_connection(self._engine)
        try:
            async with conn.begin():
                await conn.execute(statement)
        finally:
            await conn.close()
        return saved

    async def delete(self, rule_id: str) -> bool:
        """Delete the database rule ``rule_id``; return whether there was one."""
        conn = await writer_connection(self._engine)
        try:
            async with conn.begin():
                result = await conn.execute(delete(rules_table).where(rules_table.c.id == rule_id))
        finally:
            await conn.close()
        return bool(result.rowcount)

    def in_files(self, rule_id: str) -> bool:
        return rule_id in self.file_rules()


__all__ = ["RuleSources"]
