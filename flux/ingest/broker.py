"""The broker the gateway talks to: whatever answers at ``mqtt.url``, else an embedded one.

The embedded broker is started on loopback when nothing answers at the configured address.

``auto`` prefers a child ``mosquitto`` when it is on PATH (a C broker with MQTT v5, disk
persistence and far more throughput) and falls back to amqtt, a pure-Python broker that
runs in-process (MQTT 3.1.1 only; gmqtt falls back to 3.1.1 with it; sessions live in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
from pathlib import Path
from typing import Any, Self

from flux.config import MqttConfig
from flux.errors import BrokerStartError
from flux.ingest._gmqtt import MQTTv50, MQTTv311
from flux.net import is_loopback

log = logging.getLogger(__name__)

#: What the embedded Mosquitto queues per persistent session while the gateway is away.
#: Mosquitto's own default is 1000, beyond which it drops messages.
EMBEDDED_MAX_QUEUED_MESSAGES = 1_000_000
#: QoS 1 messages in flight per client, in each direction; Mosquitto also announces it as
#: its Receive Maximum. Its default of 20 lets the gateway's rule publishes have only 20
#: unconfirmed at a time, one event-loop turn per refill.
EMBEDDED_MAX_INFLIGHT_MESSAGES = 1_000


async def broker_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Return True when something accepts TCP connections at ``host:port``."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def mosquitto_config(*, host: str, port: int, data_dir: Path, max_payload_bytes: int) -> str:
    """Return a Mosquitto configuration for a loopback-only, persistent, anonymous broker.

    ``user`` is ours: started by root, Mosquitto otherwise switches to the ``mosquitto``
    user, which cannot write its persistence file in the data folder we created.
    """
    return "\n".join(
        [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"listener {port} {host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 10",
            f"max_queued_messages {EMBEDDED_MAX_QUEUED_MESSAGES}",
            f"max_inflight_messages {EMBEDDED_MAX_INFLIGHT_MESSAGES}",
            f"message_size_limit {max_payload_bytes * 4}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ]
    )


class EmbeddedBroker:
    """Run a broker for the gateway's lifetime; ``kind`` is ``mosquitto`` or ``amqtt``."""

    def __init__(
        self,
        *,
        kind: str,
        host: str,
        port: int,
        data_dir: Path,
        max_payload_bytes: int,
        fallback: bool = False,
    ):
        self.kind = kind
        #: Chosen by ``auto`` because mosquitto is not on PATH.
        self.fallback = fallback
        self.host = host
        self.port = port
        self._data_dir = data_dir
        self._max_payload_bytes = max_payload_bytes
        self._process: asyncio.subprocess.Process | None = None
        self._amqtt: Any = None

    @classmethod
    def allowed(cls, config: MqttConfig) -> EmbeddedBroker | None:
        """The embedded broker the configuration allows at ``mqtt.url`` (loopback only, and
        ``mqtt.embedded`` not ``off``), else None; nothing is started yet."""
        if config.embedded == "off" or not is_loopback(config.host):
            return None
        return cls.choose(config)

    @classmethod
    def choose(cls, config: MqttConfig) -> EmbeddedBroker:
        """Pick the broker implementation the configuration asks for."""
        kind = config.embedded
        fallback = kind == "auto" and not shutil.which("mosquitto")
        if kind == "auto":
            kind = "amqtt" if fallback else "mosquitto"
        return cls(
            kind=kind,
            host=config.host,
            port=config.port,
            data_dir=Path(config.embedded_data_dir),
            max_payload_bytes=config.max_payload_bytes,
            fallback=fallback,
        )

    async def __aenter__(self) -> Self:
        if self._process is not None or self._amqtt is not None:
            raise RuntimeError("the embedded broker is already running")
        if self.kind == "mosquitto":
            await self._start_mosquitto()
        else:
            await self._start_amqtt()
        log.info("embedded %s broker listening on %s:%d", self.kind, self.host, self.port)
        if self.kind == "amqtt":
            why = "mosquitto is not on PATH" if self.fallback else "mqtt.embedded is amqtt"
            log.warning(
                "the embedded broker is amqtt (%s): it keeps sessions in memory, so QoS 1 "
                "messages queued for the gateway do not survive a restart of this process. "
                "Install mosquitto (Debian: apt install mosquitto) for a broker that keeps them",
                why,
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is not None:
            process, self._process = self._process, None
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 5)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        if self._amqtt is not None:
            broker, self._amqtt = self._amqtt, None
            await broker.shutdown()

    async def _start_mosquitto(self) -> None:
        executable = shutil.which("mosquitto")
        if executable is None:
            raise BrokerStartError("mosquitto is not on PATH")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        config_file = self._data_dir / "mosquitto.conf"
        config_file.write_text(
            mosquitto_config(
                host=self.host,
                port=self.port,
                data_dir=self._data_dir.resolve(),
                max_payload_bytes=self._max_payload_bytes,
            )
        )
        # Its own session: a Ctrl-C in the terminal reaches the gateway, which drains and
        # then stops the broker, instead of killing the broker under the last PUBACKs.
        self._process = await asyncio.create_subprocess_exec(
            executable,
            "-c",
            str(config_file),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        await self._wait_until_listening()

    async def _start_amqtt(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._amqtt = Broker(config)
        # start() returns once the listener is bound; no probe, since amqtt leaks the
        # transport of a connection that closes before sending CONNECT.
        await self._amqtt.start()

    async def _wait_until_listening(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._process is not None and self._process.returncode is not None:
                raise BrokerStartError(
                    f"mosquitto exited with code {self._process.returncode} at start"
                )
            if await broker_answers(self.host, self.port, timeout=0.5):
                return
            await asyncio.sleep(0.05)
        raise BrokerStartError(f"the embedded broker did not listen on {self.host}:{self.port}")


class MqttBroker:
    """Make sure a broker answers at ``mqtt.url`` for the gateway's lifetime.

    Whatever answers there is used as it is (``kind`` ``external``); else the embedded broker
    the configuration allows is started, and stopped on exit; else the gateway runs without
    one (``kind`` ``missing``, logged) and MQTT ingest keeps trying to connect.
    """

    def __init__(self, config: MqttConfig) -> None:
        self._config = config
        self.embedded: EmbeddedBroker | None = None
        self.kind = "external"

    @property
    def protocol_version(self) -> int:
        """The MQTT version to speak: amqtt answers MQTT 3.1.1 only, not a v5 CONNECT."""
        return int(MQTTv311 if self.kind == "amqtt" else MQTTv50)

    async def __aenter__(self) -> Self:
        config = self._config
        if await broker_answers(config.host, config.port):
            return self
        embedded = EmbeddedBroker.allowed(config)
        if embedded is None:
            self.kind = "missing"
            why = "is off" if config.embedded == "off" else "only runs on loopback"
            log.warning(
                "no MQTT broker answers at %s:%d; the embedded broker %s",
                config.host,
                config.port,
                why,
            )
            return self
        self.embedded = await embedded.__aenter__()
        self.kind = embedded.kind
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        embedded, self.embedded = self.embedded, None
        if embedded is not None:
            await embedded.__aexit__(None, None, None)


__all__ = [
    "EmbeddedBroker",
    "MqttBroker",
    "broker_answers",
    "mosquitto_config",
]
