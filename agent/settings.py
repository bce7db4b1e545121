"""The agent's configuration: the sections of `agent.toml` (docs/operations.md lists every key).

Loading, environment overrides and the shared sections (`[mqtt]`, `[log]`) live in
common/config.py; `load_config(path, AgentConfig, "EDGE_AGENT")` reads this file's shape.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Callable, Literal

import msgspec

from agent.events import STORE_ID_PATTERN
from common.clock import ShiftedClock
from common.config import (ConfigError, LogSection, MqttSection, Section, is_loopback,  # noqa: F401
                           load_config, read_secret)


class StoreSection(Section):
    id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]


class StorageSection(Section):
    path: str = "/var/lib/edge-agent/events.db"
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    checkpoint_every: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    min_free_mb: Annotated[int, msgspec.Meta(ge=0)] = 64
    backup_dir: str = ""              # empty: <storage dir>/backups
    backup_keep: Annotated[int, msgspec.Meta(ge=1)] = 7
    sync_path: str = ""               # the sync process's database; empty: <log's stem>.sync.db beside the log


class ApiSection(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    write_token: str = ""
    write_token_file: str = ""        # read the token from a file (systemd LoadCredential)


class SyncSection(Section):
    enabled: bool = True
    batch_max_events: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500
    batch_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    ack_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10
    rate_limit_eps: Annotated[int, msgspec.Meta(ge=0)] = 0   # events/s; 0 = unlimited
    poll_interval_s: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.005   # how often sync looks for new events
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0   # how often sync records that it is alive
    stall_after_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0   # no heartbeat this long: the agent restarts sync
    restart_min_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0     # back-off between restarts of a dead sync
    restart_max_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 5           # sync runs this much nicer than the agent


class AvailabilitySection(Section):
    max_age_s: Annotated[float, msgspec.Meta(gt=0)] = 120   # older snapshots are shown as stale


class ServiceSection(Section):
    watchdog: bool = True
    wal_checkpoint_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 300
    projection_checkpoint_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 60
    backup_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 3600   # 0: no scheduled backups
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 30
    disk_check_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5
    misfire_grace_s: Annotated[int, msgspec.Meta(ge=1)] = 60
    lease_expiry_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10   # how often expired leases are released


class AgentConfig(Section):
    store: StoreSection
    storage: StorageSection = msgspec.field(default_factory=StorageSection)
    api: ApiSection = msgspec.field(default_factory=ApiSection)
    mqtt: MqttSection = msgspec.field(default_factory=MqttSection)
    sync: SyncSection = msgspec.field(default_factory=SyncSection)
    availability: AvailabilitySection = msgspec.field(default_factory=AvailabilitySection)
    service: ServiceSection = msgspec.field(default_factory=ServiceSection)
    log: LogSection = msgspec.field(default_factory=LogSection)

    def write_token(self) -> str:
        """Return the API write token, from `api.write_token_file` when set."""
        return read_secret(self.api.write_token_file) if self.api.write_token_file else self.api.write_token

    def check_exposure(self) -> None:
        """Refuse a non-loopback API without a write token (raises ConfigError saying why)."""
        if not self.write_token() and not is_loopback(self.api.host):
            raise ConfigError(
                f"api.host is {self.api.host!r}, which is not loopback, and no api.write_token is set:"
                " anyone on the store's network could write stock. Set api.write_token"
                " (or api.write_token_file) or bind api.host to 127.0.0.1.")


def sync_db_path(config: AgentConfig) -> str:
    """Where the sync process keeps its database: `storage.sync_path`, or `events.db` -> `events.sync.db`."""
    if config.storage.sync_path:
        return config.storage.sync_path
    log_path = Path(config.storage.path)
    return str(log_path.with_name(log_path.stem + ".sync.db"))


DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"

TEST_CLOCK_ENV = "EDGE_AGENT_TEST_CLOCK_OFFSET_FILE"


def agent_clock() -> Callable[[], float]:
    """The agent's clock (Unix seconds): time.time, unless a test shifts it.

    Tests of clock jumps set $EDGE_AGENT_TEST_CLOCK_OFFSET_FILE to a file holding an offset
    in seconds (common.clock.ShiftedClock); a store's operator never sets it.
    """
    path = os.environ.get(TEST_CLOCK_ENV)
    return ShiftedClock(path) if path else time.time


def config_path(given: str | None) -> str | None:
    """The agent's config file: `given` (--config), else $EDGE_AGENT_CONFIG or DEFAULT_CONFIG when it exists.

    None: no file, defaults plus environment (store.id must then come from EDGE_AGENT__STORE__ID).
    """
    path = given or os.environ.get("EDGE_AGENT_CONFIG") or DEFAULT_CONFIG
    return path if given or os.path.exists(path) else None
