"""The tests' and scripts' shared harness: real brokers, databases, gateway processes,
simulated devices, and waiting on conditions. Tests and scripts import it the same way
(``from tests.harness import ...``; scripts run as modules from the repository root)."""

from tests.harness.brokers import PrivateMosquitto
from tests.harness.database import Db, Tally, sqlite_write_lock
from tests.harness.devices import (
    Device,
    FleetDevice,
    Listener,
    SeqDevice,
    Subscriber,
    device,
    fleet,
    fleet_messages,
    telemetry,
)
from tests.harness.fake_broker import FakeBroker, Session
from tests.harness.gateway_process import (
    ROOT,
    GatewayProcess,
    clean_env,
    flux_command,
    metric_value,
    prime_session,
    wait_subscribed,
    write_config,
)
from tests.harness.hook_server import HookServer, Received
from tests.harness.postgres import PrivatePostgres
from tests.harness.proxy import MqttProxy
from tests.harness.settings import make_settings
from tests.harness.tools import REQUIRE_TOOLS_ENV, mosquitto_available, require_tool
from tests.harness.upstream import (
    PASSWORD,
    USER,
    Upstream,
    UpstreamListener,
    first_arrivals_in_order,
    upstream_broker,
)
from tests.harness.waiting import free_port, port_open, unique, wait_port, wait_until

__all__ = [
    "PASSWORD",
    "REQUIRE_TOOLS_ENV",
    "ROOT",
    "USER",
    "Db",
    "Device",
    "FakeBroker",
    "FleetDevice",
    "GatewayProcess",
    "HookServer",
    "Listener",
    "MqttProxy",
    "PrivateMosquitto",
    "PrivatePostgres",
    "Received",
    "SeqDevice",
    "Session",
    "Subscriber",
    "Tally",
    "Upstream",
    "UpstreamListener",
    "clean_env",
    "device",
    "first_arrivals_in_order",
    "fleet",
    "fleet_messages",
    "flux_command",
    "free_port",
    "make_settings",
    "metric_value",
    "mosquitto_available",
    "port_open",
    "prime_session",
    "require_tool",
    "sqlite_write_lock",
    "telemetry",
    "unique",
    "upstream_broker",
    "wait_port",
    "wait_subscribed",
    "wait_until",
    "write_config",
]
