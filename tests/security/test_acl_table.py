"""Least privilege, tested: the shipped ACL (config/acl) on a real mosquitto, as a table.

Every row is one publish or subscribe attempt by store A (store-0042), store B
(store-0043), the hub (edge-hub) or a feed (edge-feed), tried four ways: password
identity (the plain listener, a password file) and certificate identity (a TLS listener
with require_certificate and use_identity_as_username: the CN is the username), each
over MQTT 5 and MQTT 3.1.1, with raw paho clients. An observer that may read and write
everything (a test-only ACL entry) tells what really passed:

* publish: allowed when the observer receives it. MQTT 5 also shows the PUBACK reason
  code (0x00, or 0x87 not authorized); MQTT 3.1.1 has none: a denial is seen only as
  nothing arriving.
* subscribe: allowed when the observer's probe on a matching topic reaches the
  subscriber. The SUBACK code is recorded too: a broker may refuse the filter (0x87 over
  MQTT 5, 0x80 over 3.1.1), but mosquitto 2.0 grants every filter (0x01) and applies
  the ACL to each message it would deliver, so there a denial is nothing arriving.

The table is printed (pytest -s) and written to the test's tmp_path as acl_table.md.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import require_binary
from tests.support.broker import Broker, TlsListener
from tests.support.certs import make_certs

ACL = Path(__file__).resolve().parents[2] / "config" / "acl"
P = "retail"
A, B, HUB, FEED, OBSERVER = "store-0042", "store-0043", "edge-hub", "edge-feed", "acl-observer"
WORKER = "edge-hub-1"   # a second hub worker's own identity (docs/scaling.md)
PASSWORD = "s3cret-for-tests"
SETTLE_S = 0.8   # after the last ack: how long a message that passed may take to arrive (loopback)


def t(path: str) -> str:
    return f"{P}/{path}"


# (identity, "pub" or "sub", topic or filter, topic the observer probes a filter with, allowed)
ROWS: list[tuple[str, str, str, str, bool]] = [
    (A, "pub", t(f"stores/{A}/events"), "", True),
    (A, "pub", t(f"stores/{B}/events"), "", False),
    (A, "pub", t(f"stores/{A}/status"), "", True),
    (A, "pub", t(f"stores/{B}/status"), "", False),
    (A, "pub", t(f"stores/{A}/ack"), "", False),
    (A, "pub", t(f"stores/{A}/availability"), "", False),
    (A, "pub", t("catalog"), "", False),
    (A, "pub", t("warehouses/wh-1/stock"), "", False),
    (A, "pub", t("sources/partner-1/stock"), "", False),
    (A, "pub", t("caps/cap-1"), "", False),
    (A, "pub", t("orders/order-1"), "", False),
    (A, "sub", t(f"stores/{A}/ack"), t(f"stores/{A}/ack"), True),
    (A, "sub", t(f"stores/{A}/availability"), t(f"stores/{A}/availability"), True),
    (A, "sub", t("catalog"), t("catalog"), True),
    (A, "sub", t(f"stores/{B}/ack"), t(f"stores/{B}/ack"), False),
    (A, "sub", t(f"stores/{B}/availability"), t(f"stores/{B}/availability"), False),
    (A, "sub", t(f"stores/{B}/events"), t(f"stores/{B}/events"), False),
    (A, "sub", t("stores/+/events"), t(f"stores/{B}/events"), False),
    (A, "sub", t("stores/+/ack"), t(f"stores/{B}/ack"), False),
    (A, "sub", t("#"), t(f"stores/{B}/availability"), False),
    (A, "sub", t("sources/+/stock"), t("sources/partner-1/stock"), False),
    (A, "sub", t("caps/+"), t("caps/cap-1"), False),
    (A, "sub", t("orders/+"), t("orders/order-1"), False),
    # Rehydrate (docs/protocol.md): a store asks for its own history only, and only it reads it.
    (A, "pub", t(f"stores/{A}/rehydrate"), "", True),
    (A, "pub", t(f"stores/{B}/rehydrate"), "", False),
    (A, "pub", t(f"stores/{A}/history"), "", False),
    (A, "sub", t(f"stores/{A}/history"), t(f"stores/{A}/history"), True),
    (A, "sub", t(f"stores/{B}/history"), t(f"stores/{B}/history"), False),
    (A, "sub", t("stores/+/rehydrate"), t(f"stores/{B}/rehydrate"), False),
    (B, "pub", t(f"stores/{B}/events"), "", True),
    (B, "pub", t(f"stores/{A}/events"), "", False),
    (B, "sub", t(f"stores/{B}/ack"), t(f"stores/{B}/ack"), True),
    (B, "sub", t(f"stores/{A}/ack"), t(f"stores/{A}/ack"), False),
    (HUB, "pub", t(f"stores/{A}/ack"), "", True),
    (HUB, "pub", t(f"stores/{B}/availability"), "", True),
    (HUB, "pub", t("catalog"), "", True),
    (HUB, "pub", t(f"stores/{A}/events"), "", False),
    (HUB, "pub", t(f"stores/{A}/history"), "", True),
    (HUB, "pub", t(f"stores/{A}/rehydrate"), "", False),
    (HUB, "sub", t("stores/+/rehydrate"), t(f"stores/{A}/rehydrate"), True),
    (HUB, "pub", t("warehouses/wh-1/stock"), "", False),
    (HUB, "pub", t("sources/partner-1/stock"), "", False),
    (HUB, "pub", t("caps/cap-1"), "", False),
    (HUB, "pub", t("orders/order-1"), "", False),
    (HUB, "sub", t("stores/+/events"), t(f"stores/{A}/events"), True),
    (HUB, "sub", t("stores/+/status"), t(f"stores/{B}/status"), True),
    (HUB, "sub", t("warehouses/+/stock"), t("warehouses/wh-1/stock"), True),
    (HUB, "sub", t("sources/+/stock"), t("sources/partner-1/stock"), True),
    (HUB, "sub", t("caps/+"), t("caps/cap-1"), True),
    (HUB, "sub", t("orders/+"), t("orders/order-1"), True),
    (WORKER, "sub", f"$share/edge-hub/{t('stores/+/events')}", t(f"stores/{A}/events"), True),
    (WORKER, "sub", t("stores/+/status"), t(f"stores/{B}/status"), True),
    (WORKER, "pub", t(f"stores/{A}/ack"), "", True),
    (WORKER, "pub", t(f"stores/{B}/availability"), "", True),
    (WORKER, "pub", t(f"stores/{A}/events"), "", False),
    (A, "sub", f"$share/thief/{t('stores/+/events')}", t(f"stores/{B}/events"), False),
    (FEED, "pub", t("sources/partner-1/stock"), "", True),
    (FEED, "pub", t("caps/cap-1"), "", True),
    (FEED, "pub", t("orders/order-1"), "", True),
    (FEED, "pub", t(f"stores/{A}/events"), "", False),
    (FEED, "pub", t("catalog"), "", False),
    (FEED, "sub", t("sources/+/stock"), t("sources/partner-1/stock"), False),
    (FEED, "sub", t(f"stores/{A}/ack"), t(f"stores/{A}/ack"), False),
]
WAYS = [("password", 5), ("password", 4), ("cert", 5), ("cert", 4)]


class Raw:
    """A raw paho client (threaded loop) that records acks' reason codes and messages."""

    def __init__(self, broker: Broker, certs: Path, name: str, identity: str, protocol: int,
                 client_id: str | None = None):
        self.name = name
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"t-{name}-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5 if protocol == 5 else paho.MQTTv311)
        if identity == "password":
            self.client.username_pw_set(name, PASSWORD)
            port = broker.port
        else:
            self.client.tls_set(ca_certs=str(certs / "ca.crt"), certfile=str(certs / f"{name}.crt"),
                                keyfile=str(certs / f"{name}.key"))
            port = broker.tls_port
        self.up = threading.Event()
        self.down = threading.Event()
        self.refused: str | None = None
        self.acks: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.down.set()
        self.client.on_publish = lambda c, u, mid, rc, p: self._ack(mid, [rc.value])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, [rc.value for rc in rcs])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not self.up.wait(10) or self.refused:
            raise AssertionError(f"{name} ({identity}, v{protocol}) could not connect: {self.refused}")

    def _on_connect(self, client, userdata, flags, rc, properties):
        if rc.is_failure:
            self.refused = str(rc)
        self.up.set()

    def _ack(self, mid: int, codes: list[int]) -> None:
        with self._lock:
            self.acks[mid] = codes
            self._lock.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def wait_ack(self, mid: int, timeout: float = 10.0) -> list[int]:
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self.acks, timeout):
                raise AssertionError(f"{self.name}: no ack for packet {mid} in {timeout}s")
            return self.acks[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        return self.client.publish(topic, payload, qos=1).mid

    def subscribe(self, topic_filter: str) -> int:
        return self.client.subscribe(topic_filter, qos=1)[1]

    def got(self, payload: bytes) -> bool:
        with self._lock:
            return any(p == payload for _, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def start_broker(work: Path, certs: Path, listener_extra: str = "") -> Broker:
    """Mosquitto with the shipped ACL (plus the observer), a password file and a cert-identity TLS listener."""
    require_binary("mosquitto_passwd")
    passwd = work / "passwd"
    for name in (A, B, HUB, WORKER, FEED, OBSERVER):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if not passwd.exists() else []), str(passwd),
                        name, PASSWORD], check=True, capture_output=True, timeout=30)
    acl = work / "acl"
    shutil.copy(ACL, acl)
    with acl.open("a") as fh:   # the observer exists only in the test
        fh.write(f"\nuser {OBSERVER}\ntopic readwrite {P}/#\n")
    tls = TlsListener(certs / "ca.crt", certs / "broker.crt", certs / "broker.key", require_certificate=True,
                      identity_as_username=True, extra=listener_extra)
    return Broker(work, extra_conf=f"password_file {passwd}\nacl_file {acl}\n{listener_extra}",
                  anonymous=False, tls=tls).start()


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory, certs):
    broker = start_broker(tmp_path_factory.mktemp("acl-broker"), certs)
    try:
        yield broker, certs
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def production_broker(tmp_path_factory, certs):
    """As config/mosquitto*.conf: the session belongs to the identity (use_username_as_clientid)."""
    broker = start_broker(tmp_path_factory.mktemp("prod-broker"), certs, "use_username_as_clientid true\n")
    try:
        yield broker, certs
    finally:
        broker.stop()


