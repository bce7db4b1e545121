"""The sync worker: the uplink and the agent's MQTT client in a process of their own.

`edge-agent run` forks this process before its event loop starts. Draining a backlog
keeps paho's thread and the uplink's reads busy; in the agent's own process they shared
the interpreter lock and the cores with the event loop that answers the kiosks, and the
loop waited behind them (kiosk p99 3.5-4.4x idle during a drain on 2 cores; 1.4-2.0x with
the worker, docs/benchmarks.md). In its own process, at background CPU priority
(SCHED_IDLE, agent.proc.lower_priority), the worker takes what the kiosks leave and never
holds a lock the API needs.

What stays in the agent process: the log's single writer. The worker reads the log
read-only (agent.reader.LogReader); it asks the agent to write the cursor and waits for
the commit before it acknowledges the hub's ack message, as before. Messages for the
agent's other subscriptions (the downlink's snapshots and catalog) are handed to the
agent, and acknowledged to the broker only after the agent's handler returned. The
downlink's snapshot applies (decode, validate, write the snapshot file) run back here
(`SyncWorker.call`), so the agent needs no apply process of its own.

    agent process (SyncWorker)            sync worker (run_worker)
    Hello(config, cursor, subscriptions) ->
    LastSeq(seq) after each commit       ->  wakes the Uplink
                                         <-  Cursor(id, seq, at)   (hub ack)
    Reply(id) after the cursor commit    ->  the ack message is acknowledged
                                         <-  Deliver(id, sub, message)
    Reply(id, error) after the handler   ->  acknowledged unless error
    Publish(id, topic, payload)          ->  (the heartbeat's retained status)
                                         <-  Reply(id, error) on PUBACK
    Call(id, function, args)             ->  runs it on a thread (a snapshot apply)
                                         <-  Result(id, value or exception)
                                         <-  State(...) on a resend, rewind, ack or alarm,
                                             and every 50 ms when it changed otherwise
    Stop()                               ->  offline status, disconnect, exit 0

Frames on the socketpair: a 4-byte big-endian length, then one msgpack-encoded message.
The worker dies with the agent (PR_SET_PDEATHSIG SIGKILL; also on end of file): the
broker then publishes the agent's will, as when the one process died. When the worker
dies on its own, the agent logs it, counts it (`worker_restarts`) and starts a new one
(`python -m sync.worker FD`: a fresh interpreter, since forking a process with threads
running is not safe) after a second.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import msgspec

from agent.proc import die_with_parent, lower_priority, return_freed_memory, set_thread_name
from agent.settings import AgentConfig
from sync.mqtt import Message, MqttError
from sync.uplink import (Uplink, UplinkState as State, agent_mqtt, load_cursor, register_metrics,
                         status_answer, store_cursor)

log = logging.getLogger("edge_agent.sync_worker")

STATE_EVERY_S = 0.05      # the worker sends its state at most this often
MMAP_THRESHOLD = 64 * 1024
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- messages


class Sub(msgspec.Struct, array_like=True):
    topic_filter: str
    qos: int
    concurrent: bool


class Hello(msgspec.Struct, tag="hello"):
    config: AgentConfig
    acked_seq: int
    last_ack_at: str | None
    last_seq: int
    subs: list[Sub]


class LastSeq(msgspec.Struct, tag="last"):
    seq: int


class Reply(msgspec.Struct, tag="reply"):
    id: int
    error: str | None = None


class Publish(msgspec.Struct, tag="pub"):
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None


class Stop(msgspec.Struct, tag="stop"):
    pass


class Cursor(msgspec.Struct, tag="cursor"):
    id: int
    seq: int
    at: str


class Deliver(msgspec.Struct, tag="msg"):
    id: int
    sub: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    content_type: str | None


class Call(msgspec.Struct, tag="call"):
    id: int
    function: str            # "module:qualname", one of CALLABLE
    args: bytes              # pickled tuple


class Result(msgspec.Struct, tag="result"):
    id: int
    value: bytes             # pickled return value, or the pickled exception when failed
    failed: bool = False


Frame = Hello | LastSeq | Reply | Publish | Stop | Cursor | Deliver | Call | Result | State

# What the agent may run in the worker (`SyncWorker.call`): snapshot applies, which decode
# and validate up to 100,000s of items, off the agent's interpreter lock.
CALLABLE = {"sync.downlink:apply_payload"}

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Frame).decode


class Channel:
    """Length-prefixed msgpack frames over a stream (one end of the socketpair)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    @classmethod
    async def over(cls, sock: socket.socket) -> "Channel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 16)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        """Queue one frame (the transport writes it; see `drain` for large ones)."""
        if self._writer.is_closing():
            raise ConnectionResetError("sync worker: the channel is closed")
        data = _encode(message)
        self._writer.write(len(data).to_bytes(4, "big"))
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def recv(self) -> Any:
        """The next frame; raises asyncio.IncompleteReadError at end of file."""
        size = int.from_bytes(await self._reader.readexactly(4), "big")
        return _decode(await self._reader.readexactly(size))

    def close(self) -> None:
        self._writer.close()


class _Requests:
    """Futures for frames that expect a Reply, by id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}

    def new(self) -> tuple[int, asyncio.Future]:
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        return rid, future

    def settle(self, frame: "Reply | Result") -> None:
        """Resolve the request a Reply (None, or MqttError with its text) or a Result answers."""
        future = self.pending.pop(frame.id, None)
        if future is None or future.done():
            return
        if isinstance(frame, Result):
            failed, value = frame.failed, pickle.loads(frame.value)
        else:
            failed = frame.error is not None
            value = MqttError(frame.error) if failed else None
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)

    def fail_all(self, reason: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(MqttError(reason))
        self.pending.clear()


# ------------------------------------------------------------ the agent's side


class WorkerProcess:
    """A started worker: its pid and the agent's end of the socketpair."""

    def __init__(self, pid: int, sock: socket.socket, popen: subprocess.Popen | None = None):
        self.pid, self.sock, self._popen = pid, sock, popen

    def reap(self, timeout: float) -> int | None:
        """Wait (blocking) up to `timeout` s for the exit; SIGKILL after. Return the status."""
        if self._popen is not None:
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                return self._popen.wait()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = float("inf")
            time.sleep(0.02)


def fork_worker() -> WorkerProcess:
    """Fork the sync worker; call before any thread starts (before the event loop).

    With threads already running it starts one with `exec_worker` instead.

    The child shares the agent's imported modules copy-on-write: the start-up heap is
    frozen first so the collector does not touch (and so copy) it in either process.
    """
    import concurrent.futures.thread  # noqa: F401  what the agent imports later anyway,
    import prometheus_client.core  # noqa: F401    imported now to be shared with the worker

    import sync.downlink  # noqa: F401  the worker runs its apply_payload (Call)

    if threading.active_count() > 1:  # forking now could copy a lock another thread holds
        log.info("sync worker: threads already run here; starting it as a fresh interpreter")
        return exec_worker()
    parent_end, child_end = socket.socketpair()
    gc.collect()
    gc.freeze()
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        parent_end.close()
        code = 1
        try:
            code = _worker_process(child_end, parent_pid)
        except BaseException:
            log.exception("sync worker: failed")
        finally:
            logging.shutdown()
            os._exit(code)
    child_end.close()
    return WorkerProcess(pid, parent_end)


def exec_worker() -> WorkerProcess:
    """Start a worker as a fresh interpreter (`python -m sync.worker FD`): safe once threads run."""
    parent_end, child_end = socket.socketpair()
    try:
        popen = subprocess.Popen([sys.executable, "-m", "sync.worker", str(child_end.fileno())],
                                 pass_fds=[child_end.fileno()], close_fds=True)
    finally:
        child_end.close()
    return WorkerProcess(popen.pid, parent_end, popen)


class RemoteMqtt:
    """The agent's MQTT client as the agent process sees it: the worker holds the real one.

    Offers what the downlink and the heartbeat use: `subscribe` (before the worker
    starts), `publish`, `connected`, `reconnects`, `on_connection_change`.
    """

    def __init__(self, worker: "SyncWorker"):
        self._worker = worker
        self.subs: list[tuple[Sub, Callable]] = []
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def connected(self) -> bool:
        return self._worker.state.connected

    @property
    def reconnects(self) -> int:
        return self._worker.state.reconnects

    def on_connection_change(self, fn: Callable[[bool], None]) -> None:
        self._listeners.append(fn)

    def subscribe(self, topic_filter: str, handler, qos: int = 1, concurrent: bool = False) -> None:
        if self._worker.started:
            raise RuntimeError("sync worker: subscribe before it starts")
        self.subs.append((Sub(topic_filter, qos, concurrent), handler))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                content_type: str | None = None) -> asyncio.Future:
        channel = self._worker.channel
        if channel is None:
            raise MqttError(f"mqtt: publish to {topic}: the sync worker is not running")
        rid, future = self._worker.requests.new()
        channel.send(Publish(rid, topic, bytes(payload), qos, retain, content_type))
        return future

    def _changed(self, up: bool) -> None:
        for fn in self._listeners:
            fn(up)


