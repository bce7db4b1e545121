"""The API's front-door decisions (agent/guard.py, agent/connections.py): pure, with a fake clock."""

import pytest

from agent.connections import FD_RESERVE, connection_budget
from common.logsetup import LogLimiter
from agent.guard import (RateLimiter, content_type_refusal, host_name, host_refusal,
                         normalize_origins, origin_refusal)
from agent.settings import AgentConfig, ApiSection, ConfigError, StoreSection

NAMES = frozenset({"store-pc", "127.0.0.1"})


@pytest.mark.parametrize("value, name", [
    ("store-pc", "store-pc"), ("Store-PC:8080", "store-pc"), ("store-pc.:8080", "store-pc"),
    ("[::1]:8080", "::1"), ("[::1]", "::1"), ("127.0.0.1:80", "127.0.0.1"),
    ("a:b", None), ("[::1]x", None), ("", None), ("a/b", None), ("user@host", None)])
def test_host_name_parses_host_headers(value, name):
    assert host_name(value) == name


@pytest.mark.parametrize("header", [None, "store-pc:8080", "localhost", "kiosk.localhost:8080", "10.1.2.3:8080",
                                    "[fe80::1]:8080", "127.0.0.1"])
def test_own_names_ip_literals_and_localhost_are_served(header):
    assert host_refusal(header, NAMES) is None


@pytest.mark.parametrize("header", ["evil.example", "evil.example:8080", "store-pc.evil.example", "localhost.evil", "@"])
def test_other_names_are_refused_without_listing_ours(header):
    why = host_refusal(header, NAMES)
    assert why and "store-pc" not in why.replace(header, "")


def test_origin_must_be_absent_same_origin_or_configured():
    allowed = normalize_origins(["http://pos.example:3000", "https://Office.example"])
    assert origin_refusal(None, "store-pc:8080", allowed) is None
    assert origin_refusal("http://store-pc:8080", "store-pc:8080", allowed) is None
    assert origin_refusal("http://STORE-PC:8080", "store-pc:8080", allowed) is None
    assert origin_refusal("http://store-pc:80", "store-pc", allowed) is None
    assert origin_refusal("http://pos.example:3000", "store-pc:8080", allowed) is None
    assert origin_refusal("https://office.example:443", "store-pc:8080", allowed) is None
    for refused in ("http://evil.example", "null", "http://store-pc:8081", "https://store-pc:8080",
                    "http://pos.example:3001", "file://", "store-pc:8080"):
        assert origin_refusal(refused, "store-pc:8080", allowed), refused
    assert origin_refusal("http://store-pc:8080", None, allowed)


@pytest.mark.parametrize("value, ok", [
    ("application/json", True), ("Application/JSON; charset=UTF-8", True), ('application/json;charset="utf-8"', True),
    ("application/json; charset=latin-1", False), ("text/plain", False), (None, False), ("", False),
    ("application/x-www-form-urlencoded", False), ("multipart/form-data; boundary=x", False),
    ("application/jsonp", False)])
def test_writes_need_json(value, ok):
    assert (content_type_refusal(value) is None) == ok


def test_rate_limiter_allows_the_burst_then_refills_at_the_rate():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)
    assert limiter.take("a", 0.0) == pytest.approx(0.5)   # a refused try takes nothing
    assert limiter.take("b", 0.0) == 0.0                  # per key
    assert limiter.wait("a", 0.25) == pytest.approx(0.25)
    assert limiter.take("a", 0.5) == 0.0
    assert limiter.take("a", 0.5) > 0
    assert [limiter.take("a", 100.0) for _ in range(4)][-1] > 0   # never more than the burst banked


def test_rate_limiter_off_at_rate_zero_and_bounded_in_keys():
    assert all(RateLimiter(0, 1).take("a", 0.0) == 0.0 for _ in range(100))
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=100)
    for i in range(1000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", float(i) / 1000)
    assert len(limiter) <= 100
    limiter.take("x", 1.0)
    assert limiter.take("x", 1.0) == 0.0 and limiter.take("x", 1.0) > 0   # the newest key kept its count


def test_log_limiter_says_once_per_interval_with_the_count_held_back():
    quiet = LogLimiter(interval=10)
    assert quiet.admit("k", 0.0) == 0
    assert [quiet.admit("k", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert quiet.admit("other", 5.0) == 0
    assert quiet.admit("k", 10.0) == 3


def test_connection_budget_fits_cap_and_two_accept_bursts_under_the_file_limit():
    assert connection_budget(1024, 1024, 4096) == (1024, 1024)   # the unit's LimitNOFILE: both fit
    cap, backlog = connection_budget(1024, 1024, 1024)
    assert (cap, backlog) == (598, 149)
    for nofile in (256, 1024, 4096, 65536):
        cap, backlog = connection_budget(1024, 1024, nofile)
        assert cap + 2 * backlog + FD_RESERVE <= nofile
    assert connection_budget(1024, 1024, 1 << 20) == (1024, 1024)


def test_write_token_comes_from_the_credential_first(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    cfg = AgentConfig(store=StoreSection(id="s"), api=ApiSection(write_token="from-config"))
    assert cfg.write_token_source({}) == ("from-config", "api.write_token")
    assert cfg.write_token_source({"CREDENTIALS_DIRECTORY": str(creds)}) == ("from-config", "api.write_token")
    (creds / "write_token").write_text("from-credential\n")
    assert cfg.write_token_source({"CREDENTIALS_DIRECTORY": str(creds)}) == ("from-credential", "credential")
    (creds / "write_token").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        cfg.write_token_source({"CREDENTIALS_DIRECTORY": str(creds)})
    empty_file = tmp_path / "token"
    empty_file.write_text("")
    with pytest.raises(ConfigError, match="api.write_token_file .* is empty"):
        AgentConfig(store=StoreSection(id="s"), api=ApiSection(write_token_file=str(empty_file))).write_token_source({})


def test_default_host_names_are_localhost_the_bound_host_and_the_hostname():
    import socket
    me = socket.gethostname()
    assert set(ApiSection(host="192.168.1.5").host_names()) == {"localhost", "192.168.1.5", me, f"{me}.local"}
    assert set(ApiSection(host="0.0.0.0").host_names()) == {"localhost", me, f"{me}.local"}
    assert ApiSection(allowed_hosts=["store.example"]).host_names() == ["store.example"]


async def test_accept_out_of_files_is_logged_once_per_interval_and_counted_each_time(caplog):
    import asyncio
    import errno
    import logging

    from agent.connections import AcceptErrorLog
    from agent.metrics import Metrics

    loop = asyncio.get_running_loop()
    now = [0.0]
    metrics = Metrics()
    handler = AcceptErrorLog(loop, metrics, clock=lambda: now[0])
    failure = {"message": "socket.accept() out of system resource",
               "exception": OSError(errno.EMFILE, "Too many open files")}
    with caplog.at_level(logging.ERROR, logger="edge_agent.api"):
        for _ in range(1000):            # asyncio reports one per pending connection
            handler(loop, failure)
        now[0] = 11.0
        handler(loop, failure)
    lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "Too many open files" in lines[0] and "999 more" in lines[1]
    assert b'edge_agent_http_accept_errors_total{errno="EMFILE"} 1001.0' in metrics.render()
    # Anything else still goes to the loop's usual handler.
    seen = []
    handler.previous = lambda _loop, context: seen.append(context["message"])
    handler(loop, {"message": "something else", "exception": ValueError()})
    assert seen == ["something else"]
