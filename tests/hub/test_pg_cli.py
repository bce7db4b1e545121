"""`edge-hub stats`, `export` and `epoch [--new]` on a PostgreSQL hub."""

from __future__ import annotations

import asyncio
import json

from sync.hub import cli
from sync.hub.pg import PgStorage
from tests.hub.storage_support import A, NOW, bodies, incoming


def test_stats_export_and_a_new_epoch_on_postgresql(pg_url, tmp_path, capsys):
    async def write() -> str:
        storage = await PgStorage.open(pg_url, [A])
        try:
            results = await storage.write([incoming(1, 3), incoming(5, 5)], NOW)
            return results.acks[A].epoch
        finally:
            await storage.close()

    epoch = asyncio.run(write())
    config = tmp_path / "hub.toml"
    config.write_text(f'[storage]\nurl = "{pg_url}"\n[[stores]]\nid = "{A}"\n')
    assert cli.main(["stats", "--config", str(config)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["stores"][A]["acked_seq"], stats["stores"][A]["max_seq"], stats["stores"][A]["events"]) == (3, 5, 4)
    assert cli.main(["export", "--store", A, "--config", str(config)]) == 0
    assert capsys.readouterr().out.encode().splitlines() == bodies(1, 3) + bodies(5, 5)
    assert cli.main(["epoch", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == epoch
    assert cli.main(["epoch", "--new", "--config", str(config)]) == 0
    new = json.loads(capsys.readouterr().out)["epoch"]
    assert new != epoch
    assert asyncio.run(_epoch(pg_url)) == new, "the new epoch is the record's from now on"


async def _epoch(url: str) -> str:
    storage = await PgStorage.open(url, [A])
    try:
        return (await storage.ack_state(A)).epoch
    finally:
        await storage.close()
