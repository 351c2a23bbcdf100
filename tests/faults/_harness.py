"""What the fault scenarios share: a sequence-numbering device, a gateway subprocess, tallies.

Every scenario sends messages carrying ``{"seq": n}`` and judges the database afterwards:
``missing`` (sent, PUBACKed by the broker, never stored) must be 0, ``duplicates`` (stored
more than once) may only come from the last in-flight window and are counted.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select, text

from flux.config import DatabaseConfig
from flux.store.database import create_engine
from flux.store.schema import dead_letters, devices, events
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


# -- the device ------------------------------------------------------------------------------


class SeqDevice:
    """A paho device with a persistent session that numbers its messages and tracks PUBACKs.

    ``clean_session=False`` and a fixed client id: after a broker restart paho reconnects on
    its own and republishes every QoS 1 message it holds no PUBACK for. A message published
    while disconnected stays queued in paho and goes out on the reconnect.
    """

    def __init__(self, host: str, port: int, *, client_id: str | None = None) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"seqdev-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._lock = threading.Lock()
        self._seq_by_mid: dict[int, int] = {}
        self._early: set[int] = set()
        self.acked: set[int] = set()
        self.sent = 0
        self.connects = 0
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.client.loop_stop()
            raise TimeoutError("the device simulator could not connect")

    def _on_connect(self, *args: Any) -> None:
        self.connects += 1
        self.connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, *args: Any) -> None:
        with self._lock:
            seq = self._seq_by_mid.pop(mid, None)
            if seq is None:
                self._early.add(mid)  # acknowledged before publish() returned its mid
            else:
                self.acked.add(seq)

    def publish_seq(
        self, topic: str, seqs: range, *, qos: int = 1, pad: int = 0, pace_every: int = 0
    ) -> None:
        """Publish ``{"seq": n}`` for each n; ``pace_every`` yields the GIL every n messages."""
        filler = "x" * pad
        for seq in seqs:
            payload = orjson.dumps({"seq": seq, "pad": filler} if pad else {"seq": seq})
            # Not under self._lock: paho calls on_publish holding its own message lock.
            info = self.client.publish(topic, payload, qos=qos)
            if qos:
                with self._lock:
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        self.acked.add(seq)
                    else:
                        self._seq_by_mid[info.mid] = seq
            self.sent += 1
            if pace_every and seq % pace_every == 0:
                time.sleep(0.001)  # pacing a stream, not synchronising

    def unacked(self) -> int:
        with self._lock:
            return len(self._seq_by_mid)

    def all_acked(self) -> bool:
        return self.unacked() == 0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the database ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """What the database holds for one stream of sequence numbers."""

    sent: int
    stored_rows: int
    distinct: int
    missing: list[int]
    duplicates: int

    def describe(self) -> str:
        head = ", ".join(map(str, self.missing[:20]))
        more = " ..." if len(self.missing) > 20 else ""
        return (
            f"sent {self.sent}, stored rows {self.stored_rows} ({self.distinct} distinct), "
            f"missing {len(self.missing)} [{head}{more}], duplicates {self.duplicates}"
        )


class Db:
    """Read what a gateway wrote, through its own engine (SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(DatabaseConfig(url=url))

    async def close(self) -> None:
        await self.engine.dispose()

    async def seqs(self, topic: str) -> list[int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(events.c.payload).where(events.c.topic == topic))
            return [row[0]["seq"] for row in rows]

    async def tally(self, topic: str, sent: int) -> Tally:
        seqs = await self.seqs(topic)
        counts = Counter(seqs)
        return Tally(
            sent=sent,
            stored_rows=len(seqs),
            distinct=len(counts),
            missing=[seq for seq in range(sent) if seq not in counts],
            duplicates=sum(n - 1 for n in counts.values()),
        )

    async def count(self, table: Any, *where: Any) -> int:
        async with self.engine.connect() as conn:
            statement = select(func.count()).select_from(table)
            for clause in where:
                statement = statement.where(clause)
            return int((await conn.execute(statement)).scalar_one())

    async def device_count(self, device_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.execute(
                select(devices.c.message_count).where(devices.c.id == device_id)
            )
            return int(value.scalar_one_or_none() or 0)

    async def dead_letters(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(select(dead_letters))).mappings()]

    async def has_all(self, topic: str, sent: int) -> bool:
        return len(set(await self.seqs(topic))) >= sent

    async def stored_at_least(self, topic: str, count: int) -> bool:
        """Whether ``count`` rows (duplicates included) are stored on ``topic``."""
        return len(await self.seqs(topic)) >= count

    async def integrity_ok(self) -> str:
        async with self.engine.connect() as conn:
            return str((await conn.execute(text("PRAGMA integrity_check"))).scalar_one())


async def prime_session(gateway: GatewayProcess, sim: SeqDevice, db: Db, dev: str) -> None:
    """Create the gateway's persistent session and subscription, then stop it cleanly: what
    the device publishes from now on waits in the broker for the next gateway."""
    gateway.start()
    await gateway.wait_ready()
    await wait_subscribed(sim, db, dev)
    gateway.signal(signal.SIGTERM)
    assert await gateway.wait_exit() == 0, gateway.log()[-3000:]


async def wait_subscribed(sim: SeqDevice, db: Db, dev: str, *, timeout: float = 30) -> None:
    """Publish probes on ``devices/<dev>/probe`` until one is stored: the gateway subscribed."""
    topic = f"devices/{dev}/probe"
    loop_deadline = time.monotonic() + timeout
    while True:
        sim.client.publish(topic, b'{"probe": true}', qos=1)
        try:
            await wait_until(
                lambda: _has_rows(db, topic), timeout=1.0, what="a probe message stored"
            )
            return
        except AssertionError:
            if time.monotonic() > loop_deadline:
                raise AssertionError(
                    f"the gateway did not store a probe within {timeout}s"
                ) from None


async def _has_rows(db: Db, topic: str) -> bool:
    return await db.count(events, events.c.topic == topic) > 0


# -- the gateway as a process -------------------------------------------------------------------


def write_config(
    directory: Path,
    *,
    mqtt_port: int,
    dev: str,
    database_url: str | None = None,
    http_port: int | None = None,
    **sections: dict[str, Any],
) -> Path:
    """Write a config.toml for one gateway process; return its path."""
    data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": http_port or free_port()},
        "metrics": {"port": 0},
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{mqtt_port}",
            "client_id": f"flux-fault-{uuid.uuid4().hex[:8]}",
            "topics": [f"devices/{dev}/#"],
            "session_expiry_s": 300,
            "embedded": "off",
            "embedded_data_dir": str(directory / "broker"),
            "reconnect_max_delay_s": 2.0,
        },
        "database": {"url": database_url or f"sqlite+aiosqlite:///{directory}/flux.db"},
        "rules": {"dir": str(directory / "rules")},
        "plugins": {"dir": str(directory / "plugins")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    (directory / "rules").mkdir(exist_ok=True)
    (directory / "plugins").mkdir(exist_ok=True)
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        lines.append("")
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FLUX_* overrides, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLUX_")}
    env.update(extra)
    return env


class GatewayProcess:
    """``python -m flux run --config ...`` as a child process, with its log in a file."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, name: str = "gw"
    ) -> None:
        self.config = config
        self.env = env or clean_env()
        self.log_path = config.parent / f"{name}.log"
        self.http_port = int(tomllib.loads(config.read_text())["server"]["port"])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flux", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.config.parent,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    async def wait_ready(self, timeout: float = 60) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:

            async def ready() -> bool:
                if self.returncode() is not None:
                    raise AssertionError(
                        f"the gateway exited with {self.returncode()}:\n{self.log()[-3000:]}"
                    )
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(ready, timeout=timeout, what="gateway /ready")

    async def wait_exit(self, timeout: float = 60) -> int:
        await wait_until(
            lambda: self.returncode() is not None, timeout=timeout, what="gateway exit"
        )
        code = self.returncode()
        assert code is not None
        return code

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """End the process if it still runs (test clean-up)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def metric_value(metrics_text: str, name: str, **labels: str) -> float | None:
    """Return one sample's value from Prometheus text, or None when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == wanted:
            return float(value)
    return None


# -- databases the test can take away ---------------------------------------------------------


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl) on a free port, stoppable.

    The machine's shared PostgreSQL cannot be stopped by a test; this one can. As root the
    cluster runs as the ``postgres`` system user (initdb refuses root).
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flux-pg-"))
        self.data = self.dir / "data"
        self._as: list[str] = []

    def unavailable_reason(self) -> str | None:
        if self.bin is None or not (self.bin / "initdb").exists():
            return "no initdb/pg_ctl found (Debian's postgresql package provides them)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run initdb as"
            shutil.chown(self.dir, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        return None

    def _run(self, *args: str) -> None:
        assert self.bin is not None
        result = subprocess.run(
            [*self._as, str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}\n{result.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "pg.log"),
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def cleanup(self) -> None:
        with suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a network between the gateway and the broker that the test can break ----------------------


class MqttProxy:
    """A TCP proxy to a broker, on its own thread and loop, that can swallow one client's
    packets: ``blackhole("-pub")`` drops everything the connections whose MQTT client id ends
    with ``-pub`` send from then on (the broker never sees them, so it never answers), as a
    half-broken network would; ``heal()`` forwards again and ``drop_all()`` cuts every
    connection (what a gateway's death leaves in flight is gone)."""

    def __init__(self, broker_port: int) -> None:
        import asyncio

        self.broker_port = broker_port
        self.port = free_port()
        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        self._suffix: str | None = None
        self._server: Any = None
        self._writers: list[Any] = []
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("the proxy did not start")

    def _run(self) -> None:
        asyncio = self._asyncio
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self._started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _serve(self, reader: Any, writer: Any) -> None:
        asyncio = self._asyncio
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        self._writers += [writer, up_writer]
        client_id: list[str] = []

        async def upstream() -> None:
            head = b""
            while data := await reader.read(65536):
                if not client_id:
                    head += data
                    found = _connect_client_id(head)
                    if found is None:
                        continue
                    client_id.append(found)
                    data, head = head, b""
                if self._suffix is not None and client_id[0].endswith(self._suffix):
                    continue  # swallowed
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
            writer.close()

        with suppress(Exception):
            await asyncio.gather(upstream(), downstream())

    def blackhole(self, suffix: str) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_suffix", suffix)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_suffix", None)

    def drop_all(self) -> None:
        def close() -> None:
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(close)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            await self._server.wait_closed()

        self._asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _connect_client_id(data: bytes) -> str | None:
    """The client id of the MQTT CONNECT at the start of ``data``, None until it is whole."""
    length, index = _varint(data, 1)
    if length is None or len(data) < index + length:
        return None
    index += 2 + int.from_bytes(data[index : index + 2], "big")  # the protocol name
    level = data[index]
    index += 4  # level, flags, keepalive
    if level >= 5:
        properties, index = _varint(data, index)
        index += properties or 0
    id_length = int.from_bytes(data[index : index + 2], "big")
    return data[index + 2 : index + 2 + id_length].decode()


def _varint(data: bytes, index: int) -> tuple[int | None, int]:
    """MQTT's variable byte integer at ``index``: (value, index after it); None if cut off."""
    value, shift = 0, 0
    while index < len(data):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            return value, index
        shift += 7
    return None, index
