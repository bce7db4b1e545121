"""Coverage-guided fuzzing of the MQTT payload decoders (atheris, libFuzzer's engine).

    python -m bench.fuzz --seconds 300          # or --runs N; --corpus DIR keeps what it finds

Every decoder a payload from the broker meets (the hub's batch decoder with and without
its event view, the event decoder, acks, status, warehouse feeds, the catalog and the
availability snapshot, plain and zlib) must, on any input, raise only its own error
(`ProtocolError`, `Malformed`, `EventDecodeError`) or return a value that holds its
contract (`check`). Anything else is a crash: libFuzzer stops, prints the input and the
traceback, and this exits non-zero. The first input byte picks the decoder, the rest is
the payload. The seeds are valid payloads of every kind, deeply nested and large ones.

The last lines printed are the figures: `fuzz: executions N, seconds S, crashes C,
coverage E edges (F features), corpus K`. Coverage counts the Python code atheris
instruments (the project's modules; msgspec and zlib are C and not instrumented).

`mutate` and `bad_payloads` are the structure-aware mutator the tests share: a valid
message of each kind with one value replaced (nested past the recursion limit, huge,
of the wrong type), a key dropped or doubled, or bytes flipped, cut or repeated.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

STORE = "store-a"


# ------------------------------------------------------------------ the decoders


def _targets() -> list[tuple[str, Callable[[bytes], Any], tuple[type[BaseException], ...]]]:
    from agent import events as ev
    from sync import downlink, protocol
    from sync.hub.projection import EVENT_VIEW

    return [
        ("batch", protocol.decode_batch, (protocol.ProtocolError,)),
        ("batch_view", lambda p: protocol.decode_batch(p, EVENT_VIEW), (protocol.ProtocolError,)),
        ("event", ev.decode_event, (ev.EventDecodeError,)),
        ("ack", lambda p: protocol.decode(p, protocol.Ack), (protocol.ProtocolError,)),
        ("status", lambda p: protocol.decode(p, protocol.Status), (protocol.ProtocolError,)),
        ("warehouse", lambda p: protocol.decode(p, protocol.WarehouseStock), (protocol.ProtocolError,)),
        ("catalog_msg", lambda p: protocol.decode(p, protocol.Catalog), (protocol.ProtocolError,)),
        ("snapshot", lambda p: downlink.decode_snapshot(p, None, STORE), (downlink.Malformed,)),
        ("snapshot_zlib", lambda p: downlink.decode_snapshot(p, downlink.ZLIB_JSON, STORE), (downlink.Malformed,)),
        ("catalog", lambda p: downlink.decode_catalog(p, None), (downlink.Malformed,)),
        ("catalog_zlib", lambda p: downlink.decode_catalog(p, downlink.ZLIB_JSON), (downlink.Malformed,)),
    ]


def check(name: str, value: Any) -> None:
    """Raise AssertionError when a decoder returned a value that breaks its contract."""
    from agent import events as ev
    from sync import protocol

    if name.startswith("batch"):
        batch, events = value
        seqs = [head.seq for head, _ in events]
        assert seqs == list(range(batch.first_seq, batch.last_seq + 1)), "batch: seqs not first..last"
        assert {head.store_id for head, _ in events} == {batch.store_id}, "batch: another store's event"
        assert (batch.prev_hash is None) == (batch.hash is None), "batch: one chain hash only"
    elif name == "event":
        assert ev.decode_event(ev.encode(value)) == value, "event: does not survive its own encoding"
    elif name in ("ack", "status", "warehouse", "catalog_msg"):
        assert protocol.decode(protocol.encode(value), type(value)) == value, f"{name}: no round trip"
    elif name.startswith("snapshot"):
        head, rows, digest = value
        assert head.store_id == STORE and isinstance(digest, bytes), "snapshot: wrong store or digest"
        assert len({row[0] for row in rows}) == len(rows), "snapshot: a SKU twice"


# ------------------------------------------------------------------- the seeds


def samples() -> dict[str, bytes]:
    """One valid payload per decoder kind (compressed for the zlib kinds)."""
    event = _event(1)
    catalog = {"v": 1, "version": 2, "items": [{"sku": f"A{i}", "name": f"Item {i}"} for i in range(3)]}
    snapshot = {"v": 1, "store_id": STORE, "version": 3, "generated_at": "2026-11-27T13:05:00.123Z",
                "sources": [{"source_id": "sup-x", "name": "Supplier X", "kind": "supplier", "lead_time_s": 60,
                             "updated_at": "2026-11-27T13:00:00.000Z", "stale": False, "stale_after_s": 3600}],
                "items": [{"sku": f"A{i}", "nearby": [{"store_id": "store-b", "available": i}], "online": 2}
                          for i in range(3)]}
    snapshot["items"][0]["sources"] = {"sup-x": 4}
    out = {
        "batch": _batch(1, 3), "batch_view": _batch(1, 3, hashes=False), "event": _dump(event),
        "ack": _dump({"v": 1, "store_id": "store-0042", "acked_seq": 5}),
        "status": _dump({"v": 1, "store_id": "store-0042", "state": "online", "client_id": "c",
                         "accept": ["application/json+zlib"]}),
        "warehouse": _dump({"v": 1, "warehouse_id": "w1", "version": 1, "items": [{"sku": "A1", "available": 3}]}),
        "catalog_msg": _dump(catalog), "snapshot": _dump(snapshot), "catalog": _dump(catalog),
    }
    out["snapshot_zlib"] = zlib.compress(out["snapshot"])
    out["catalog_zlib"] = zlib.compress(out["catalog"])
    return out


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _event(seq: int, store_id: str = "store-0042") -> dict:
    return {"type": "received", "seq": seq, "event_id": f"00000000-0000-7000-8000-{seq:012d}", "store_id": store_id,
            "occurred_at": "2026-11-27T10:00:00.000Z", "recorded_at": "2026-11-27T10:00:00.000Z",
            "command_id": f"c{seq}", "schema": 1, "sku": "A1", "qty": 1, "location": "backroom", "ref": None}


def _batch(first: int, last: int, hashes: bool = True) -> bytes:
    from common import chain
    from sync import protocol

    bodies = [_dump(_event(s)) for s in range(first, last + 1)]
    if not hashes:
        return protocol.encode_batch("store-0042", first, last, bodies)
    prev = bytes(32) if first == 1 else bytes([first % 256]) * 32
    return protocol.encode_batch("store-0042", first, last, bodies, prev, chain.hashes(prev, bodies)[-1])


# ------------------------------------------------------------------- mutation

DEPTHS = (2, 50, 990, 1100, 3000, 20_000)


def deep_value(rng: random.Random, depth: int | None = None) -> Any:
    """A JSON text (as a marker string) nested `depth` deep: arrays, objects or both, closed or not."""
    depth = depth or rng.choice(DEPTHS)
    kind = rng.choice(("array", "object", "mixed"))
    if kind == "array":
        opened, closed = "[" * depth, "]" * depth
    elif kind == "object":
        opened, closed = '{"a":' * depth, "}" * depth
    else:
        opened, closed = '[{"a":' * (depth // 2), "}]" * (depth // 2)
    return _Raw(opened + "1" + (closed if rng.random() < 0.8 else ""))


class _Raw(str):
    """JSON text to splice in as it is (it need not be valid)."""


def odd_value(rng: random.Random) -> Any:
    return rng.choice([
        lambda: deep_value(rng), lambda: _Raw("9" * rng.choice((20, 400, 5000))), lambda: _Raw("-1e999999"),
        lambda: -1, lambda: 0, lambda: 2 ** 63, lambda: 2 ** 64 + 1, lambda: 1.5, lambda: None, lambda: True,
        lambda: "", lambda: "x" * rng.choice((65, 300, 20_000)), lambda: "\u00e9\ud7ff\U0001f600",
        lambda: "2026-13-45T99:99:99Z", lambda: [], lambda: {}, lambda: [1, 2], lambda: {"a": None},
        lambda: "0" * 64, lambda: "g" * 64,
    ])()


def _paths(value: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, at + (i,))
    return out


def _encode(value: Any) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + _encode(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return json.dumps(value)


def _structured(rng: random.Random, doc: Any) -> bytes:
    """Change one place of a decoded message: replace, drop, double or add a key, grow a list."""
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths) if paths else ()
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1] if path else None
    op = rng.choice(("replace", "replace", "drop", "double", "add", "grow"))
    if key is None:
        return _encode(odd_value(rng)).encode()
    if op == "replace":
        parent[key] = odd_value(rng)
    elif op == "drop":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[rng.choice(("zz", "v", "seq", "type", "__proto__"))] = odd_value(rng)
    elif op == "grow" and isinstance(parent, list):
        parent.extend([parent[key]] * rng.choice((2, 50, 400)))
    else:
        text = _encode(doc)
        if isinstance(parent, dict):  # the same key twice: a decoder keeps one, the raw body both
            frag = json.dumps(str(key)) + ":" + _encode(parent[key])
            at = text.find(frag)
            if at >= 0:
                return (text[:at] + frag + "," + text[at:]).encode()
        return text.encode()
    return _encode(doc).encode()


def _bytewise(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.choice((1, 2, 8))):
        if not data:
            break
        op = rng.choice(("flip", "cut", "insert", "repeat", "truncate"))
        at = rng.randrange(len(data))
        if op == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif op == "cut":
            del data[at:at + rng.choice((1, 4, 40))]
        elif op == "insert":
            data[at:at] = rng.choice((b"[", b"{", b'"', b"\\", b"\x00", b"\xff", b",", b":", b"\\ud800"))
        elif op == "repeat":
            data[at:at] = data[at:at + 16] * rng.choice((2, 100, 2000))
        else:
            del data[at:]
    return bytes(data)


def mutate(rng: random.Random, payload: bytes) -> bytes:
    """One near-valid variant of a valid payload: structural (on its JSON) or bytewise."""
    try:
        doc = json.loads(payload)
    except RecursionError:  # an earlier mutation nested it past the limit: bytes only
        return _bytewise(rng, payload)
    except ValueError:  # compressed: mutate the bytes, or the inflated JSON recompressed
        try:
            inner = zlib.decompress(payload)
        except zlib.error:
            return _bytewise(rng, payload)
        return zlib.compress(mutate(rng, inner)) if rng.random() < 0.7 else _bytewise(rng, payload)
    if rng.random() < 0.75:
        try:
            return _structured(rng, doc)
        except RecursionError:  # parsed, but too deep to walk again here
            pass
    return _bytewise(rng, payload)


def bad_payloads(n: int, seed: int = 1, accepts: Callable[[bytes], bool] | None = None) -> list[bytes]:
    """`n` varied, distinct mutations of every kind's sample; with `accepts`, only those it refuses."""
    rng, kinds, out, seen = random.Random(seed), list(samples().values()), [], set()
    while len(out) < n:
        payload = mutate(rng, rng.choice(kinds))
        if payload in seen or (accepts is not None and accepts(payload)):
            continue
        seen.add(payload)
        out.append(payload)
    return out


