"""TLS that says why: real mosquitto with TLS listeners, real `edge-agent run` processes.

Each failure (wrong CA, wrong hostname, the broker's certificate expired, our own client
certificate expired, our client certificate refused, a TLS file missing) must show as
the right alarm code in GET /v1/sync, 503 with that reason in /readyz (/healthz stays
200), `edge_agent_sync_alarm{code=...} 1` in /metrics, with the sync process up (same
pid, no restart) and reconnecting on a back-off, not in a tight loop; fixing the file
heals it without a restart. The whole path works over TLS with certificate identity.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.settings import AgentConfig
from common.config import ConfigError, load_config
from sync.hub.settings import load_hub_config
from sync.tls import TlsConfigError, TlsFiles
from tests.support.agentproc import AgentProcess, AgentStartError
from tests.support.broker import Broker, TlsListener
from tests.support.certs import make_certs
from tests.sync.agents import post_events, wait_synced
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess
from tests.support.procs import processes_under

STORE = "store-0042"
ACL = Path(__file__).resolve().parents[2] / "config" / "acl"
BACKOFF = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


class AlarmedAgent(AgentProcess):
    """An agent whose readiness is the point of the test: `start()` waits for /healthz only."""

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while get(self, "/healthz")[0] != 200:
            if not self.running or time.monotonic() > deadline:
                raise AgentStartError(f"agent not alive:\n{self.output()[-3000:]}")
            time.sleep(0.05)


def get(agent: AgentProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(agent.url + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def tls_broker(tmp_path: Path, certs: Path, cert: str = "broker", **listener) -> Broker:
    return Broker(tmp_path / "broker", extra_conf=f"acl_file {ACL}\n", anonymous=False, tls=TlsListener(
        certs / "ca.crt", certs / f"{cert}.crt", certs / f"{cert}.key", require_certificate=True,
        identity_as_username=True, **listener))


def tls_agent(tmp_path: Path, broker: Broker, ca: Path, cert: Path | None, key: Path | None,
              cls=AlarmedAgent, **mqtt) -> AgentProcess:
    (tmp_path / "agent").mkdir(exist_ok=True)
    keys = {"host": "127.0.0.1", "port": broker.tls_port, "tls_ca": str(ca),
            "tls_cert": str(cert or ""), "tls_key": str(key or ""), **BACKOFF, **mqtt}
    return cls(tmp_path / "agent", STORE, sections={
        "mqtt": keys, "sync": {"ack_timeout_s": 2.0, "heartbeat_s": 0.2},
        "service": {"backup_interval_s": 0}})


def attempts(broker: Broker) -> int:
    return broker.logfile.read_text(errors="replace").count("New connection from")


def assert_alarmed(agent: AgentProcess, code: str) -> dict:
    """The alarm shows in /v1/sync, /readyz and /metrics; /healthz stays 200."""
    def alarmed():
        sync = agent.request("GET", "/v1/sync")[1]
        return sync if (sync.get("alarm") or {}).get("code") == code else None
    sync = wait_until(alarmed, 20, f"alarm {code} in /v1/sync")
    assert sync["connected"] is False
    assert sync["alarm"]["message"] and sync["alarm"]["since"]
    status, body = get(agent, "/readyz")
    assert status == 503 and f'"reason":"{code}"' in body, body
    assert get(agent, "/healthz")[0] == 200
    metrics = get(agent, "/metrics")[1]
    assert f'edge_agent_sync_alarm{{code="{code}"}} 1.0' in metrics, metrics
    return sync


def assert_stays_up(agent: AgentProcess, broker: Broker, sync: dict, seconds: float = 3.0) -> None:
    """No crash loop (same sync pid, no restart) and no tight reconnect loop over `seconds`."""
    before = attempts(broker)
    time.sleep(seconds)   # the time over which attempts are counted, not a wait for a state
    after = agent.request("GET", "/v1/sync")[1]
    assert after["sync_restarts"] == 0 and after["sync_pid"] == sync["sync_pid"], after
    # reconnect_min_s 0.2 doubling to 1 s: about 5 attempts in 3 s; a tight loop makes hundreds.
    assert attempts(broker) - before <= 12, attempts(broker) - before


def assert_healed(agent: AgentProcess, sync: dict) -> None:
    wait_until(lambda: agent.request("GET", "/v1/sync")[1]["connected"], 20, "the link to heal")
    after = agent.request("GET", "/v1/sync")[1]
    assert after["alarm"] is None and after["sync_pid"] == sync["sync_pid"] and after["sync_restarts"] == 0
    assert get(agent, "/readyz")[0] == 200
    assert "edge_agent_sync_alarm{" not in get(agent, "/metrics")[1]


def test_wrong_ca_is_tls_unknown_ca_and_heals_when_the_ca_file_is_fixed(tmp_path, certs):
    ca = tmp_path / "ca.crt"
    shutil.copy(certs / "rogue-ca.crt", ca)
    with tls_broker(tmp_path, certs) as broker, \
            tls_agent(tmp_path, broker, ca, certs / f"{STORE}.crt", certs / f"{STORE}.key") as agent:
        sync = assert_alarmed(agent, "tls_unknown_ca")
        assert "not signed by the CA in mqtt.tls_ca" in sync["alarm"]["message"]
        assert_stays_up(agent, broker, sync)
        shutil.copy(certs / "ca.crt", ca)
        assert_healed(agent, sync)


@pytest.mark.parametrize("broker_cert, code", [
    ("wronghost-broker", "tls_hostname_mismatch"),
    ("expired-broker", "tls_server_cert_expired"),
])
def test_broker_certificate_failures_are_named(tmp_path, certs, broker_cert, code):
    with tls_broker(tmp_path, certs, cert=broker_cert) as broker, \
            tls_agent(tmp_path, broker, certs / "ca.crt", certs / f"{STORE}.crt", certs / f"{STORE}.key") as agent:
        sync = assert_alarmed(agent, code)
        assert_stays_up(agent, broker, sync)


@pytest.mark.parametrize("prefix, code", [
    ("expired-", "tls_client_cert_expired"),    # found before connecting: our own file
    ("rogue-", "tls_client_cert_refused"),      # said by the broker: signed by a CA it does not trust
])
def test_client_certificate_failures_are_named(tmp_path, certs, prefix, code):
    with tls_broker(tmp_path, certs) as broker, \
            tls_agent(tmp_path, broker, certs / "ca.crt", certs / f"{prefix}{STORE}.crt",
                      certs / f"{prefix}{STORE}.key") as agent:
        sync = assert_alarmed(agent, code)
        assert_stays_up(agent, broker, sync)


def test_missing_tls_file_keeps_sync_up_alarmed_and_heals_once_the_file_exists(tmp_path, certs):
    ca = tmp_path / "not-yet" / "ca.crt"
    with tls_broker(tmp_path, certs) as broker, \
            tls_agent(tmp_path, broker, ca, certs / f"{STORE}.crt", certs / f"{STORE}.key") as agent:
        sync = assert_alarmed(agent, "tls_file_missing")
        assert str(ca) in sync["alarm"]["message"]
        assert_stays_up(agent, broker, sync)
        ca.parent.mkdir()
        shutil.copy(certs / "ca.crt", ca)
        assert_healed(agent, sync)


def test_sync_over_tls_with_certificate_identity_reaches_the_hub_and_is_acked(tmp_path, certs):
    with tls_broker(tmp_path, certs) as broker:
        hub = HubProcess(tmp_path / "hub", broker, stores=(STORE,))
        hub.start(env={"EDGE_HUB__MQTT__PORT": str(broker.tls_port),
                       "EDGE_HUB__MQTT__TLS_CA": str(certs / "ca.crt"),
                       "EDGE_HUB__MQTT__TLS_CERT": str(certs / "edge-hub.crt"),
                       "EDGE_HUB__MQTT__TLS_KEY": str(certs / "edge-hub.key")})
        try:
            with tls_agent(tmp_path, broker, certs / "ca.crt", certs / f"{STORE}.crt", certs / f"{STORE}.key",
                           cls=AgentProcess) as agent:
                _, last = post_events(agent, 120)
                status = wait_synced(agent, 60)
            assert status["acked_seq"] == last == 120 and status["alarm"] is None
            assert [e["seq"] for e in hub.export(STORE)] == list(range(1, 121))
            log = broker.logfile.read_text()
            # The broker took each side's username from its certificate (the ACL's %u).
            assert f"u'{STORE}'" in log and "u'edge-hub'" in log, log[-2000:]
        finally:
            hub.kill()


# ---------------------------------------------------------------- configuration, no broker


def test_plaintext_to_a_remote_broker_is_refused_unless_allowed(tmp_path):
    env = {"EDGE_AGENT__STORE__ID": STORE, "EDGE_AGENT__MQTT__HOST": "10.1.2.3"}
    with pytest.raises(ConfigError, match="mqtt: host '10.1.2.3' is not loopback .* refusing plaintext"):
        load_config(None, AgentConfig, "EDGE_AGENT", env)
    assert load_config(None, AgentConfig, "EDGE_AGENT",
                       env | {"EDGE_AGENT__MQTT__ALLOW_PLAINTEXT": "true"}).mqtt.allow_plaintext
    assert load_config(None, AgentConfig, "EDGE_AGENT",
                       env | {"EDGE_AGENT__MQTT__TLS_CA": "/etc/ca.crt"}).mqtt.tls
    assert load_config(None, AgentConfig, "EDGE_AGENT", {"EDGE_AGENT__STORE__ID": STORE}).mqtt.host == "127.0.0.1"
    hub = tmp_path / "hub.toml"
    hub.write_text('[mqtt]\nhost = "mqtt.example.net"\n[[stores]]\nid = "s"\n')
    with pytest.raises(ConfigError, match="refusing plaintext"):
        load_hub_config(hub, {})
    assert load_hub_config(hub, {"EDGE_HUB__MQTT__ALLOW_PLAINTEXT": "true"}).mqtt.allow_plaintext


def test_edge_agent_run_refuses_plaintext_to_a_remote_broker(tmp_path):
    agent = AgentProcess(tmp_path, STORE, sections={"mqtt": {"host": "192.0.2.7"}})
    with pytest.raises(AgentStartError, match="refusing plaintext"):
        agent.start(timeout=20)
    assert agent.proc.returncode == 2


def test_own_files_are_checked_with_a_named_cause(tmp_path, certs):
    def alarm(ca="ca.crt", cert=f"{STORE}.crt", key=f"{STORE}.key"):
        files = TlsFiles(*(str(certs / name) if name else "" for name in (ca, cert, key)))
        with pytest.raises(TlsConfigError) as caught:
            files.context()
        return caught.value.alarm

    assert TlsFiles(str(certs / "ca.crt"), str(certs / f"{STORE}.crt"), str(certs / f"{STORE}.key")).context()
    assert alarm(ca="nope.crt").code == "tls_file_missing"
    assert alarm(ca=".").code == "tls_file_unreadable"                      # a directory
    assert alarm(ca="ca.key").code == "tls_not_pem"
    assert alarm(cert="store-0042.key").code == "tls_not_pem"
    assert alarm(key="store-0043.key").code == "tls_key_mismatch"
    expired = alarm(cert="expired-store-0042.crt", key="expired-store-0042.key")
    assert expired.code == "tls_client_cert_expired" and "expired at" in expired.message


def test_hub_with_a_missing_tls_file_stays_up_alarmed_and_heals(tmp_path, certs):
    ca = tmp_path / "later" / "ca.crt"
    with tls_broker(tmp_path, certs) as broker:
        hub = HubProcess(tmp_path / "hub", broker, stores=(STORE,))
        env = {"EDGE_HUB__MQTT__PORT": str(broker.tls_port), "EDGE_HUB__MQTT__TLS_CA": str(ca),
               "EDGE_HUB__MQTT__TLS_CERT": str(certs / "edge-hub.crt"),
               "EDGE_HUB__MQTT__TLS_KEY": str(certs / "edge-hub.key"),
               "EDGE_HUB__MQTT__RECONNECT_MIN_S": "0.2", "EDGE_HUB__MQTT__RECONNECT_MAX_S": "1.0"}
        try:
            with pytest.raises(TimeoutError):   # start() waits for a connection that cannot happen yet
                hub.start(timeout=4, env=env)
            assert hub.running, hub.output()
            assert f"ALARM tls_file_missing: mqtt.tls_ca {ca}: no such file" in hub.output()
            ca.parent.mkdir()
            shutil.copy(certs / "ca.crt", ca)
            wait_until(lambda: "connected to" in hub.output(), 20, "the hub to connect once the CA exists")
            assert "alarm tls_file_missing cleared" in hub.output() and hub.running
        finally:
            hub.kill()


def test_demo_over_tls_with_certificate_identity_syncs_every_store(tmp_path):
    """`scripts/demo --tls` (python -m demo --tls): the broker as config/mosquitto-tls.conf, every store synced."""
    state, out = tmp_path / "demo", tmp_path / "demo.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "demo", "--tls", "--state-dir", str(state), "--rate", "20",
                                 "--products", "40", "--port-base", "0", "--status-every", "0"],
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        text = wait_until(lambda: out.read_text() if "Ctrl-C stops" in out.read_text() or proc.poll() is not None
                          else "", timeout=60, what="the demo's banner")
        assert proc.poll() is None and "(TLS, certificate identity, config/acl)" in text, text
        urls = dict(re.findall(r"(store-\d+) kiosk: (http://127\.0\.0\.1:\d+)/", text))
        assert sorted(urls) == ["store-1", "store-2", "store-3"], text

        def sync(url: str) -> dict:
            with urllib.request.urlopen(url + "/v1/sync", timeout=3) as resp:
                return json.loads(resp.read())
        for store, url in urls.items():   # opening stock is 40 events a store: traffic beyond it is acked
            wait_until(lambda: sync(url)["acked_seq"] > 45, timeout=60, what=f"hub acks for {store} over TLS")
            assert sync(url)["alarm"] is None
        conf = (state / "mosquitto.conf").read_text()
        assert "require_certificate true" in conf and "use_identity_as_username true" in conf
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for pid in processes_under(state):   # the demo's children run in sessions of their own
                os.kill(pid, signal.SIGKILL)


def test_credentials_the_broker_refuses_are_broker_refused_with_the_reason_code(tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), STORE, "right"], check=True,
                   capture_output=True, timeout=30)
    with Broker(tmp_path / "broker", anonymous=False, extra_conf=f"password_file {passwd}\n") as broker:
        (tmp_path / "agent").mkdir()
        agent = AlarmedAgent(tmp_path / "agent", STORE, sections={
            "mqtt": {"port": broker.port, "username": STORE, "password": "wrong", **BACKOFF},
            "sync": {"heartbeat_s": 0.2}, "service": {"backup_interval_s": 0}})
        with agent:
            sync = assert_alarmed(agent, "broker_refused")
            assert "reason code 0x86" in sync["alarm"]["message"] or "reason code 0x87" in sync["alarm"]["message"]
            assert_stays_up(agent, broker, sync)
