"""Loopback networking helpers for tests."""

import random
import socket

_EPHEMERAL_LOW = 32768
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as _fh:
        _EPHEMERAL_LOW = int(_fh.read().split()[0])
except (OSError, ValueError, IndexError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago.

    Picked below the kernel's ephemeral range when it can be: a port from bind(0) is an
    ephemeral one, which an outgoing connection (or its TIME_WAIT) can take between this
    probe and the server's bind when the machine makes many short connections.
    """
    low = 10000
    for _ in range(50) if _EPHEMERAL_LOW - low > 1000 else ():
        port = random.randrange(low, _EPHEMERAL_LOW)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