# -------------------------------------------------------------------- atheris


def one_input(targets, data: bytes) -> None:
    """The fuzz target: the first byte picks the decoder; a crash is any other exception."""
    if not data:
        return
    name, decode, allowed = targets[data[0] % len(targets)]
    try:
        value = decode(data[1:])
    except allowed:
        return
    check(name, value)


def _seed_dir(path: Path) -> None:
    rng = random.Random(7)
    path.mkdir(parents=True, exist_ok=True)
    names = [t[0] for t in _targets()]
    payloads = samples()
    for i, name in enumerate(names):
        (path / f"{name}-valid").write_bytes(bytes([i]) + payloads[name])
        for k in range(8):
            (path / f"{name}-mut{k}").write_bytes(bytes([i]) + mutate(rng, payloads[name])[:65_000])


def run_engine(argv: list[str]) -> None:
    """Run inside the fuzzing process: instrument the project's modules, hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["sync", "agent", "common"]):
        targets = _targets()
    sys.setrecursionlimit(1000)  # the default: the limit the decoders must cope with
    atheris.Setup(argv, lambda data: one_input(targets, data))
    atheris.Fuzz()


_STAT = re.compile(rb"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def fuzz(seconds: float | None, runs: int | None, corpus: Path | None, max_len: int = 65_536) -> dict:
    """Run the engine in a child process; return its figures (executions, seconds, crashes, coverage)."""
    with tempfile.TemporaryDirectory(prefix="edge-fuzz-") as tmp:
        work = corpus or Path(tmp) / "corpus"
        _seed_dir(work)
        args = [f"-max_len={max_len}", "-rss_limit_mb=4096", "-print_final_stats=1",
                f"-artifact_prefix={Path(tmp)}/crash-", "-timeout=60"]
        if seconds:
            args.append(f"-max_total_time={int(max(1, seconds))}")
        if runs:
            args.append(f"-runs={runs}")
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "bench.fuzz", "--engine", "--", *args, str(work)],
                              capture_output=True, cwd=Path(__file__).resolve().parent.parent)
        elapsed = time.monotonic() - started
        err = done.stderr
        stats = _STAT.findall(err)
        execs = re.search(rb"stat::number_of_executed_units:\s*(\d+)", err)
        crashed = done.returncode != 0 or b"Uncaught Python exception" in err or b"==ERROR" in err
        figures = {
            "executions": int(execs.group(1)) if execs else (int(stats[-1][0]) if stats else 0),
            "seconds": round(elapsed, 1),
            "crashes": 1 if crashed else 0,  # libFuzzer stops at the first
            "coverage_edges": int(stats[-1][1]) if stats else None,
            "features": int(stats[-1][2]) if stats else None,
            "corpus": int(stats[-1][3]) if stats else None,
            "returncode": done.returncode,
        }
        if crashed:
            figures["output"] = err.decode(errors="replace")[-6000:]
        return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine"]:
        run_engine([sys.argv[0], *argv[2:]])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--runs", type=int, default=None, help="stop after this many executions instead")
    parser.add_argument("--corpus", type=Path, default=None, help="keep the corpus here (default: a temp dir)")
    args = parser.parse_args(argv)
    figures = fuzz(None if args.runs else args.seconds, args.runs, args.corpus)
    if figures.get("output"):
        print(figures.pop("output"), file=sys.stderr)
    print(json.dumps(figures))
    print(f"fuzz: executions {figures['executions']}, seconds {figures['seconds']}, crashes {figures['crashes']},"
          f" coverage {figures['coverage_edges']} edges ({figures['features']} features), corpus {figures['corpus']}")
    return 1 if figures["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
