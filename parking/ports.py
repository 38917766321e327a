"""Free TCP ports for the local servers that the bench and the tests start."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = _EPHEMERAL_RANGE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # the Linux default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, never handed out before by this process.

    Binding to port 0 would pick from the kernel's ephemeral range, which is
    where every outgoing connection (to RabbitMQ, Redis, the API) takes its
    local port: one may take the port between this call and the server's
    bind, and the server then fails to start. Ports below that range are only
    ever taken by servers that ask for them.
    """
    low, high = _ephemeral_range()
    below = low - _LOWEST >= 1_000
    pool = range(_LOWEST, low) if below else range(high + 1, 65_536)
    with _lock:
        for _ in range(500):
            port = random.choice(pool)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port found in {pool.start}-{pool.stop - 1}")
