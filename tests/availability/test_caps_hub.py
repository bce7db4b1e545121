"""Setting caps (CLI, MQTT, file) on a real `edge-hub run` and mosquitto; bad input refused."""

from __future__ import annotations

import asyncio
import json
import time

from sync import protocol
from tests.availability.hubfeeds import PREFIX, Snapshots, cli, feed_hub, items, publish, wait_rejected
from tests.sync.helpers import wait_until

STORES = ("store-a", "store-b", "store-c")


def caps_list(hub) -> dict[str, dict]:
    done = cli(hub, "caps", "list")
    assert done.returncode == 0, done.stderr
    return {row["sku"]: row for row in map(json.loads, done.stdout.splitlines())}


def cap_of(snapshot: dict, sku: str) -> dict | None:
    return items(snapshot).get(sku, {}).get("cap")


async def test_caps_set_list_and_clear_through_the_cli(tmp_path, broker):
    with feed_hub(tmp_path, broker, stores=STORES, zones={"store-a": "Europe/Paris"}) as hub:
        async with Snapshots(broker, STORES) as snaps:
            done = cli(hub, "caps", "set", "SKU-1", "--limit", "2", "--period", "week")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["topic"] == "retail/caps/SKU-1"
            snap = await snaps.wait("store-a", lambda i: i.get("SKU-1", {}).get("cap"), what="the store cap")
            cap = cap_of(snap, "SKU-1")
            assert {k: cap[k] for k in ("limit", "scope", "period", "allowance")} == {
                "limit": 2, "scope": "store", "period": "week", "allowance": 2}
            # A calendar week in the store's zone: Monday 00:00 Paris is 23:00 UTC on Sunday.
            assert cap["period_start"].endswith("T23:00:00.000Z")
            assert snaps.got["store-b"] and cap_of(
                await snaps.wait("store-b", lambda i: i.get("SKU-1", {}).get("cap")), "SKU-1")["period_start"].endswith(
                "T00:00:00.000Z")
            assert caps_list(hub)["SKU-1"] == {"sku": "SKU-1", "limit": 2, "period": "week", "scope": "store",
                                               "store_id": None, "origin": "mqtt"}

            # One store only; then chain-wide: split into allowances that sum to no more than the limit.
            assert cli(hub, "caps", "set", "SKU-2", "--limit", "1", "--period", "day", "--store", "store-b").returncode == 0
            assert cli(hub, "caps", "set", "SKU-3", "--limit", "9", "--period", "month", "--scope", "chain").returncode == 0
            snap_b = await snaps.wait("store-b", lambda i: i.get("SKU-2", {}).get("cap") and i.get("SKU-3", {}).get("cap"))
            assert cap_of(snap_b, "SKU-2")["allowance"] == 1
            assert cap_of(await snaps.wait("store-a", lambda i: i.get("SKU-3", {}).get("cap")), "SKU-2") is None
            allowances = {s: cap_of(await snaps.wait(s, lambda i: i.get("SKU-3", {}).get("cap")), "SKU-3")["allowance"]
                          for s in STORES}
            assert allowances == {"store-a": 2, "store-b": 2, "store-c": 2}  # half the equal share each; 3 in the pool
            listed = caps_list(hub)
            assert listed["SKU-3"]["allowances"] == allowances and listed["SKU-2"]["store_id"] == "store-b"

            assert cli(hub, "caps", "clear", "SKU-1").returncode == 0
            await snaps.wait("store-a", lambda i: not i.get("SKU-1", {}).get("cap"), what="SKU-1 uncapped")
            wait_until(lambda: "SKU-1" not in caps_list(hub), 20, "the cap to leave caps list")


async def test_bad_cli_input_is_refused_naming_the_field_and_nothing_is_published(tmp_path, broker):
    with feed_hub(tmp_path, broker, stores=STORES) as hub:
        async with Snapshots(broker, STORES) as snaps:
            for args, field in ((["--limit", "2", "--period", "year"], "period"),
                                (["--limit", "-1", "--period", "week"], "limit"),
                                (["--limit", "2", "--period", "week", "--scope", "region"], "scope"),
                                (["--limit", "2", "--period", "week", "--scope", "chain", "--store", "store-a"],
                                 "store_id"),
                                (["--limit", "2", "--period", "week", "--store", "store-z"], "store_id")):
                done = cli(hub, "caps", "set", "SKU-1", *args)
                assert done.returncode == 2, (args, done.stdout, done.stderr)
                assert done.stderr.startswith(f"edge-hub: caps set: {field}: "), done.stderr
            done = cli(hub, "caps", "set", "bad sku", "--limit", "2", "--period", "week")
            assert done.returncode == 2 and "sku: 'bad sku' is not a valid SKU" in done.stderr
            done = cli(hub, "caps", "set", "SKU-1", "--limit", "two", "--period", "week")
            assert done.returncode == 2 and "--limit" in done.stderr
            # A good cap after them is the only one the hub ever saw.
            assert cli(hub, "caps", "set", "SKU-9", "--limit", "1", "--period", "day").returncode == 0
            await snaps.wait("store-a", lambda i: i.get("SKU-9", {}).get("cap"))
            assert list(caps_list(hub)) == ["SKU-9"]
            assert not any("SKU-1" in items(s) for s in snaps.got["store-a"])
            assert hub.stats()["rejected"] == {}