def attempt_all(broker: Broker, certs: Path, identity: str, protocol: int) -> dict[int, tuple[bool, list[int]]]:
    """Run every row one way; return {row index: (passed, ack reason codes)}."""
    observer = Raw(broker, certs, OBSERVER, "password", 5)
    clients: list[Raw] = [observer]
    try:
        observer.wait_ack(observer.subscribe(f"{P}/#"))
        publishers = {name: Raw(broker, certs, name, identity, protocol) for name in (A, B, HUB, WORKER, FEED)}
        clients += publishers.values()
        results: dict[int, tuple[bool, list[int]]] = {}
        sent: dict[int, tuple[Raw, int, bytes]] = {}
        for i, (name, action, topic, probe, _) in enumerate(ROWS):
            payload = f"row {i} {uuid.uuid4()}".encode()
            if action == "pub":
                sent[i] = (publishers[name], publishers[name].publish(topic, payload), payload)
            else:
                subscriber = Raw(broker, certs, name, identity, protocol)
                clients.append(subscriber)
                sent[i] = (subscriber, subscriber.subscribe(topic), payload)
        codes = {i: client.wait_ack(mid) for i, (client, mid, _) in sent.items()}
        for i, (name, action, topic, probe, _) in enumerate(ROWS):
            if action == "sub":
                observer.wait_ack(observer.publish(probe, sent[i][2]))
        time.sleep(SETTLE_S)   # what was let through has arrived by now; the rest never will
        for i, (name, action, topic, probe, _) in enumerate(ROWS):
            client, _, payload = sent[i]
            passed = observer.got(payload) if action == "pub" else client.got(payload)
            results[i] = (passed, codes[i])
        return results
    finally:
        for client in clients:
            client.close()


