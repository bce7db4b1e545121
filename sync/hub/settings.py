"""The hub's configuration: the contract's hub keys, loaded by `common.config.load_config`.

`load_hub_config(path)` reads the TOML file with `EDGE_HUB__SECTION__KEY` overrides and
raises ConfigError naming the key for anything that does not fit. `[[stores]]` is
required and its ids must be unique.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

from agent.events import STORE_ID_PATTERN
from common.config import ConfigError, LogSection, MqttSection, Section, load_config


class HubSection(Section):
    id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)] = "hub-1"


class HubStorageSection(Section):
    path: str = "/var/lib/edge-hub/hub.db"
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"


class StoreEntry(Section):
    id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
    region: str = ""


class HubAvailabilitySection(Section):
    publish_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5
    # Republish an unchanged snapshot this often, so kiosks of a quiet store do not show it
    # as stale; keep it below the agents' availability.max_age_s.
    refresh_s: Annotated[float, msgspec.Meta(gt=0)] = 60


class CatalogSection(Section):
    path: str = ""


class IngestSection(Section):
    max_messages_per_commit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256
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
    return config
