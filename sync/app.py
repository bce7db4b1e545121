"""`edge-agent sync`: the store's sync process and its composition root.

settings -> sync.db (SqliteSyncState, its only writer) -> events.db read-only
(SqliteLogFeed) -> MQTT client -> uplink + downlink -> heartbeat, in one TaskGroup.

`edge-agent run` starts this process as a child (agent/supervisor.py) and supervises it;
it can also run alone, under a unit of its own (`edge-agent run --no-sync` then). The two
processes share nothing but SQLite files: this one reads the log and writes its own
progress (cursor, status, heartbeat, snapshot, catalog) to sync.db, which the agent reads.
It may start before the agent: it waits for the log to exist. Killed at any moment, it
loses nothing: the cursor moves only on the hub's ack and is durable before that ack
message is acknowledged; a restart resends from it, and the hub deduplicates.

Under systemd on its own (NOTIFY_SOCKET set) it sends READY=1 and WATCHDOG=1 itself; as
the agent's child it gets no NOTIFY_SOCKET, and the agent watches its heartbeat in sync.db.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

import msgspec

from agent.settings import DEFAULT_CONFIG, AgentConfig, config_path, sync_db_path
from common import clock
from common.aio import wait_for
from common.config import ConfigError, load_config
from common.errors import StorageError
from common.logsetup import setup_logging
from common.notify import Notifier, watchdog_interval, watchdog_pings
from common.proc import die_with_parent
from sync import protocol
from sync.downlink import Downlink
from sync.feed import SqliteLogFeed
from sync.mqtt import MqttClient
from sync.rehydrate import Rehydrate
from sync.state import SqliteSyncState
from sync.uplink import Uplink, agent_mqtt

log = logging.getLogger("edge_sync.app")

LOG_WAIT_S = 0.5
PARENT_ENV = "EDGE_SYNC_PARENT"   # set by agent/supervisor.py


async def open_feed(config: AgentConfig, stop: asyncio.Event) -> SqliteLogFeed | None:
    """Open the log read-only, waiting for the agent to create it; None when stopped first.

    Raises StorageError when the log belongs to another store.
    """
    path = Path(config.storage.path)
    waited = False
    while not stop.is_set():
        if path.exists():
            feed = SqliteLogFeed(path)
            owner = feed.store_id()
            if owner is not None:
                if owner != config.store.id:
                    feed.close()
                    raise StorageError(f"sync: the log at {path} belongs to store {owner!r}, not {config.store.id!r}")
                return feed
            feed.close()
        if not waited:
            log.info("sync: waiting for the log at %s (is edge-agent run started?)", path)
            waited = True
        try:
            await wait_for(stop.wait(), LOG_WAIT_S)
        except TimeoutError:
            pass
    return None


async def adopt_legacy_cursor(state: SqliteSyncState, feed: SqliteLogFeed) -> None:
    """Carry over the cursor that older agents kept inside events.db, once (saves a full resend)."""
    if await state.cursor() != (0, None):
        return
    legacy = feed.legacy_cursor()
    if legacy is not None and legacy[0] > 0:
        await state.store_cursor(legacy[0], legacy[1] or clock.utc_now())
        log.info("sync: took the cursor %d from the log's sync_cursor table", legacy[0])


def status_payload(config: AgentConfig, uplink: Uplink, last_seq: int,
                   snapshot_version: int | None = None) -> bytes:
    """The retained online status: the birth message's fields, the log's position and the snapshot held.

    `snapshot_version` must have been read before `last_seq`: the hub takes the pair as
    "every event after last_seq was decided under that snapshot's allowances or a newer
    one's" (docs/availability.md, giving back unused allowance).
    """
    status = protocol.Status(
        store_id=config.store.id, state="online", at=clock.utc_now(),
        client_id=config.mqtt.client_id or f"edge-agent-{config.store.id}",
        accept=[protocol.ZLIB_JSON] if config.mqtt.protocol == 5 else [])
    acked = uplink.acked_seq
    extra = {"last_seq": last_seq, "acked_seq": acked, "backlog": max(0, last_seq - acked)}
    if snapshot_version is not None:
        extra["snapshot_version"] = snapshot_version
    return msgspec.json.encode(msgspec.structs.asdict(status) | extra)


async def heartbeat(config: AgentConfig, state: SqliteSyncState, uplink: Uplink, mqtt: MqttClient,
                    position: SqliteLogFeed) -> None:
    """Record this process alive every `sync.heartbeat_s`; publish the retained status as the agent's did.

    `position` is a read-only connection to the log of this task's own (the uplink's feed
    is used from its reader thread): the status's `last_seq` is read from the log itself,
    after the snapshot version, never from the uplink's last poll.
    """
    every = config.sync.heartbeat_s
    publish_every = max(1, round(config.service.heartbeat_interval_s / every))
    beats = 0
    topic = protocol.status_topic(config.mqtt.topic_prefix, config.store.id)
    while True:
        await state.beat()
        if beats % publish_every == 0 and mqtt.connected:
            version = state.snapshot_version
            try:
                last_seq = position.last_seq()
            except StorageError as exc:
                log.warning("sync: status without the log's position: %s", exc)
            else:
                mqtt.publish(topic, status_payload(config, uplink, last_seq, version), qos=1, retain=True)
        beats += 1
        await asyncio.sleep(every)


def record_alarms(mqtt: MqttClient, state: SqliteSyncState) -> Callable[[], Awaitable[None]]:
    """Return a job that writes each change of the link's alarm to sync.db, in order.

    The agent shows it in GET /v1/sync, /readyz and /metrics. Subscribed at once, so the
    alarm `mqtt.start()` raises (a TLS file missing, say) is written as soon as the job runs.
    """
    changes: asyncio.Queue = asyncio.Queue()
    mqtt.on_alarm(lambda alarm, since: changes.put_nowait(alarm.as_dict(since) if alarm else None))

    async def job() -> None:
        while True:
            await state.store_link_alarm(await changes.get())

    return job


async def serve(config: AgentConfig, stop: asyncio.Event, *, notifier: Notifier | None = None) -> None:
    """Run the store's sync until `stop` is set; return after publishing offline and closing.

    Raises StorageError when sync.db or the log cannot be used (the supervisor restarts us).
    """
    notifier = notifier or Notifier.from_environ()
    state = await SqliteSyncState.open(sync_db_path(config), config.store.id)
    feed = position = None
    try:
        feed = await open_feed(config, stop)
        if feed is None:
            return
        position = SqliteLogFeed(feed.path)
        await adopt_legacy_cursor(state, feed)
        mqtt = agent_mqtt(config)
        alarms = record_alarms(mqtt, state)
        uplink = await Uplink.open(config, feed, state, mqtt)
        rehydrate = Rehydrate(config.store.id, config.mqtt.topic_prefix, position, state, mqtt)
        await rehydrate.open()
        rehydrate.attach(uplink)
        Downlink(mqtt, config.mqtt.topic_prefix, config.store.id, state).attach()
        await mqtt.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                background = [tasks.create_task(uplink.run(), name="uplink"),
                              tasks.create_task(heartbeat(config, state, uplink, mqtt, position), name="heartbeat"),
                              tasks.create_task(alarms(), name="alarms"),
                              tasks.create_task(rehydrate.run(), name="rehydrate")]
                interval = watchdog_interval() if config.service.watchdog else None
                if interval:
                    background.append(tasks.create_task(watchdog_pings(notifier, interval), name="watchdog"))
                notifier.send("READY=1", f"MAINPID={os.getpid()}", "STATUS=syncing")
                log.info("sync: started for %s (cursor %d, log at %d, db %s)", config.store.id,
                         uplink.acked_seq, uplink.last_seq, state.path)
                await stop.wait()
                notifier.send("STOPPING=1")
                for task in background:
                    task.cancel()
        finally:
            await asyncio.shield(mqtt.stop())   # publishes the offline status, then disconnects
    finally:
        for reader in (feed, position):
            if reader is not None:
                reader.close()
        await state.close()
        log.info("sync: stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent sync", description="The store's sync process")
    parser.add_argument("--config", help=f"the agent's TOML config (default $EDGE_AGENT_CONFIG or {DEFAULT_CONFIG})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sync process; SIGTERM/SIGINT stop it cleanly (exit 0). 2: configuration, 3: storage."""
    args = build_parser().parse_args(argv)
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():   # started by edge-agent run: die with it, as one service (the broker sends our will)
        die_with_parent(int(parent), signal.SIGKILL)
    path = config_path(args.config)
    try:
        config = load_config(path, AgentConfig, "EDGE_AGENT")
    except ConfigError as exc:
        print(f"edge-agent sync: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        asyncio.run(run())
    except (StorageError, ExceptionGroup) as exc:
        storage = exc.subgroup(StorageError) if isinstance(exc, ExceptionGroup) else exc
        if storage is None:
            raise
        for error in getattr(storage, "exceptions", [storage]):
            log.error("%s", error)
        return 3
    return 0
