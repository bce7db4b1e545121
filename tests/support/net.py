"""Loopback networking helpers for tests."""

import random
import socket
from pathlib import Path

_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in _PORT_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago.

    Chosen below the kernel's ephemeral range, so the outgoing connections of other
    processes (hundreds of MQTT clients in a benchmark, say) cannot take it between this
    check and the server's bind, as they can a port the kernel handed out for port 0.
    """
    low, _ = _ephemeral()
    floor = 10000 if low > 12000 else 1024
    for _ in range(200):
        port = random.randint(floor, low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
