"""The hub's side: pure snapshot computation, and the publish job called directly on a real hub."""

from __future__ import annotations

import json

import msgspec

from sync import protocol
from sync.hub import availability as av
from sync.hub.publisher import AvailabilityPublisher
from sync.hub.service import HubService
from sync.hub.settings import load_hub_config
from sync.hub.store import Incoming
from tests.sync.helpers import mqtt_client

NOW_MS = 1_795_773_600_000


def items_of(snapshot: av.Snapshot) -> dict:
    body = json.loads(snapshot.payload)
    assert (body["v"], body["store_id"], body["version"]) == (1, snapshot.store_id, snapshot.version)
    return {i["sku"]: (i["nearby"], i["online"]) for i in body["items"]}


def test_region_items_list_other_carrying_stores_of_the_region_and_online():
    regions = av.regions_of([("s1", "north"), ("s2", "north"), ("s3", "north"), ("s9", "south")])
    available = {"s1": {"A": 3}, "s2": {"A": 0, "B": 5}, "s9": {"A": 100, "C": 1}}
    online = av.online_of({"w1": {"A": 4, "Z": 1}, "w2": {"A": 6}})
    north = av.region_items(regions["north"], available, online)
    rows = {s: {i.sku: ([(n.store_id, n.available) for n in i.nearby], i.online) for i in items}
            for s, items in north.items()}
    assert rows["s1"] == {"A": ([("s2", 0)], 10), "B": ([("s2", 5)], None), "Z": ([], 1)}
    assert rows["s2"] == {"A": ([("s1", 3)], 10), "B": ([], None), "Z": ([], 1)}
    assert rows["s3"] == {"A": ([("s1", 3), ("s2", 0)], 10), "B": ([("s2", 5)], None), "Z": ([], 1)}
    south = av.region_items(regions["south"], available, online)
    assert [i.sku for i in south["s9"]] == ["A", "C", "Z"] and all(not i.nearby for i in south["s9"])


def test_build_publishes_on_change_or_refresh_and_versions_only_grow():
    items = [protocol.AvailabilityItem("A", [protocol.NearbyStore("s2", 1)], None)]
    first = av.build("s1", items, None, NOW_MS, 60_000, "2026-11-27T10:00:00.000Z")
    assert first is not None and first.version == NOW_MS
    held = av.Published(first.version, first.digest, NOW_MS)
    assert av.build("s1", items, held, NOW_MS + 1000, 60_000, "x") is None
    changed = av.build("s1", [protocol.AvailabilityItem("A", [], None)], held, NOW_MS + 1000, 60_000, "x")
    assert changed.version == NOW_MS + 1000
    refreshed = av.build("s1", items, held, NOW_MS + 60_000, 60_000, "x")
    assert refreshed is not None and refreshed.digest == first.digest and refreshed.version > first.version
    # A clock that went backwards still gets a higher version.
    assert av.next_version(av.Published(NOW_MS + 5, b"", 0), NOW_MS - 10_000) == NOW_MS + 6


def hub_config(tmp_path, broker, catalog: str = ""):
    path = tmp_path / "hub.toml"
    path.write_text(
        f'[storage]\npath = "{tmp_path / "hub.db"}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[catalog]\npath = "{catalog}"\n'
        '[[sources]]\nid = "wh-1"\nkind = "warehouse"\n'
        '[[stores]]\nid = "store-a"\nregion = "north"\n[[stores]]\nid = "store-b"\nregion = "north"\n'
        '[[stores]]\nid = "store-c"\nregion = "south"\n')
    return load_hub_config(path, environ={})


def event(seq: int, store_id: str, type_: str, sku: str, qty: int, location: str = "floor") -> tuple:
    body = json.dumps({
        "seq": seq, "event_id": f"00000000-0000-7000-8000-{seq:012d}", "store_id": store_id, "type": type_,
        "occurred_at": "2026-11-27T10:00:00.000Z", "recorded_at": "2026-11-27T10:00:00.000Z",
        "command_id": f"c{seq}", "schema": 1, "sku": sku, "qty": qty, "location": location},
        separators=(",", ":")).encode()
    return protocol.decode(body, protocol.EventHead), body


