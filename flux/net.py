"""Small network helpers shared by configuration, the broker check and the servers."""

from __future__ import annotations

import ipaddress
import socket

from flux.errors import PortUnavailable


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int, *, setting: str) -> socket.socket:
    """Bind and listen on ``host:port``; ``PortUnavailable`` naming ``setting`` if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", key=setting
        ) from None
    sock.setblocking(False)
    return sock


__all__ = ["is_loopback", "listen"]