class SyncWorker:
    """The uplink as the agent process sees it; build with `await SyncWorker.open(...)`.

    Same face as `Uplink` for the API, the heartbeat and the metrics: `status()`,
    `events_sent`, `mqtt`, `snapshot_version`, `async run()`.
    """

    def __init__(self, config: AgentConfig, event_log, process: WorkerProcess | None, *,
                 acked_seq: int, last_ack_at: str | None):
        self.config = config
        self.log = event_log
        self.acked_seq, self.last_ack_at = acked_seq, last_ack_at
        self.state = State(sent_seq=acked_seq)
        self.snapshot_version: Callable[[], int | None] = lambda: None
        self.mqtt = RemoteMqtt(self)
        self.requests = _Requests()
        self.channel: Channel | None = None
        self.process = process
        self.started = False
        self.restarts = 0
        self._tasks: set[asyncio.Task] = set()
        self._last_sent = -1
        event_log.add_listener(self._on_append)

    @classmethod
    async def open(cls, config: AgentConfig, event_log, process: WorkerProcess | None = None,
                   metrics: Any = None) -> "SyncWorker":
        """Load the cursor (creating its table) and build; `process` from `fork_worker()`."""
        acked, at = await load_cursor(event_log)
        worker = cls(config, event_log, process, acked_seq=acked, last_ack_at=at)
        if metrics is not None:
            register_metrics(worker, metrics.registry)
            _register_restarts(worker, metrics.registry)
        return worker

    @property
    def events_sent(self) -> int:
        return self.state.events_sent

    def status(self) -> dict:
        """The GET /v1/sync answer: the contract's keys first, then the worker's diagnostics."""
        return status_answer(self.log.last_seq, self.acked_seq, self.last_ack_at, self.snapshot_version(),
                             self.state) | {"worker_pid": self.process.pid if self.process else None,
                                            "worker_restarts": self.restarts}

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` (one of CALLABLE) in the worker, on a thread there; return its result.

        Raises what `fn` raised, or StorageError when the worker is not running or ends
        before it answers (a snapshot's message is then left unacknowledged and comes again).
        """
        from common.errors import StorageError

        name = f"{fn.__module__}:{fn.__qualname__}"
        if name not in CALLABLE:
            raise ValueError(f"sync worker: {name} may not be called there")
        channel = self.channel
        if channel is None:
            raise StorageError("sync worker: not running; try again when it is")
        rid, future = self.requests.new()
        channel.send(Call(rid, name, pickle.dumps(args)))
        await channel.drain()
        try:
            return await future
        except MqttError as exc:  # the worker ended (see _serve / _stop)
            raise StorageError(f"sync worker: {exc}") from None

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Serve the worker until cancelled, starting a new one when it dies; then stop it."""
        self.started = True
        try:
            while True:
                if self.process is None:
                    self.process = exec_worker()
                await self._serve(self.process)
                status = await asyncio.to_thread(self.process.reap, STOP_TIMEOUT_S)
                self.process.sock.close()
                self.restarts += 1
                log.error("sync: the sync worker (pid %d) ended (exit status %s); starting a new one"
                          " in %.0f s", self.process.pid, status, RESTART_DELAY_S)
                self.process = None
                await asyncio.sleep(RESTART_DELAY_S)
        except asyncio.CancelledError:
            await asyncio.shield(self._stop())
            raise

    async def _serve(self, process: WorkerProcess) -> None:
        """Hello, then the worker's frames; return when it ended (end of file).

        Cancelled (the agent stops): the channel stays open for `_stop`'s Stop.
        """
        channel = await Channel.over(process.sock)
        self.channel = channel
        self._last_sent = self.log.last_seq
        channel.send(Hello(self.config, self.acked_seq, self.last_ack_at, self._last_sent,
                           [sub for sub, _ in self.mqtt.subs]))
        while True:
            try:
                frame = await channel.recv()
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if isinstance(frame, Cursor):
                self._spawn(self._cursor(channel, frame))
            elif isinstance(frame, Deliver):
                self._spawn(self._deliver(channel, frame))
            elif isinstance(frame, (Reply, Result)):
                self.requests.settle(frame)
            elif isinstance(frame, State):
                self._set_state(frame)
        self.channel = None
        channel.close()
        self.requests.fail_all("mqtt: the sync worker ended before the broker acknowledged")
        self._set_state(State(sent_seq=self.acked_seq, reconnects=self.state.reconnects,
                              events_sent=self.state.events_sent))

    async def _stop(self) -> None:
        """Ask the worker to stop (offline status, disconnect), wait for it, SIGKILL after a while."""
        process, channel = self.process, self.channel
        if process is None:
            return
        if channel is not None:
            try:
                channel.send(Stop())
                await channel.drain()
            except ConnectionError:
                pass
        status = await asyncio.to_thread(process.reap, STOP_TIMEOUT_S)
        if status:
            log.warning("sync: the sync worker (pid %d) stopped with status %s", process.pid, status)
        self.channel = None
        if channel is not None:
            channel.close()
        process.sock.close()
        self.requests.fail_all("mqtt: the sync worker stopped")
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cursor(self, channel: Channel, frame: Cursor) -> None:
        error = None
        try:
            await self.log.write(lambda conn: store_cursor(conn, frame.seq, frame.at))
            self.acked_seq, self.last_ack_at = frame.seq, frame.at
        except Exception as exc:  # the worker leaves the ack unacknowledged; it comes again
            log.error("sync: could not store the cursor %d: %s", frame.seq, exc)
            error = f"{type(exc).__name__}: {exc}"
        _reply(channel, Reply(frame.id, error))

    async def _deliver(self, channel: Channel, frame: Deliver) -> None:
        error = None
        message = Message(frame.topic, frame.payload, frame.qos, frame.retain, frame.dup, frame.content_type)
        try:
            await self.mqtt.subs[frame.sub][1](message)
        except Exception as exc:  # logged here; the worker leaves the message unacknowledged
            log.exception("sync: handler for %s failed; message left unacknowledged", frame.topic)
            error = f"{type(exc).__name__}: {exc}"
        _reply(channel, Reply(frame.id, error))

    def _set_state(self, state: State) -> None:
        was = self.state.connected
        self.state = state
        if state.connected != was:
            self.mqtt._changed(state.connected)

    def _on_append(self, events) -> None:
        # One LastSeq per loop turn at most, however many commits landed in it.
        if self.channel is not None and self._last_sent != -2:
            self._last_sent = -2
            asyncio.get_running_loop().call_soon(self._send_last)

    def _send_last(self) -> None:
        self._last_sent = self.log.last_seq
        if self.channel is not None:
            try:
                self.channel.send(LastSeq(self._last_sent))
            except ConnectionError:
                pass


def _reply(channel: Channel, reply: Reply) -> None:
    try:
        channel.send(reply)
    except ConnectionError:
        pass  # the worker is gone; its successor gets the message again from the broker


def _register_restarts(worker: SyncWorker, registry) -> None:
    from prometheus_client.core import CounterMetricFamily

    class _Collector:
        def collect(self):
            yield CounterMetricFamily("edge_agent_sync_worker_restarts",
                                      "Times the sync worker process ended and was started again.",
                                      value=worker.restarts)

    registry.register(_Collector())


# ---------------------------------------------------------------- the worker


class LogView:
    """The log as the worker sees it: its path, and the last seq the agent reported."""

    def __init__(self, path: str, last_seq: int):
        self.path, self.last_seq = path, last_seq
        self._listeners: list[Callable[[list], None]] = []

    def add_listener(self, fn: Callable[[list], None]) -> None:
        self._listeners.append(fn)

    def advance(self, seq: int) -> None:
        if seq > self.last_seq:
            self.last_seq = seq
            for fn in self._listeners:
                fn([])


def _worker_process(sock: socket.socket, parent_pid: int, fresh: bool = False) -> int:
    """The worker's main: die with the agent, lower priority, run until Stop or end of file."""
    die_with_parent(parent_pid, signal.SIGKILL)
    # The agent decides when the worker stops (Stop after its own clean shutdown);
    # systemd's SIGTERM (KillMode=mixed) and a terminal's ^C go to the agent.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not lower_priority():
        log.warning("sync worker: could not lower its CPU priority (a seccomp filter without"
                    " sched_setscheduler?); it competes with the API at normal priority")
    set_thread_name("edge-agent-sync")
    # Batch payloads (up to batch_max_bytes) are mmapped and unmapped when sent, not kept
    # in the heap: see return_freed_memory and `push_states` in run_worker.
    return_freed_memory(mmap_threshold=MMAP_THRESHOLD)
    return asyncio.run(run_worker(sock, fresh))


async def run_worker(sock: socket.socket, fresh: bool = False) -> int:
    """Receive Hello, run the uplink with the real MQTT client, serve the agent's frames.

    `fresh`: started as a new interpreter, so logging is set up here from the config.
    """
    channel = await Channel.over(sock)
    try:
        hello = await channel.recv()
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0
    if not isinstance(hello, Hello):
        log.error("sync worker: expected Hello, got %s", type(hello).__name__)
        return 1
    config = hello.config
    if fresh:
        from common.logsetup import setup_logging

        setup_logging(config.log.level, config.log.format)
    requests = _Requests()
    view = LogView(config.storage.path, hello.last_seq)
    mqtt = agent_mqtt(config)

    async def store(seq: int, at: str) -> None:
        rid, future = requests.new()
        channel.send(Cursor(rid, seq, at))
        await future

    uplink = Uplink(config, view, mqtt, acked_seq=hello.acked_seq, last_ack_at=hello.last_ack_at,
                    store_cursor=store, on_change=lambda: push_state())

    def forward(index: int):
        async def handler(message: Message) -> None:
            rid, future = requests.new()
            channel.send(Deliver(rid, index, message.topic, message.payload, message.qos,
                                 message.retain, message.dup, message.content_type))
            await channel.drain()
            await future   # raises (so the message stays unacknowledged) when the agent's handler failed
        return handler

    for index, sub in enumerate(hello.subs):
        mqtt.subscribe(sub.topic_filter, forward(index), sub.qos, sub.concurrent)

    sent: list[State | None] = [None]

    def push_state() -> None:
        now = uplink.state()
        if now != sent[0]:
            sent[0] = now
            channel.send(now)

    async def push_states() -> None:
        busy = False
        while True:
            push_state()
            # A drained backlog leaves freed read and publish buffers behind: return them.
            if busy and uplink.idle:
                await asyncio.to_thread(return_freed_memory)
            busy = not uplink.idle
            await asyncio.sleep(STATE_EVERY_S)

    async def call(frame: Call) -> None:
        failed = False
        try:
            if frame.function not in CALLABLE:
                raise ValueError(f"sync worker: {frame.function} may not be called here")
            module, name = frame.function.split(":")
            fn = getattr(importlib.import_module(module), name)
            value = await asyncio.to_thread(_call_and_trim, fn, pickle.loads(frame.args))
        except Exception as exc:
            value, failed = exc, True
        try:
            data = pickle.dumps(value)
        except Exception:  # a value or exception that cannot be pickled: send its text
            data, failed = pickle.dumps(RuntimeError(f"{type(value).__name__}: {value}")), True
        try:
            channel.send(Result(frame.id, data, failed))
        except ConnectionError:
            pass

    async def publish(frame: Publish) -> None:
        error = None
        try:
            await mqtt.publish(frame.topic, frame.payload, frame.qos, frame.retain, frame.content_type)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        _reply(channel, Reply(frame.id, error))

    async def serve_agent() -> None:
        """Handle the agent's frames until Stop; end the process when the agent is gone."""
        while True:
            try:
                frame = await channel.recv()
            except (asyncio.IncompleteReadError, ConnectionError):
                # The agent ended without a Stop (killed): end now, as one process would
                # have; the broker publishes the will.
                os._exit(0)
            if isinstance(frame, LastSeq):
                view.advance(frame.seq)
            elif isinstance(frame, Reply):
                requests.settle(frame)
            elif isinstance(frame, (Publish, Call)):
                task = asyncio.get_running_loop().create_task(
                    publish(frame) if isinstance(frame, Publish) else call(frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif isinstance(frame, Stop):
                return

    mqtt.on_connection_change(lambda up: push_state())
    tasks: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    running = loop.create_task(uplink.run(), name="uplink")
    pusher = loop.create_task(push_states(), name="state")
    serving = loop.create_task(serve_agent(), name="agent")
    try:
        await asyncio.wait([running, serving], return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            log.error("sync worker: the uplink ended: %r", running.exception())
            return 1
        return 0
    finally:
        for task in (pusher, running, serving):
            task.cancel()
        await asyncio.wait([running])   # publishes the offline status, disconnects
        channel.close()


def _call_and_trim(fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    finally:
        return_freed_memory()   # a snapshot's 100,000s of decoded items are garbage now


def main(argv: list[str] | None = None) -> int:
    """`python -m sync.worker FD`: the worker started anew by the agent (see the docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    return _worker_process(sock, os.getppid(), fresh=True)


if __name__ == "__main__":
    sys.exit(main())
