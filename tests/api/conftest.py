"""Fixtures for the local API: a real agent (serve()) on a free loopback port, in this loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.app import AgentContext, serve
from agent.settings import AgentConfig, ApiSection, StorageSection, StoreSection, SyncSection

STORE = "store-0042"


@dataclass
class Served:
    """A running agent and a client session on its API."""

    ctx: AgentContext
    http: aiohttp.ClientSession
    db_path: Path

    @property
    def url(self) -> str:
        return self.ctx.api_url

    @property
    def last_seq(self) -> int:
        return self.ctx.log.last_seq

    async def post(self, body: Any, token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        """POST /v1/events; return (status, JSON answer)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs = {"data": raw, "headers": {**headers, "Content-Type": "application/json"}} if raw is not None \
            else {"json": body, "headers": headers}
        async with self.http.post("/v1/events", **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(path) as resp:
            return resp.status, await resp.json(content_type=None)


def agent_config(tmp_path: Path, write_token: str = "", **storage: Any) -> AgentConfig:
    return AgentConfig(
        store=StoreSection(id=STORE),
        storage=StorageSection(path=str(tmp_path / "events.db"), **storage),
        api=ApiSection(host="127.0.0.1", port=0, write_token=write_token),
        # The API's own tests need no broker; sync has its own suite.
        sync=SyncSection(enabled=False))


@pytest.fixture
async def start_agent(tmp_path):
    """Return `await start(write_token="", **storage) -> Served`; every agent stops at teardown."""
    running: list[tuple[asyncio.Event, asyncio.Task, aiohttp.ClientSession]] = []

    async def start(write_token: str = "", **storage: Any) -> Served:
        config = agent_config(tmp_path, write_token, **storage)
        stop = asyncio.Event()
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(config, stop, started=ready.set_result))
        done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            stop.set()
            await task  # raises the startup error, if any
            raise AssertionError("agent did not become ready in 15 s")
        ctx = ready.result()
        http = aiohttp.ClientSession(base_url=ctx.api_url)
        running.append((stop, task, http))
        return Served(ctx, http, tmp_path / "events.db")

    yield start
    for stop, task, http in running:
        await http.close()
        stop.set()
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def agent(start_agent) -> Served:
    return await start_agent()


@pytest.fixture
async def secured(start_agent) -> Served:
    return await start_agent(write_token="s3cret-token")