async def test_caps_over_mqtt_are_validated_and_a_bad_one_is_counted_and_dropped(tmp_path, broker):
    with feed_hub(tmp_path, broker, stores=STORES) as hub:
        async with Snapshots(broker, STORES) as snaps:
            good = {"v": 1, "sku": "SKU-1", "limit": 3, "period": "day", "scope": "store"}
            await publish(broker, protocol.caps_topic(PREFIX, "SKU-1"), good)
            await snaps.wait("store-c", lambda i: (i.get("SKU-1", {}).get("cap") or {}).get("allowance") == 3)
            bad = [(protocol.caps_topic(PREFIX, "SKU-1"), {**good, "limit": "3"}, "cap_undecodable"),
                   (protocol.caps_topic(PREFIX, "SKU-1"), {**good, "period": "fortnight"}, "cap_invalid"),
                   (protocol.caps_topic(PREFIX, "SKU-1"), {**good, "sku": "SKU-2"}, "cap_invalid"),
                   (protocol.caps_topic(PREFIX, "SKU-1"), {**good, "scope": "chain", "store_id": "store-a"},
                    "cap_invalid"),
                   (protocol.caps_topic(PREFIX, "SKU-1"), b"\xff", "cap_undecodable")]
            for topic, payload, _ in bad:
                await publish(broker, topic, payload)
            await wait_rejected(hub, "cap_invalid", 3)
            await wait_rejected(hub, "cap_undecodable", 2)
            out = hub.output()
            assert "(cap_undecodable): CapMessage: Expected `int`, got `str` - at `$.limit`" in out
            assert "(cap_invalid): period: 'fortnight' is not one of day, week, month" in out
            assert caps_list(hub)["SKU-1"]["limit"] == 3     # the held cap stays
            # An empty retained message clears it.
            await publish(broker, protocol.caps_topic(PREFIX, "SKU-1"), b"")
            wait_until(lambda: "SKU-1" not in caps_list(hub), 20, "the cap cleared")
            assert hub.running


async def test_caps_from_the_file_feed_apply_and_a_bad_file_changes_nothing(tmp_path, broker):
    path = tmp_path / "caps.jsonl"
    path.write_text('# weekly limits\n{"v": 1, "sku": "SKU-1", "limit": 2, "period": "week"}\n\n'
                    '{"v": 1, "sku": "SKU-2", "limit": 6, "period": "week", "scope": "chain"}\n')
    with feed_hub(tmp_path, broker, stores=STORES, extra=f'[caps]\npath = "{path}"\n') as hub:
        async with Snapshots(broker, STORES) as snaps:
            snap = await snaps.wait("store-a", lambda i: "SKU-1" in i and "SKU-2" in i)
            assert cap_of(snap, "SKU-1")["allowance"] == 2 and cap_of(snap, "SKU-2")["scope"] == "chain"
            assert {r["origin"] for r in caps_list(hub).values()} == {"file"}
            # A bad line refuses the whole file: SKU-1's new limit does not apply either.
            time.sleep(0.01)
            path.write_text('{"v": 1, "sku": "SKU-1", "limit": 5, "period": "week"}\n'
                            '{"v": 1, "sku": "SKU-3", "limit": 2, "period": "week", "store_id": "store-q"}\n')
            await wait_rejected(hub, "caps_file_invalid", 1)
            assert f"{path} line 2: store_id: 'store-q' is not in the hub's [[stores]]" in hub.output()
            assert caps_list(hub)["SKU-1"]["limit"] == 2 and "SKU-2" in caps_list(hub)
            # An MQTT cap overrides the file's for its SKU; the fixed file then applies (SKU-2 gone).
            await publish(broker, protocol.caps_topic(PREFIX, "SKU-1"),
                          {"v": 1, "sku": "SKU-1", "limit": 1, "period": "day"})
            path.write_text('{"v": 1, "sku": "SKU-1", "limit": 5, "period": "week"}\n')
            await snaps.wait("store-a", lambda i: not i.get("SKU-2", {}).get("cap")
                             and (i.get("SKU-1", {}).get("cap") or {}).get("limit") == 1)
            listed = caps_list(hub)
            assert list(listed) == ["SKU-1"] and listed["SKU-1"]["origin"] == "mqtt"
            await publish(broker, protocol.caps_topic(PREFIX, "SKU-1"), b"")  # back to the file's
            await snaps.wait("store-a", lambda i: (i.get("SKU-1", {}).get("cap") or {}).get("limit") == 5)
            await asyncio.sleep(0)
