"""The demo's supervisor: configs, child processes, link proxies, feed, traffic, control.

Children run in their own sessions, so a terminal's Ctrl-C reaches only the demo, which
then stops them in order (traffic, agents, hub, broker) with SIGTERM and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from demo.catalog import products, write_csv
from demo.feed import SOURCES, Feeds
from demo.proxy import LinkProxy
from demo.traffic import StoreClient, Traffic

log = logging.getLogger("demo")
MARKER = ".edge-demo-state"
CONTROL = "control.sock"
ROOT = Path(__file__).resolve().parents[1]


class DemoError(RuntimeError):
    """The demo could not start; the message says which part and why."""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str, module: str) -> list[str]:
    """Return the command for one of this environment's console scripts."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if path is None:
        raise DemoError("mosquitto is not installed (Debian: apt-get install mosquitto; scripts/demo installs it)")
    return path


def toml(sections: dict) -> str:
    lines = []
    for name, keys in sections.items():
        for entry in (keys if isinstance(keys, list) else [keys]):
            lines.append(f"[[{name}]]" if isinstance(keys, list) else f"[{name}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in entry.items())
            lines.append("")
    return "\n".join(lines)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    output: Path

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.output.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


@dataclass
class Store:
    store_id: str
    api_port: int
    proxy: LinkProxy
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


class Demo:
    """Everything the demo runs; `await run(stop)` returns the exit status once `stop` is set."""

    def __init__(self, state_dir: Path, *, stores: int = 3, products_count: int = 300, rate: float = 5.0,
                 port_base: int = 8101, prefix: str = "retail", status_every_s: float = 15.0,
                 max_age_s: float = 20.0, publish_interval_s: float = 2.0, out=sys.stdout,
                 tls: bool = False):
        self.dir = Path(state_dir).resolve()
        self.store_count = stores
        self.catalog = products(products_count)
        self.rate = rate
        self.port_base = port_base
        self.prefix = prefix
        self.status_every_s = status_every_s
        self.max_age_s = max_age_s
        self.publish_interval_s = publish_interval_s
        self.out = out
        self.tls = tls            # TLS with certificate identity and config/acl (scripts/demo --tls)
        self.certs = self.dir / "certs"
        self.children: list[Child] = []
        self.stores: list[Store] = []
        self.broker_port = 0
        self.traffic: Traffic | None = None
        self.feeds: Feeds | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ------------------------------------------------------------ start

    def prepare_dir(self) -> None:
        """Start from a clean state directory (only one the demo made itself is wiped)."""
        if self.dir.exists() and any(self.dir.iterdir()):
            if not (self.dir / MARKER).exists():
                raise DemoError(f"{self.dir} exists and is not a demo state directory; choose another --state-dir")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).write_text("state of `python -m demo`; wiped at every start\n")

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> Child:
        output = self.dir / f"{name}.log"
        with open(output, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **(env or {})})
        child = Child(name, proc, output)
        self.children.append(child)
        return child

    async def wait_port(self, child: Child, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if child.proc.poll() is not None:
                raise DemoError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise DemoError(f"{child.name} does not listen on {port} after {timeout}s:\n{child.tail()}")
            await asyncio.sleep(0.05)

    def mqtt_tls(self, identity: str) -> dict:
        """The [mqtt] TLS keys for `identity` (its certificate's CN) in a --tls demo; {} otherwise."""
        if not self.tls:
            return {}
        return {"tls_ca": str(self.certs / "ca.crt"), "tls_cert": str(self.certs / f"{identity}.crt"),
                "tls_key": str(self.certs / f"{identity}.key")}

    def tls_broker_conf(self) -> str:
        """A TLS listener as config/mosquitto-tls.conf: certificate CN = username, config/acl."""
        done = subprocess.run([str(ROOT / "scripts" / "certs"), str(self.certs), "broker", "edge-hub",
                               "warehouse-feed", "edge-feed", *self.store_ids()], capture_output=True, text=True)
        if done.returncode != 0:
            raise DemoError(f"scripts/certs failed: {done.stderr}")
        acl = self.dir / "acl"
        acl.write_text((ROOT / "config" / "acl").read_text().replace("retail/", f"{self.prefix}/"))
        # As root mosquitto drops to its own user, who could not read the keys made here.
        return (f"user {getpass.getuser()}\nallow_anonymous false\nacl_file {acl}\n"
                f"cafile {self.certs / 'ca.crt'}\ncertfile {self.certs / 'broker.crt'}\n"
                f"keyfile {self.certs / 'broker.key'}\nrequire_certificate true\n"
                "use_identity_as_username true\nuse_username_as_clientid true\n")

    async def start_broker(self) -> None:
        self.broker_port = free_port()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"listener {self.broker_port} 127.0.0.1\n"
                        + (self.tls_broker_conf() if self.tls else "allow_anonymous true\n")
                        + "persistence false\nset_tcp_nodelay true\n"
                        "max_queued_messages 100000\nlog_type error\nlog_type warning\n")
        child = self.spawn("mosquitto", [find_mosquitto(), "-c", str(conf)])
        await self.wait_port(child, self.broker_port)

    def store_ids(self) -> list[str]:
        return [f"store-{i + 1}" for i in range(self.store_count)]

    async def start_hub(self) -> None:
        write_csv(self.dir / "catalog.csv", self.catalog)
        config = self.dir / "hub.toml"
        config.write_text(toml({
            "hub": {"id": "demo-hub"},
            "storage": {"path": str(self.dir / "hub" / "hub.db")},
            "mqtt": {"host": "127.0.0.1", "port": self.broker_port, "topic_prefix": self.prefix,
                     "reconnect_min_s": 0.2, "reconnect_max_s": 2.0, **self.mqtt_tls("edge-hub")},
            "availability": {"publish_interval_s": self.publish_interval_s,
                             "refresh_s": max(self.publish_interval_s, self.max_age_s / 2)},
            "catalog": {"path": str(self.dir / "catalog.csv")},
            "log": {"format": "text"},
            # Only configured sources are accepted: the demo's warehouse feed (start_feed) is one.
            "sources": [{"id": "wh-central", "name": "Central warehouse", "kind": "warehouse",
                         "lead_time_s": 86400, "stale_after_s": 120}],
            "stores": [{"id": sid, "region": "north"} for sid in self.store_ids()],
            "sources": [dict(source) for source in SOURCES],   # what demo/feed.py publishes
        }))
        (self.dir / "hub").mkdir(exist_ok=True)
        self.spawn("hub", [*console_script("edge-hub", "sync.hub.cli"), "run", "--config", str(config)])

    async def start_store(self, index: int, store_id: str) -> Store:
        proxy = LinkProxy(store_id, self.broker_port)
        await proxy.start()
        wanted = self.port_base + index if self.port_base else 0
        port = wanted if wanted and port_is_free(wanted) else free_port()
        store = Store(store_id, port, proxy)
        config = self.dir / f"{store_id}.toml"
        config.write_text(toml({
            "store": {"id": store_id},
            "storage": {"path": str(self.dir / store_id / "events.db"), "synchronous": "NORMAL"},
            "api": {"host": "127.0.0.1", "port": port},
            "mqtt": {"host": "127.0.0.1", "port": proxy.port, "topic_prefix": self.prefix,
                     "reconnect_min_s": 0.2, "reconnect_max_s": 2.0, **self.mqtt_tls(store_id)},
            "sync": {"ack_timeout_s": 5},
            "availability": {"max_age_s": self.max_age_s},
            "log": {"format": "text"},
        }))
        # As the unit starts it (systemd/edge-agent.service).
        store.child = self.spawn(store_id, [*console_script("edge-agent", "agent.cli"), "run", "--config", str(config)])
        return store

    async def wait_ready(self, session: aiohttp.ClientSession, store: Store, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if store.child.proc.poll() is not None:
                raise DemoError(f"{store.store_id} exited with {store.child.proc.returncode}:\n{store.child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(store.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise DemoError(f"{store.store_id} not ready after {timeout}s:\n{store.child.tail()}")
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------ control

    def command(self, line: str) -> str:
        """Run one control command (`down STORE`, `up STORE`, `status`, `help`); return the answer."""
        words = line.split()
        if not words:
            return ""
        verb, args = words[0].lower(), words[1:]
        by_id = {s.store_id: s for s in self.stores}
        if verb in ("down", "up") and len(args) == 1:
            store = by_id.get(args[0])
            if store is None:
                return f"no store {args[0]!r}; stores: {', '.join(by_id)}"
            if verb == "down":
                store.proxy.down()
                return f"{store.store_id}: link DOWN (the store keeps selling; its kiosk shows offline)"
            store.proxy.up()
            return f"{store.store_id}: link UP (it reconnects and sends its backlog)"
        if verb == "status":
            return "status: see the next table"
        return "commands: down STORE | up STORE | status | help   (Ctrl-C stops the demo)"

    async def serve_control(self) -> asyncio.base_events.Server:
        path = self.dir / CONTROL

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                line = (await reader.readline()).decode(errors="replace").strip()
                answer = self.command(line)
                if line.split()[:1] == ["status"]:
                    answer = await self.status_table()
                else:
                    self.say(f"[control] {answer}")
                writer.write(answer.encode() + b"\n")
                await writer.drain()
            writer.close()

        return await asyncio.start_unix_server(handle, path=str(path))

    async def read_stdin(self) -> None:
        """Take commands typed at the demo's terminal, or piped to it, one per line, until EOF.

        The event loop watches stdin (`add_reader`) and reads only what is there: no
        thread ever blocks in readline, so nothing is left for the stop to wait on, and
        Ctrl-C stops the demo at once whatever the prompt is doing. A stdin the loop
        cannot watch (/dev/null, a regular file) has no commands to give: it is ignored.
        """
        if sys.stdin is None:
            return
        fd = sys.stdin.fileno()
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        pending = bytearray()

        def readable() -> None:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                loop.remove_reader(fd)
                lines.put_nowait(None)
                return
            pending.extend(chunk)
            while (end := pending.find(b"\n")) >= 0:
                lines.put_nowait(bytes(pending[:end]))
                del pending[:end + 1]

        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError):
            return
        try:
            while (line := await lines.get()) is not None:
                text = line.decode(errors="replace").strip()
                if text.split()[:1] == ["status"]:
                    self.say(await self.status_table())
                elif text:
                    self.say(self.command(text))
        finally:
            loop.remove_reader(fd)

    async def status_table(self) -> str:
        rows = [f"{'store':<10} {'link':<5} {'mqtt':<9} {'last_seq':>8} {'acked':>8} {'backlog':>8}"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for store in self.stores:
                sync = {}
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    async with session.get(store.url + "/v1/sync") as resp:
                        sync = await resp.json()
                connected = {True: "connected", False: "offline"}.get(sync.get("connected"), "?")
                rows.append(f"{store.store_id:<10} {'up' if store.proxy.is_up else 'DOWN':<5} {connected:<9}"
                            f" {sync.get('last_seq', '?'):>8} {sync.get('acked_seq', '?'):>8} {sync.get('backlog', '?'):>8}")
        stats = self.traffic.stats if self.traffic else None
        if stats:
            rows.append(f"traffic: {stats.commands} commands, {stats.events} events, "
                        f"{stats.refused} refused (over-reservations), {stats.capped} over the sales cap, "
                        f"{stats.failed} failed")
        return "\n".join(rows)

    async def print_status(self) -> None:
        while self.status_every_s > 0:
            await asyncio.sleep(self.status_every_s)
            self.say(await self.status_table())

    async def watch_children(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for child in self.children:
                if child.proc.poll() is not None:
                    self.say(f"demo: {child.name} exited with {child.proc.returncode}; stopping. Its log:\n{child.tail()}")
                    self.failed = True
                    stop.set()
                    return
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> int:
        """Start everything, run until `stop` is set, stop everything; return the exit status."""
        self.failed = False
        tasks: list[asyncio.Task] = []
        control = None
        try:
            self.prepare_dir()
            await self.start_broker()
            await self.start_hub()
            for i, store_id in enumerate(self.store_ids()):
                self.stores.append(await self.start_store(i, store_id))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                for store in self.stores:
                    await self.wait_ready(session, store)
            control = await self.serve_control()
            skus = [sku for sku, _ in self.catalog]
            self.traffic = Traffic([StoreClient(s.store_id, s.url) for s in self.stores], skus, self.rate)
            # Each feed under its own identity in a --tls demo, as config/acl grants them.
            feed = self.feeds = Feeds(skus, port=self.broker_port, prefix=self.prefix, mqtt_options=self.mqtt_tls)
            for name, coro in (("traffic", self.traffic.run()), ("feed", feed.run()),
                               ("status", self.print_status()), ("stdin", self.read_stdin()),
                               ("watch", self.watch_children(stop))):
                tasks.append(asyncio.create_task(coro, name=name))
            self.banner()
            await stop.wait()
        except DemoError as exc:
            self.say(f"demo: {exc}")
            self.failed = True
        finally:
            self.say("demo: stopping…")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if control is not None:
                control.close()
            clean = await self.stop_children()
            for store in self.stores:
                await store.proxy.stop()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / CONTROL).unlink()
        self.say("demo: stopped" + ("" if clean else " (some processes needed SIGKILL)"))
        return 1 if self.failed or not clean else 0

    def banner(self) -> None:
        self.say("")
        self.say(f"Store Edge Agent demo: {len(self.stores)} stores in region north, "
                 f"{len(self.catalog)} products, traffic {self.rate:g} commands/s")
        for store in self.stores:
            self.say(f"  {store.store_id} kiosk: {store.url}/")
        self.say(f"  broker: 127.0.0.1:{self.broker_port}"
                 + (" (TLS, certificate identity, config/acl)" if self.tls else "")
                 + f"   state and logs: {self.dir}")
        for line in self.feeds.describe() if self.feeds else ():
            self.say(f"  {line}")
        self.say("Pull a store's link:  type `down store-2` here (then `up store-2`),")
        self.say(f"  or from another terminal: uv run python -m demo --state-dir {self.dir} link store-2 down")
        self.say("Ctrl-C stops everything.")
        self.say("")

    async def stop_children(self, timeout: float = 20.0) -> bool:
        """SIGTERM the agents, then the hub, then the broker; return True when all exited 0 by themselves."""
        clean = True
        groups = [[c for c in self.children if c.name.startswith("store-")],
                  [c for c in self.children if c.name == "hub"],
                  [c for c in self.children if c.name == "mosquitto"]]
        for group in groups:
            for child in group:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in group:
                deadline = time.monotonic() + timeout
                while child.proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
                    self.say(f"demo: {child.name} ignored SIGTERM for {timeout:g}s; killed")
                    clean = False
                elif child.proc.returncode != 0:
                    self.say(f"demo: {child.name} exited with {child.proc.returncode}; see {child.output}")
                    clean = False
        return clean
