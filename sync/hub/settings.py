"""The hub's configuration: the contract's hub keys, loaded by `common.config.load_config`.

`load_hub_config(path)` reads the TOML file with `EDGE_HUB__SECTION__KEY` overrides and
raises ConfigError naming the key for anything that does not fit. `[[stores]]` is
required and its ids must be unique, and so must `[[sources]]` ids ("online" is reserved);
a store's `timezone` must be a known IANA zone.
"""

from __future__ import annotations

import os
import zoneinfo
from typing import Annotated, Literal

import msgspec

from agent.events import STORE_ID_PATTERN
from common.config import ConfigError, LogSection, MqttSection, Section, load_config


WORKER_SESSION_EXPIRY_S = 30   # a shared-subscription worker's default MQTT session expiry


class HubSection(Section):
    id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)] = "hub-1"
    # N `edge-hub run` processes on one PostgreSQL (docs/scaling.md): each has its own
    # `worker` number (client id edge-hub-{id}-{worker}) and they share the ingest through
    # `$share/{share_group}/P/stores/+/events`.
    worker: Annotated[int, msgspec.Meta(ge=0, le=9999)] = 0
    workers_shared: bool = False
    share_group: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "edge-hub"
    # GET /metrics (Prometheus) and GET /healthz on this worker; 0: off.
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    http_host: str = "127.0.0.1"

    def client_id(self) -> str:
        """The MQTT client id: edge-hub-{id}, or edge-hub-{id}-{worker} for a shared worker."""
        return f"edge-hub-{self.id}-{self.worker}" if self.workers_shared else f"edge-hub-{self.id}"

    def events_filter(self, prefix: str) -> str:
        """The ingest subscription: every store's events, shared among the workers when they are."""
        plain = f"{prefix}/stores/+/events"
        return f"$share/{self.share_group}/{plain}" if self.workers_shared else plain


class HubStorageSection(Section):
    path: str = "/var/lib/edge-hub/hub.db"
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    # PostgreSQL instead of the SQLite file at `path` (sync/hub/pg.py): "postgresql://user@host/db".
    # Empty: SQLite.
    url: Annotated[str, msgspec.Meta(pattern=r"^$|^(postgres|postgresql)://")] = ""
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4   # PostgreSQL connections per hub process


class StoreEntry(Section):
    id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
    region: str = ""
    timezone: str = "UTC"   # IANA zone: calendar periods of sales caps are in it


class SourceEntry(Section):
    """One external stock source (`[[sources]]`): a warehouse, a partner or a supplier."""

    id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]   # the topic level
    kind: Literal["warehouse", "partner", "supplier"]
    name: str = ""                                                # display name (default: id)
    lead_time_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    stale_after_s: Annotated[int, msgspec.Meta(ge=1)] = 3600

    @property
    def display_name(self) -> str:
        return self.name or self.id


class CapsSection(Section):
    path: str = ""   # JSON lines of caps, read at start and when the file changes


class HubAvailabilitySection(Section):
    publish_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5
    # Republish an unchanged snapshot this often, so kiosks of a quiet store do not show it
    # as stale; keep it below the agents' availability.max_age_s.
    refresh_s: Annotated[float, msgspec.Meta(gt=0)] = 60


class CatalogSection(Section):
    path: str = ""


class IngestSection(Section):
    max_messages_per_commit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256
    # A commit group closes once it holds this many events (its first batch always fits):
    # a group stays short, so a store that waits for the next one does not wait long.
    max_events_per_commit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1_000
    # A batch reaching past the store's ack + max_ahead is refused (and acked): a leaked
    # store credential cannot plant events far ahead of what the store has written.
    max_ahead: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    rejections_kept: Annotated[int, msgspec.Meta(ge=1)] = 10_000   # newest rows of the rejections table
    refusal_log_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 60   # one WARNING per store and reason


class HubConfig(Section):
    stores: Annotated[list[StoreEntry], msgspec.Meta(min_length=1)]
    hub: HubSection = msgspec.field(default_factory=HubSection)
    storage: HubStorageSection = msgspec.field(default_factory=HubStorageSection)
    mqtt: MqttSection = msgspec.field(default_factory=MqttSection)
    availability: HubAvailabilitySection = msgspec.field(default_factory=HubAvailabilitySection)
    catalog: CatalogSection = msgspec.field(default_factory=CatalogSection)
    sources: list[SourceEntry] = []
    caps: CapsSection = msgspec.field(default_factory=CapsSection)
    ingest: IngestSection = msgspec.field(default_factory=IngestSection)
    log: LogSection = msgspec.field(default_factory=LogSection)

    def store_ids(self) -> set[str]:
        return {s.id for s in self.stores}


DEFAULT_CONFIG = "/etc/edge-hub/hub.toml"


def load_hub_config(path: str | os.PathLike | None, environ=None) -> HubConfig:
    """Load the hub's config (see the module docstring); raises ConfigError."""
    config = load_config(path, HubConfig, "EDGE_HUB", environ)
    seen: set[str] = set()
    for store in config.stores:
        if store.id in seen:
            raise ConfigError(f"config {path}: stores: store id {store.id!r} is listed twice")
        seen.add(store.id)
        try:
            zoneinfo.ZoneInfo(store.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"config {path}: stores: store {store.id!r}: timezone {store.timezone!r}"
                              " is not a known IANA time zone") from None
    sources: set[str] = set()
    for source in config.sources:
        if source.id in sources:
            raise ConfigError(f"config {path}: sources: source id {source.id!r} is listed twice")
        if source.id == "online":
            raise ConfigError(f"config {path}: sources: source id 'online' is reserved (orders claimed online)")
        sources.add(source.id)
    return config


def zones(config: HubConfig) -> dict[str, zoneinfo.ZoneInfo]:
    """Return store_id -> its time zone."""
    return {store.id: zoneinfo.ZoneInfo(store.timezone) for store in config.stores}
