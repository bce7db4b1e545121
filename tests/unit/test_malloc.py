"""The agent caps glibc's malloc arenas at start (footprint: docs/benchmarks.md)."""

import platform

import pytest

from agent.app import limit_malloc_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_glibc_takes_the_arena_cap():
    assert limit_malloc_arenas(2) is True
