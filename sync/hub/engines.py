"""Open the hub storage the configuration names (sync/hub/storage.py defines the protocol).

PostgreSQL (sync/hub/pg.py) when `storage.url` is set, else SQLite at `storage.path`
(sync/hub/store.py). Kept apart from the protocol so that the two engines import it and
it imports them, with no circle between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sync.hub.storage import HubStorage

if TYPE_CHECKING:
    from sync.hub.settings import HubConfig


def is_postgres(config: "HubConfig") -> bool:
    return bool(config.storage.url)


async def open_storage(config: "HubConfig") -> HubStorage:
    """Open the storage `config.storage` names: PostgreSQL when `url` is set, else SQLite at `path`."""
    if is_postgres(config):
        from sync.hub.pg import PgStorage

        return await PgStorage.open(config.storage.url, config.store_ids(), pool_size=config.storage.pool_size,
                                    rejections_kept=config.ingest.rejections_kept)
    from sync.hub.store import SqliteStorage

    return await SqliteStorage.open(config.storage.path, config.store_ids(), config.storage.synchronous,
                                    config.ingest.rejections_kept)
