"""`edge-agent --config F CMD` and `edge-agent CMD --config F` mean the same, for every subcommand.

The unit starts the service as `edge-agent run --config F`; operators type either form.
`edge-agent sync` becomes the store's sync process (`python -m sync --config F`, same pid),
and `run --no-sync` serves without starting it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent import cli
from agent.settings import AgentConfig, load_config, sync_db_path
from agent.syncview import SqliteSyncView
from tests.support.agentproc import AgentProcess, agent_command, write_config
from tests.support.net import free_port
from tests.sync.helpers import wait_until

POSITIONS = ["before", "after"]


def argv(position: str, config: Path, command: str, *rest: str) -> list[str]:
    if position == "before":
        return ["--config", str(config), command, *rest]
    return [command, "--config", str(config), *rest]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A config for store-0042 with its log under tmp_path; a decoy as $EDGE_AGENT_CONFIG.

    The decoy names another store and another log: a command that ignored --config would
    read it, and answer about the wrong store.
    """
    for key in [k for k in os.environ if k.startswith("EDGE_AGENT__")]:
        monkeypatch.delenv(key)
    decoy = tmp_path / "decoy.toml"
    write_config(decoy, {"store": {"id": "decoy-store"}, "storage": {"path": str(tmp_path / "decoy.db")},
                         "sync": {"enabled": False}})
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(decoy))
    config = tmp_path / "agent.toml"
    write_config(config, {"store": {"id": "store-0042"}, "storage": {"path": str(tmp_path / "events.db")},
                          "sync": {"enabled": False}})
    return config


def _minimal_args(name: str) -> list[str]:
    return {"record": ["received"], "restore": ["--from", "backup.db"]}.get(name, [])


def test_every_subcommand_takes_config_before_or_after_it():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"run", "sync", "init", "stock", "export", "verify"} <= set(commands)
    for name in commands:
        extra = _minimal_args(name)
        assert parser.parse_args(["--config", "A.toml", name, *extra]).config == "A.toml", name
        assert parser.parse_args([name, "--config", "B.toml", *extra]).config == "B.toml", name
        assert parser.parse_args([name, *extra]).config is None, name


def test_config_after_the_subcommand_wins_over_one_before():
    args = cli.build_parser().parse_args(["--config", "A.toml", "stock", "--config", "B.toml"])
    assert args.config == "B.toml"


@pytest.mark.parametrize("position", POSITIONS)
def test_each_subcommand_reads_the_config_given_in_either_position(position, store, tmp_path, capsys):
    db = tmp_path / "events.db"

    def run(command: str, *rest: str) -> str:
        code = cli.main(argv(position, store, command, *rest))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    assert f"log ready at {db} for store store-0042" in run("init")
    assert "as seq 1" in run("record", "received", "--sku", "A1", "--qty", "3", "--command-id", "c1")
    assert json.loads(run("stock", "A1", "--json"))["backroom"] == 3
    assert "received" in run("events")
    exported = [json.loads(line) for line in run("export").splitlines()]
    assert [(e["store_id"], e["seq"], e["sku"]) for e in exported] == [("store-0042", 1, "A1")]
    run("verify")
    assert "rebuilt projections from 1 events" in run("rebuild")
    assert not (tmp_path / "decoy.db").exists()


def _exec_argv(monkeypatch, args: list[str]) -> list[str]:
    """Run `edge-agent ARGS` in-process and return the argv it would exec."""
    calls = []

    class Execd(Exception):
        pass

    def fake_execv(path, argv):
        calls.append((path, argv))
        raise Execd

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(Execd):
        cli.main(args)
    (path, exec_argv), = calls
    assert path == sys.executable
    return exec_argv


@pytest.mark.parametrize("position", POSITIONS)
def test_sync_execs_python_m_sync_with_the_absolute_config_path(position, store, monkeypatch):
    monkeypatch.chdir(store.parent)
    got = _exec_argv(monkeypatch, argv(position, Path(store.name), "sync"))
    assert got == [sys.executable, "-m", "sync", "--config", str(store)]


