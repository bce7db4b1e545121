"""The event log's hash chain, shared by the agent (which writes it) and the hub (which checks it).

hash(0) is `GENESIS` (32 zero bytes); hash(n) = sha256(hash(n-1) + body(n)), where
body(n) is event n's canonical JSON exactly as the agent stored it. On the wire a hash
is 64 lowercase hex digits.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

GENESIS = bytes(32)


def link(prev: bytes, body: bytes) -> bytes:
    """Return the chain hash of an event whose body is `body`, after an event hashed `prev`."""
    return hashlib.sha256(prev + body).digest()


def hashes(prev: bytes, bodies: Iterable[bytes]) -> list[bytes]:
    """Return the chain hash at each of `bodies` in turn, starting after `prev`."""
    sha, out = hashlib.sha256, []
    for body in bodies:
        prev = sha(prev + body).digest()
        out.append(prev)
    return out
