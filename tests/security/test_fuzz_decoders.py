"""Fuzzing every decoder with large, deep, near-valid input; then the hub still acks a valid batch.

Hypothesis drives the structure-aware mutator of bench/fuzz.py (a valid message of each
kind with values replaced by ones nested past the recursion limit, huge or of the wrong
type, keys dropped or doubled, lists grown to tens of KB, bytes flipped, cut or repeated),
stacks up to four mutations, and adds raw bytes up to 40 KB. Each decoder must raise only
its own error or return a value that holds its contract (`bench.fuzz.check`). The config
loader (common/config.py) gets mutated TOML files and environment overrides. A bounded
atheris run (coverage-guided, in a subprocess) must end with zero crashes. Last, a few
hundred of the mutator's bad payloads go to a real hub over MQTT on a store's topic: each
is refused and counted, and a valid batch behind them is acked.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import events as ev
from agent.settings import AgentConfig
from bench import fuzz
from common.config import ConfigError, load_config
from sync import protocol
from sync.hub.settings import load_hub_config
from tests.sync.helpers import PREFIX, STORE, AckWatcher, batch, eventually, mqtt_client
from tests.sync.hubproc import HubProcess

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TARGETS = fuzz._targets()
SAMPLES = fuzz.samples()
IDS = [name for name, _, _ in TARGETS]
COMMAND = (b'{"command_id":"c1","events":[{"type":"received","sku":"A1","qty":2,"location":"floor"},'
           b'{"type":"sold","sku":"A1","qty":1,"location":"floor","occurred_at":"2026-11-27T13:05:00.123Z"}]}')


def _large(name: str, rng: random.Random) -> bytes:
    """A valid message of the kind grown to tens of KB (hundreds of events or items)."""
    if name.startswith("batch"):
        n = rng.choice((50, 200, 400))
        return fuzz._batch(1, n, hashes=name == "batch")
    sample = SAMPLES[name]
    doc = msgspec.json.decode(sample) if not name.endswith("zlib") else None
    if isinstance(doc, dict) and isinstance(doc.get("items"), list) and doc["items"]:
        doc["items"] = [dict(doc["items"][0], sku=f"S{i}") for i in range(rng.choice((100, 600)))]
        return msgspec.json.encode(doc)
    return sample


@st.composite
def near_valid(draw, name: str) -> bytes:
    rng = draw(st.randoms(use_true_random=False))
    payload = _large(name, rng) if draw(st.booleans()) else SAMPLES[name]
    for _ in range(draw(st.integers(1, 4))):
        payload = fuzz.mutate(rng, payload)
    return payload


def _holds(name: str, decode, allowed, payload: bytes) -> None:
    try:
        value = decode(payload)
    except allowed:
        return
    except Exception as exc:  # what this suite is for
        pytest.fail(f"{name}: {type(exc).__name__} escaped: {str(exc)[:200]} (payload {payload[:100]!r})")
    fuzz.check(name, value)


@pytest.mark.parametrize("index", range(len(TARGETS)), ids=IDS)
@SETTINGS
@given(data=st.data())
def test_near_valid_large_and_deep_payloads(index, data):
    name, decode, allowed = TARGETS[index]
    payload = data.draw(near_valid(name))
    _holds(name, decode, allowed, payload)


@pytest.mark.parametrize("index", range(len(TARGETS)), ids=IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(payload=st.binary(min_size=1000, max_size=40_000))
def test_raw_bytes_up_to_40_kb(index, payload):
    name, decode, allowed = TARGETS[index]
    _holds(name, decode, allowed, payload)


@pytest.mark.parametrize("index", range(len(TARGETS)), ids=IDS)
@pytest.mark.parametrize("depth", [1_000, 5_000, 50_000])
def test_nesting_past_the_recursion_limit_in_every_field(index, depth):
    """Every value of every valid message replaced, one at a time, by JSON nested `depth` deep."""
    name, decode, allowed = TARGETS[index]
    sample = SAMPLES[name]
    plain = sample if not name.endswith("zlib") else __import__("zlib").decompress(sample)
    doc = msgspec.json.decode(plain)
    deep = fuzz._Raw("[" * depth + "1" + "]" * depth)
    for path in [p for p in fuzz._paths(doc) if p][:60]:
        copy = msgspec.json.decode(plain)
        parent = copy
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = deep
        payload = fuzz._encode(copy).encode()
        if name.endswith("zlib"):
            payload = __import__("zlib").compress(payload)
        _holds(name, decode, allowed, payload)


@SETTINGS
@given(data=st.data())
def test_the_http_command_decoder_on_near_valid_input(data):
    rng = data.draw(st.randoms(use_true_random=False))
    payload = COMMAND
    for _ in range(data.draw(st.integers(1, 4))):
        payload = fuzz.mutate(rng, payload)
    try:
        ev.decode_command(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass


# --------------------------------------------------------------------- config

AGENT_TOML = (ROOT / "config" / "agent.example.toml").read_bytes()
HUB_TOML = (ROOT / "config" / "hub.example.toml").read_bytes()
TOML_VALUES = st.sampled_from([b"[" * 3000 + b"1" + b"]" * 3000, b"{a=" * 2000 + b"1" + b"}" * 2000, b"9" * 5000,
                               b"1e400", b"-1", b'"\xff\xfe"', b"'''", b"[]", b"{}", b"true", b"nan", b'"x"',
                               b"1979-05-27T07:32:00Z", b"[1, 'a', {b=2}]"])


@st.composite
def toml_files(draw) -> bytes:
    text = draw(st.sampled_from([AGENT_TOML, HUB_TOML]))
    lines = text.split(b"\n")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["value", "line", "bytes", "table"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "value" and b"=" in lines[i]:
            lines[i] = lines[i].split(b"=")[0] + b"= " + draw(TOML_VALUES)
        elif op == "line":
            lines.insert(i, draw(st.sampled_from([b"[mqtt]", b"[[stores]]", b"mqtt = 1", b"x.y.z = 1", b"[a.b.c]",
                                                  b"port = 1\nport = 2", b"\x00", b"\xff"])))
        elif op == "table":
            lines.insert(i, b"[" + b".".join([b"a"] * draw(st.integers(1, 3000))) + b"]")
        else:
            lines[i] = draw(st.binary(max_size=200))
    return b"\n".join(lines)


ENV_VALUES = st.sampled_from(["[" * 3000, "{a=" * 2000, "9" * 5000, "x", "", "[1,2]", "true", "1e400", "\ud800"[:0]])
ENV_NAMES = st.sampled_from(["MQTT__PORT", "MQTT__HOST", "STORE__ID", "SYNC__BATCH_MAX_EVENTS", "X__Y", "MQTT",
                             "A__B__C", "LOG__LEVEL", "STORAGE__PATH"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=toml_files(), env=st.dictionaries(ENV_NAMES, ENV_VALUES, max_size=2))
def test_config_loading_raises_only_config_error(tmp_path_factory, text, env):
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_bytes(text)
    for load in (lambda: load_config(path, AgentConfig, "EDGE_AGENT", {f"EDGE_AGENT__{k}": v for k, v in env.items()}),
                 lambda: load_hub_config(path, {f"EDGE_HUB__{k}": v for k, v in env.items()})):
        try:
            load()
        except ConfigError:
            pass


def test_config_shapes_that_broke_the_loader_are_config_errors(tmp_path):
    path = tmp_path / "config.toml"
    for text in (b"a = " + b"[" * 5000 + b"]" * 5000, b"a = " + b"{x=" * 3000 + b"1" + b"}" * 3000, b"\xff\xfe[mqtt]",
                 b"[mqtt]\nport = " + b"9" * 5000):
        path.write_bytes(text)
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(path, AgentConfig, "EDGE_AGENT", {})
    with pytest.raises(ConfigError, match="mqtt.port"):  # kept as a string, then refused as one
        load_config(None, AgentConfig, "EDGE_AGENT", {"EDGE_AGENT__MQTT__PORT": "9" * 5000})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, AgentConfig, "EDGE_AGENT", {})


# --------------------------------------------------------------------- atheris


def test_a_bounded_atheris_run_finds_no_crash():
    done = subprocess.run([sys.executable, "-m", "bench.fuzz", "--seconds", "4"], capture_output=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-4000:]
    figures = msgspec.json.decode(out.splitlines()[0])
    assert figures["crashes"] == 0
    assert figures["executions"] > 1000, figures
    assert figures["coverage_edges"] and figures["coverage_edges"] > 50, figures


# --------------------------------------------------------------------- the hub


def _refused(payload: bytes) -> bool:
    try:
        protocol.decode_batch(payload)
    except protocol.ProtocolError:
        return True
    return False


async def test_the_hub_refuses_a_fuzz_corpus_and_then_acks_a_valid_batch(tmp_path, broker):
    corpus = fuzz.bad_payloads(300, seed=11, accepts=lambda p: not _refused(p))
    assert len(corpus) == 300 and sum(len(p) for p in corpus) > 100_000
    sender = mqtt_client(broker, "test-fuzz-sender")
    await sender.start()
    await sender.wait_subscribed(10)
    topic = protocol.events_topic(PREFIX, STORE)
    try:
        with HubProcess(tmp_path / "hub", broker) as hub:
            async with AckWatcher(broker) as acks:
                for payload in corpus:
                    await asyncio.wait_for(sender.publish(topic, payload), 30)
                await eventually(lambda: sum(hub.stats()["rejected"].values()) == len(corpus), timeout=60,
                                 what="every bad payload refused and counted")
                await asyncio.wait_for(sender.publish(topic, batch(1, 5)), 10)
                await eventually(lambda: acks.last == 5, what="the valid batch acked after the corpus")
            assert hub.running
            assert [e["seq"] for e in hub.export()] == [1, 2, 3, 4, 5]
            assert "decoder_error" not in hub.stats()["rejected"], "every refusal is the decoder's own"
    finally:
        await sender.stop()


async def test_a_body_that_is_not_utf8_inside_a_string_is_400_not_500(agent):
    """msgspec raises UnicodeDecodeError there; the decoder turns it into its own error."""
    raw = b'{"command_id": "c\xff1", "events": [{"type": "received", "sku": "A1", "qty": 1}]}'
    status, body = await agent.post(None, raw=raw)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_json" and "not UTF-8" in body["error"]["message"]
    assert agent.last_seq == 0
