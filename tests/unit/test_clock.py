"""The shell's clock and id source: RFC 3339 formatting and UUIDv7 ids."""

import random
import uuid
from datetime import datetime, timezone

from common import clock


def reference_rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def test_rfc3339_equals_datetime_formatting_including_rounding_edges():
    rng = random.Random(7)
    edges = [0, 0.0005, 0.9995, 0.9999995, 1.0, 1764248700.123, 1764248700.9999996, 253402300799.999]
    for ts in edges + [rng.uniform(0, 4e9) for _ in range(20_000)]:
        assert clock.rfc3339(ts) == reference_rfc3339(ts), ts
    assert clock.rfc3339(1764248700.123) == "2025-11-27T13:05:00.123Z"


def test_uuid7_ids_are_version_7_and_strictly_increasing():
    new_id = clock.Uuid7()
    ids = [new_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for text in ids[:50]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)


def test_uuid7_stays_increasing_when_the_clock_stands_still(monkeypatch):
    new_id = clock.Uuid7()
    monkeypatch.setattr(clock.time, "time_ns", lambda: 1_764_248_700_123_000_000)
    ids = [new_id() for _ in range(10_000)]  # more than the 12-bit counter holds in one ms
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)
