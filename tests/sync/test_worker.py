"""The sync worker (sync/worker.py): a background child of `edge-agent run` that holds the
MQTT client and the uplink. Real processes, a real broker and hub, SIGKILL.

After every scenario the sync invariants hold (`assert_healed`): the hub holds 1..last_seq
once each, equal to the agent's export, its ack == the agent's cursor, verify passes.
"""

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from sync import protocol
from tests.conftest import require_binary, unavailable
from tests.sync.agents import Poster, assert_healed, grows, post_events, sync_agent, sync_status
from tests.sync.helpers import PREFIX, STORE, mqtt_client, wait_until
from tests.sync.hubproc import HubProcess


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict; {} once the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {} if fields.get("State", "").startswith("Z") else {k: v.strip() for k, v in fields.items()}


def worker_pid(agent) -> int:
    return wait_until(lambda: (s := sync_status(agent))["connected"] and s["worker_pid"], 20,
                      "the sync worker to connect")


def test_worker_is_a_background_child_named_for_ps(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        pid = worker_pid(agent)
        status = proc_status(pid)
        assert status["PPid"] == str(agent.proc.pid)
        assert status["Name"] == "edge-agent-sync"
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(agent.proc.pid) == os.SCHED_OTHER   # not started as the unit does: see below
        post_events(agent, 500)
        assert_healed(agent, hub)
        # The hub's snapshot is applied in the worker (SyncWorker.call): no apply process.
        wait_until(lambda: sync_status(agent)["snapshot_version"] is not None, 20, "a snapshot to be applied")
        assert children(agent.proc.pid) == [pid]


@pytest.mark.parametrize("reset", [True, False], ids=["as-the-unit", "chrt-by-hand"])
def test_only_the_event_loop_runs_realtime(tmp_path, broker, reset):
    """The shipped unit starts the agent under SCHED_RR 1 with reset-on-fork
    (CPUSchedulingPolicy=rr): the event loop (main thread) preempts background work at once.
    Nothing else may inherit it: not the log's writer nor any other thread, not the sync
    worker. By hand (`chrt --rr 1`, no reset-on-fork) the agent sets the flag itself."""
    chrt = require_binary("chrt")
    if subprocess.run([chrt, "--rr", "1", "true"], capture_output=True).returncode != 0:
        unavailable("SCHED_RR is not permitted here (needs root or CAP_SYS_NICE)")
    launcher = [chrt, "--rr", *(["--reset-on-fork"] if reset else []), "1"]
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker, launcher=launcher) as agent:
        pid = worker_pid(agent)
        post_events(agent, 300)
        assert_healed(agent, hub)
        main = agent.proc.pid
        assert os.sched_getscheduler(main) & ~os.SCHED_RESET_ON_FORK == os.SCHED_RR
        assert os.sched_getparam(main).sched_priority == 1
        others = [int(t) for t in os.listdir(f"/proc/{main}/task") if int(t) != main]
        assert others, "the agent runs its writer thread at least"
        assert {tid: os.sched_getscheduler(tid) for tid in others} == {tid: os.SCHED_OTHER for tid in others}
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert {tid: os.sched_getscheduler(tid) for tid in threads} == {tid: os.SCHED_IDLE for tid in threads}
        assert "the event loop runs under SCHED_RR priority 1" in agent.output()


def children(pid: int) -> list[int]:
    return sorted(int(k) for task in Path(f"/proc/{pid}/task").iterdir()
                  for k in (task / "children").read_text().split())


