"""Lua rules: compiled once, cached, sandboxed, evaluated in fused batches, reloaded atomically."""

from flux.rules.actions import (
    ActionExecutor,
    ExecutionReport,
    PublishMessage,
    WebhookRequest,
    alert_row,
    publish_message,
    webhook_request,
)
from flux.rules.batch import RuleFailure, RuleMatch
from flux.rules.engine import ReloadReport, RuleEngine
from flux.rules.errors import (
    RuleCompileError,
    RuleError,
    RuleMemoryError,
    RuleRuntimeError,
    RuleTimeout,
    RuleValidationError,
)
from flux.rules.model import (
    Action,
    AlertAction,
    ForwardAction,
    LoadReport,
    PluginAction,
    PublishAction,
    Rule,
    WebhookAction,
    check_plugins,
    check_sinks,
    load_rules_path,
    load_rules_text,
    parse_rule,
)
from flux.rules.sandbox import LuaSandbox
from flux.rules.stats import RuleStatus
from flux.rules.testing import RuleTestResult
from flux.rules.tools import (
    ValidationReport,
    run_rule_test,
    run_rule_test_async,
    validate_rules,
)
from flux.topics import TopicMatcher, topic_matches, validate_filter

__all__ = [
    "Action",
    "ActionExecutor",
    "AlertAction",
    "ExecutionReport",
    "ForwardAction",
    "LoadReport",
    "LuaSandbox",
    "PluginAction",
    "PublishAction",
    "PublishMessage",
    "ReloadReport",
    "Rule",
    "RuleCompileError",
    "RuleEngine",
    "RuleError",
    "RuleFailure",
    "RuleMatch",
    "RuleMemoryError",
    "RuleRuntimeError",
    "RuleStatus",
    "RuleTestResult",
    "RuleTimeout",
    "RuleValidationError",
    "TopicMatcher",
    "ValidationReport",
    "WebhookAction",
    "WebhookRequest",
    "alert_row",
    "check_plugins",
    "check_sinks",
    "load_rules_path",
    "load_rules_text",
    "parse_rule",
    "publish_message",
    "run_rule_test",
    "run_rule_test_async",
    "topic_matches",
    "validate_filter",
    "validate_rules",
    "webhook_request",
]