async def open_hub(config, clock) -> tuple[HubService, AvailabilityPublisher]:
    service = await HubService.open(config)
    publisher = await AvailabilityPublisher.attach(service, now=clock)
    await service.mqtt.start()
    await service.mqtt.wait_subscribed(10)
    return service, publisher


def test_sources_go_in_one_table_and_only_their_quantities_in_the_items():
    sources = [av.Source("wh-1", "Central", "warehouse", 86400, 60), av.Source("sup-x", "Supplier X", "supplier", 0, 3600)]
    stock = {"wh-1": {"A": 5, "B": 2}, "sup-x": {"A": 40}}
    updated = {"wh-1": (NOW_MS - 1000, "2026-11-16T07:59:59.000Z"), "sup-x": (NOW_MS - 2000, "2026-11-16T07:59:58.000Z")}
    figures, online = av.source_figures(sources, stock, updated, {"online": {"A": 1}}, NOW_MS)
    assert figures == {"A": {"wh-1": 4, "sup-x": 40}, "B": {"wh-1": 2}} and online == {"A": 4, "B": 2}
    table = av.source_table(sources, updated, NOW_MS)
    items = av.region_items(["s1"], {"s1": {}}, online, figures)["s1"]
    snap = av.build("s1", items, None, NOW_MS, 0, "2026-11-16T08:00:00.000Z", table=table)
    body = json.loads(snap.payload)
    assert body["sources"] == [
        {"source_id": "wh-1", "name": "Central", "kind": "warehouse", "lead_time_s": 86400,
         "updated_at": "2026-11-16T07:59:59.000Z", "stale": False, "stale_after_s": 60},
        {"source_id": "sup-x", "name": "Supplier X", "kind": "supplier", "lead_time_s": 0,
         "updated_at": "2026-11-16T07:59:58.000Z", "stale": False, "stale_after_s": 3600}]
    assert [i["sources"] for i in body["items"]] == [{"wh-1": 4, "sup-x": 40}, {"wh-1": 2}]
    previous = av.Published(snap.version, snap.digest, NOW_MS)
    # A new list with the same figures moves updated_at alone: the digest stays, nothing is due.
    later = {sid: (ms + 30_000, "2026-11-16T08:00:29.000Z") for sid, (ms, _) in updated.items()}
    assert av.build("s1", items, previous, NOW_MS + 31_000, 0, "x",
                    table=av.source_table(sources, later, NOW_MS + 31_000)) is None
    # A stale transition (wh-1 past its 60 s) changes it.
    assert av.build("s1", items, previous, NOW_MS + 120_000, 0, "x",
                    table=av.source_table(sources, updated, NOW_MS + 120_000)) is not None
    # Without sources the snapshot has no table and the digest is the items' alone, as before.
    plain = av.build("s1", [protocol.AvailabilityItem("A", [], 3)], None, NOW_MS, 0, "x")
    assert "sources" not in json.loads(plain.payload) and plain.digest == av.items_digest(b'[{"sku":"A","nearby":[],"online":3}]')


async def test_unchanged_snapshot_is_republished_after_the_configured_refresh(tmp_path, broker):
    hub_config(tmp_path, broker)
    config = load_hub_config(tmp_path / "hub.toml", environ={"EDGE_HUB__AVAILABILITY__REFRESH_S": "30"})
    t = [NOW_MS / 1000]
    service, publisher = await open_hub(config, lambda: t[0])
    try:
        await service.store.write([Incoming("store-a", [event(1, "store-a", "received", "A", 5)])], "x")
        first = {s.store_id: s for s in await publisher.publish_changed()}
        assert "store-b" in first
        t[0] += 29
        assert await publisher.publish_changed() == []  # unchanged and not yet due
        t[0] += 2
        again = {s.store_id: s for s in await publisher.publish_changed()}
        assert again["store-b"].digest == first["store-b"].digest
        assert again["store-b"].version > first["store-b"].version
    finally:
        await service.mqtt.stop()
        await service.close()


