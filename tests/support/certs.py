"""Test certificates from scripts/certs (the same script the demo uses), made once per module.

    files = make_certs(tmp_path_factory.mktemp("certs"))
    files / "ca.crt", files / "broker.crt", files / "store-0042.crt", ...

The set: the CA (`ca`), `broker` (SAN 127.0.0.1 and localhost), client certificates with
CN = name for `edge-hub`, `edge-feed`, `store-0042`, `store-0043` and `acl-observer`,
plus what the failure tests need: `rogue-ca.crt` (another CA) and `rogue-store-0042.*`
signed by it, `wronghost-broker.*` (SAN elsewhere.example only), `expired-broker.*` and
`expired-store-0042.*` (valid from two days ago until yesterday).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import require_binary

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "certs"
CLIENTS = ("edge-hub", "edge-hub-1", "edge-feed", "store-0042", "store-0043", "acl-observer")


def _run(*args: str) -> None:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/certs {' '.join(args)} failed: {done.stderr}")


def make_certs(directory: Path) -> Path:
    """Make the set above in `directory` (openssl required); return it."""
    require_binary("openssl")
    assert shutil.which("bash"), "scripts/certs needs bash"
    d = str(directory)
    _run(d, "broker", *CLIENTS)
    _run("--ca", "rogue-ca", "--prefix", "rogue-", d, "store-0042")
    _run("--prefix", "wronghost-", "--server", "--san", "DNS:elsewhere.example", d, "broker")
    _run("--expired", "--prefix", "expired-", d, "broker", "store-0042")
    return Path(directory)