def cell(action: str, passed: bool, codes: list[int], protocol: int) -> str:
    kind = "PUBACK" if action == "pub" else "SUBACK"
    code = f"{kind} 0x{codes[0]:02X}" if (protocol == 5 or action == "sub") else "PUBACK"
    return f"{'allowed' if passed else 'denied'} ({code}{'' if passed else ', nothing arrives'})"


def test_acl_table_allows_exactly_what_each_identity_needs(acl_broker, tmp_path):
    broker, certs = acl_broker
    found = {way: attempt_all(broker, certs, *way) for way in WAYS}
    header = "| identity | attempt | topic | expected | " + " | ".join(
        f"{identity} MQTT {'5' if protocol == 5 else '3.1.1'}" for identity, protocol in WAYS) + " |"
    lines = [header, "|" + " --- |" * (4 + len(WAYS))]
    wrong = []
    for i, (name, action, topic, probe, allowed) in enumerate(ROWS):
        cells = []
        for way in WAYS:
            passed, codes = found[way][i]
            cells.append(cell(action, passed, codes, way[1]))
            v5 = way[1] == 5
            if passed != allowed:
                wrong.append(f"{name} {action} {topic} ({way}): passed={passed}, expected {allowed}")
            elif v5 and action == "pub" and codes != [0x00 if allowed else 0x87]:
                wrong.append(f"{name} pub {topic} ({way}): PUBACK {codes}, expected {'0x00' if allowed else '0x87'}")
            elif action == "sub" and codes[0] not in ((0x01,) if allowed else (0x01, 0x87 if v5 else 0x80)):
                # mosquitto 2.0 grants every filter and applies the ACL to each message it
                # would deliver (a refusing SUBACK is allowed too): a denial is nothing arriving.
                wrong.append(f"{name} sub {topic} ({way}): SUBACK {codes}")
        shown = topic if action == "pub" else f"{topic} (probe {probe})"
        lines.append(f"| {name} | {action} | {shown} | {'allow' if allowed else 'deny'} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (tmp_path / "acl_table.md").write_text(table + "\n")
    print("\n" + table)
    assert not wrong, "\n".join(wrong) + "\n\n" + table


@pytest.mark.parametrize("identity", ["password", "cert"])
def test_a_store_using_another_stores_client_id_cannot_take_over_its_session(production_broker, identity):
    broker, certs = production_broker
    b = Raw(broker, certs, B, identity, 5, client_id=f"edge-agent-{B}")
    try:
        b.wait_ack(b.subscribe(t(f"stores/{B}/ack")))
        intruder = Raw(broker, certs, A, identity, 5, client_id=f"edge-agent-{B}")
        try:
            observer = Raw(broker, certs, OBSERVER, "password", 5)
            try:
                observer.wait_ack(observer.publish(t(f"stores/{B}/ack"), b"for B only"))
                time.sleep(SETTLE_S)   # let a wrongly routed message arrive, if any would
            finally:
                observer.close()
            assert not b.down.is_set(), "store B was disconnected by a client using its client id"
            assert b.got(b"for B only") and not intruder.got(b"for B only")
        finally:
            intruder.close()
    finally:
        b.close()