def test_sync_passes_on_the_default_config_when_it_exists(store, monkeypatch):
    got = _exec_argv(monkeypatch, ["sync"])
    assert got == [sys.executable, "-m", "sync", "--config", os.environ["EDGE_AGENT_CONFIG"]]


def test_sync_without_a_config_file_passes_none_on(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("EDGE_AGENT__STORE__ID", "store-env")
    got = _exec_argv(monkeypatch, ["sync"])
    assert got == [sys.executable, "-m", "sync"]   # the child reads the same environment


def test_sync_subcommand_becomes_the_sync_process(store, tmp_path):
    """Same pid (an exec, not a child): the sync process records that pid in sync.db."""
    assert cli.main(["init", "--config", str(store)]) == 0
    config = load_config(str(store), AgentConfig, "EDGE_AGENT")
    out = open(tmp_path / "sync.out", "wb")
    proc = subprocess.Popen([*agent_command(), "sync", "--config", str(store)], stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out.close()
    view = SqliteSyncView(sync_db_path(config))
    try:
        wait_until(lambda: view.status().get("pid") == proc.pid or proc.poll() is not None, 20,
                   "the sync process's heartbeat")
        assert proc.poll() is None, (tmp_path / "sync.out").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "sync.out").read_text()
    finally:
        view.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("position", POSITIONS)
def test_run_serves_with_the_config_in_either_position_and_stops_cleanly_on_sigterm(position, tmp_path):
    port = free_port()
    config = tmp_path / "agent.toml"
    write_config(config, {"store": {"id": "store-0042"}, "storage": {"path": str(tmp_path / "events.db")},
                          "api": {"host": "127.0.0.1", "port": port}, "sync": {"enabled": False}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT")}
    output = tmp_path / "agent.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([*agent_command(), *argv(position, config, "run")], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        def ready():
            if proc.poll() is not None:
                return True
            try:
                return _get(f"http://127.0.0.1:{port}/readyz") == 200
            except OSError:
                return False
        wait_until(ready, 20, "GET /readyz 200")
        assert proc.poll() is None, output.read_text()
        assert _get(f"http://127.0.0.1:{port}/v1/stock/A1") == 404   # served from this config's log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, output.read_text()
        assert (tmp_path / "events.db").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_no_sync_serves_without_starting_the_sync_child(tmp_path):
    with AgentProcess(tmp_path, sections={"sync": {"enabled": True}, "mqtt": {"port": free_port()}},
                      run_args=["--no-sync"]) as agent:
        status, answer = agent.request("GET", "/v1/sync")
        assert status == 200, answer
        assert agent.children() == []
        assert "--no-sync" in agent.output()    # it says why sync is not running
        assert agent.terminate() == 0


@pytest.mark.parametrize("args", [
    ["run", "--config", "{F}"], ["--config", "{F}", "run"], ["sync", "--config", "{F}"], ["stock", "--config", "{F}"],
])
def test_an_unknown_config_key_exits_2_naming_the_key(args, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[store]\nid = "store-0042"\n[api]\nprot = 8080\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT")}
    done = subprocess.run([*agent_command(), *(a.replace("{F}", str(config)) for a in args)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 2, done
    assert "unknown key api.prot" in done.stderr
    assert done.stderr.startswith("edge-agent: "), done.stderr   # refused before anything started


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("command", [["stats"], ["export", "--store", "store-0042"]])
def test_edge_hub_reads_the_config_given_in_either_position(position, command, tmp_path, monkeypatch, capsys):
    from sync.hub import cli as hub_cli

    for key in [k for k in os.environ if k.startswith("EDGE_HUB")]:
        monkeypatch.delenv(key)
    config = tmp_path / "hub.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "hub.db"}"\n[[stores]]\nid = "store-0042"\n'
                      'region = "north"\n')
    # No hub database yet: the answer names the path from this config, so it was read.
    assert hub_cli.main(argv(position, config, *command)) == 3
    assert f"no hub database at {tmp_path / 'hub.db'}" in capsys.readouterr().err
    config.write_text('[hub]\nnope = 1\n')
    assert hub_cli.main(argv(position, config, *command)) == 2
    assert "unknown key hub.nope" in capsys.readouterr().err