def test_worker_sigkilled_mid_burst_is_replaced_and_nothing_is_lost(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        for cycle in range(3):
            pid = worker_pid(agent)
            with Poster(agent):
                grows(agent, sync_status(agent)["last_seq"] + 300)
                os.kill(pid, signal.SIGKILL)
                # The API keeps taking writes and answering reads while sync is down.
                first, last = post_events(agent, 10)
                assert last - first == 9
                status = wait_until(
                    lambda: (s := sync_status(agent))["worker_pid"] not in (None, pid) and s["connected"] and s,
                    20, "a new sync worker to connect")
            assert status["worker_restarts"] == cycle + 1
            assert not proc_status(pid), "the killed worker must be reaped"
        post_events(agent, 50)
        assert_healed(agent, hub)
        assert agent.output().count("starting a new one") == 3


def test_worker_dies_with_a_sigkilled_agent_and_the_next_agent_syncs(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        post_events(agent, 100)
        pid = worker_pid(agent)
        agent.kill()
        wait_until(lambda: not proc_status(pid), 5, "the worker to die with the agent")
        agent.start()
        assert worker_pid(agent) != pid
        post_events(agent, 100)
        assert_healed(agent, hub)


async def test_clean_stop_publishes_offline_and_the_worker_exits(tmp_path, broker):
    seen: list[str] = []

    async def on_status(message) -> None:
        if message.payload:
            seen.append(protocol.decode(message.payload, protocol.Status).state)

    watcher = mqtt_client(broker, "test-status-watcher")
    watcher.subscribe(protocol.status_topic(PREFIX, STORE), on_status)
    await watcher.start()
    await watcher.wait_subscribed(10)
    try:
        agent = sync_agent(tmp_path, broker)
        await asyncio.to_thread(agent.start)
        pid = await asyncio.to_thread(worker_pid, agent)
        await asyncio.to_thread(wait_until, lambda: seen and seen[-1] == "online", 10, "the online status")
        assert await asyncio.to_thread(agent.terminate) == 0
        assert not proc_status(pid), "the worker must have exited with the agent's clean stop"
        await asyncio.to_thread(wait_until, lambda: seen[-1] == "offline", 10, "the offline status")
        output = agent.output()
        assert "stopped with status" not in output and "starting a new one" not in output, output[-2000:]
    finally:
        await watcher.stop()


async def test_call_runs_the_apply_in_the_worker_and_brings_its_exceptions_back(tmp_path, broker):
    """SyncWorker.call over a real worker process (started as `python -m sync.worker FD`)."""
    import msgspec

    from common.errors import StorageError
    from agent.log import SqliteEventLog
    from agent.settings import AgentConfig
    from sync.downlink import apply_payload
    from sync.worker import SyncWorker, exec_worker

    config = msgspec.convert({"store": {"id": STORE}, "storage": {"path": str(tmp_path / "events.db")},
                              "mqtt": {"host": broker.host, "port": broker.port}}, AgentConfig)
    event_log = await SqliteEventLog.open(config.storage.path, STORE)
    worker = await SyncWorker.open(config, event_log, exec_worker())
    running = asyncio.get_running_loop().create_task(worker.run())
    try:
        await asyncio.to_thread(wait_until, lambda: worker.state.connected, 20, "the worker to connect")
        with pytest.raises(ValueError, match="may not be called"):
            await worker.call(os.getpid)
        snapshots = str(tmp_path / "events.snapshots.db")
        bad = await worker.call(apply_payload, snapshots, "2026-11-27T00:00:00.000Z", b"not json", None, STORE)
        assert bad[0] == "malformed"
        with pytest.raises(StorageError):
            await worker.call(apply_payload, str(tmp_path / "no" / "such" / "dir.db"), "2026-11-27T00:00:00.000Z",
                              b'{"v":1,"store_id":"%s","version":3,"generated_at":"2026-11-27T00:00:00.000Z",'
                              b'"items":[]}' % STORE.encode(), None, STORE)
        assert worker.restarts == 0
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await event_log.close()
    assert worker.process is not None and not proc_status(worker.process.pid)


def test_fork_worker_with_threads_running_starts_a_fresh_interpreter_instead():
    """Forking while another thread may hold a lock is unsafe: fork_worker execs then."""
    import threading

    from sync.worker import fork_worker

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        process = fork_worker()
    finally:
        stop.set()
        thread.join()
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"sync.worker" in cmdline, cmdline
    finally:
        process.sock.close()        # end of file: the worker exits without a Hello
        assert process.reap(10) == 0
