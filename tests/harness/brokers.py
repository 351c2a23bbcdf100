"""MQTT brokers of a test's own: a private Mosquitto (TLS, passwords), a scripted one."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness.waiting import free_port, wait_port


class PrivateMosquitto:
    """A Mosquitto of the test's own on a free port; stoppable and restartable."""

    def __init__(
        self,
        *,
        port: int | None = None,
        persistent: bool = True,
        max_inflight: int = 0,
        as_embedded: bool = False,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flux-mosq-"))
        self.persistent = persistent
        #: Mosquitto's max_inflight_messages, also the Receive Maximum it announces (0: its
        #: default, 20).
        self.max_inflight = max_inflight
        #: Run with the configuration flux gives its embedded Mosquitto (what ships).
        self.as_embedded = as_embedded
        #: Only these users (name -> password) may connect; None: anyone, anonymously.
        self.users = users
        #: (certificate chain, key) files: the listener speaks TLS (mqtts://).
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.dir / "mosquitto.conf"
        if self.as_embedded:
            from flux.ingest.broker import mosquitto_config

            config.write_text(
                mosquitto_config(
                    host="127.0.0.1", port=self.port, data_dir=self.dir, max_payload_bytes=262144
                )
            )
        else:
            # Our own user: started by root, Mosquitto would switch to "mosquitto", which
            # cannot read files in this private folder.
            lines = [
                f"user {pwd.getpwuid(os.getuid()).pw_name}",
                f"listener {self.port} 127.0.0.1",
                "max_queued_messages 100000",
            ]
            if self.tls is not None:
                lines += [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"]
            if self.users is None:
                lines.append("allow_anonymous true")
            else:
                lines += ["allow_anonymous false", f"password_file {self._password_file()}"]
            if self.max_inflight:
                lines.append(f"max_inflight_messages {self.max_inflight}")
            if self.persistent:
                lines += ["persistence true", f"persistence_location {self.dir}/"]
            config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port("127.0.0.1", self.port)

    def _password_file(self) -> Path:
        path = self.dir / "passwords"
        path.touch(mode=0o600)
        for user, password in (self.users or {}).items():
            subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True)
        return path

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