async def test_publish_job_projects_ingested_events_and_persists_versions(tmp_path, broker):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,name\nA,Blue mug\nB,Red mug\nbad sku,x\n")
    config = hub_config(tmp_path, broker, str(catalog))
    t = [NOW_MS / 1000]
    service, publisher = await open_hub(config, lambda: t[0])
    try:
        await service.store.write([Incoming("store-a", [event(1, "store-a", "received", "A", 5),
                                                        event(2, "store-a", "sold", "A", 2)]),
                                   Incoming("store-b", [event(1, "store-b", "received", "B", 3, "backroom")])],
                                  "2026-11-27T10:00:00.000Z")
        # A redelivered batch is a duplicate: the projection must not count it twice.
        await service.store.write([Incoming("store-a", [event(2, "store-a", "sold", "A", 2)])], "x")
        first = {s.store_id: s for s in await publisher.publish_changed()}
        assert set(first) == {"store-a", "store-b", "store-c"}
        assert items_of(first["store-b"]) == {"A": ([{"store_id": "store-a", "available": 3}], None), "B": ([], None)}
        assert items_of(first["store-a"]) == {"A": ([], None), "B": ([{"store_id": "store-b", "available": 3}], None)}
        assert items_of(first["store-c"]) == {}
        t[0] += 1
        assert await publisher.publish_changed() == []  # nothing changed, nothing due

        await service.store.write([Incoming("store-a", [event(3, "store-a", "sold", "A", 3)])], "x")
        await publisher.on_warehouse(_msg("retail/warehouses/wh-1/stock",
                                          {"v": 1, "warehouse_id": "wh-1", "version": 1,
                                           "items": [{"sku": "A", "available": 9}]}))
        await publisher.on_warehouse(_msg("retail/warehouses/wh-1/stock", b"{bad"))
        assert service.counters["source_undecodable"] == 1
        t[0] += 1
        second = {s.store_id: s for s in await publisher.publish_changed()}
        assert items_of(second["store-b"])["A"] == ([{"store_id": "store-a", "available": 0}], 9)
        assert items_of(second["store-c"]) == {"A": ([], 9)}
        assert second["store-b"].version > first["store-b"].version
        assert publisher.catalog_version == 1
    finally:
        await service.mqtt.stop()
        await service.close()

    # A restarted hub (clock set back) keeps versions growing and republishes every store once.
    t[0] -= 3600
    service, publisher = await open_hub(config, lambda: t[0])
    try:
        third = {s.store_id: s for s in await publisher.publish_changed()}
        assert set(third) == {"store-a", "store-b", "store-c"}
        assert all(third[s].version > second.get(s, first[s]).version for s in third)
        assert publisher.catalog_version == 1  # same file, same version
        retained = await _retained(broker, protocol.catalog_topic("retail"))
        assert json.loads(retained) == {"v": 1, "version": 1, "items": [
            {"sku": "A", "name": "Blue mug"}, {"sku": "B", "name": "Red mug"}]}
    finally:
        await service.mqtt.stop()
        await service.close()


def _msg(topic: str, body) -> object:
    from sync.mqtt import Message
    return Message(topic, body if isinstance(body, bytes) else msgspec.json.encode(body), 1, True)


async def _retained(broker, topic: str) -> bytes:
    import asyncio

    got: list[bytes] = []

    async def on(message):
        got.append(message.payload)

    client = mqtt_client(broker, "test-retained-reader")
    client.subscribe(topic, on)
    await client.start()
    try:
        for _ in range(500):
            if got:
                return got[-1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no retained message on {topic}")
    finally:
        await client.stop()
