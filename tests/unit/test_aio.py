"""common.aio.wait_for: a timeout that never swallows the caller's cancellation."""

import asyncio

import pytest

from common.aio import wait_for


async def _cancel_as_it_completes(wait) -> str:
    event = asyncio.Event()
    task = asyncio.create_task(wait(event.wait(), 10))
    await asyncio.sleep(0)          # the task now waits on the event
    event.set()                     # the awaited thing completes...
    task.cancel()                   # ...and the cancel arrives in the same loop turn
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "swallowed"


async def test_a_cancel_that_races_completion_is_raised():
    assert await _cancel_as_it_completes(wait_for) == "cancelled"


async def test_the_stdlib_wait_for_this_replaces_swallows_it_on_this_python():
    # Documents why common.aio exists: on 3.11 asyncio.wait_for loses this cancel (gh-86296).
    import sys

    expected = "swallowed" if sys.version_info < (3, 12) else "cancelled"
    assert await _cancel_as_it_completes(asyncio.wait_for) == expected


async def test_returns_the_result_and_times_out():
    async def value():
        await asyncio.sleep(0)
        return 7

    assert await wait_for(value(), 1) == 7
    assert await wait_for(value(), None) == 7
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.Event().wait(), 0.01)
