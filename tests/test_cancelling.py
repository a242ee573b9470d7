"""``cancel_and_wait``: a task that drops a cancel (as ``asyncio.wait_for`` does on Python
before 3.12 when its inner send completes, CPython gh-86296; redis-py's asyncio connection
wraps every send in it) still ends, and the caller learns it."""

from __future__ import annotations

import asyncio
import gc

from worker.cancelling import cancel_and_wait


async def _drops_first_cancel(blocked: asyncio.Event) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        pass  # the cancel is lost here; the task goes on into its next command
    blocked.set()
    await asyncio.sleep(30)  # e.g. a blocking XREAD


async def test_a_task_that_drops_a_cancel_still_ends() -> None:
    blocked = asyncio.Event()
    stubborn = asyncio.ensure_future(_drops_first_cancel(blocked))
    plain = asyncio.ensure_future(asyncio.sleep(30))
    finished = asyncio.ensure_future(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(cancel_and_wait([stubborn, plain, finished]), 10)
    assert blocked.is_set()  # the first cancel was dropped, a second one ended it
    assert stubborn.cancelled() and plain.cancelled()
    assert finished.done() and not finished.cancelled()


async def test_one_cancel_alone_leaves_such_a_task_running() -> None:
    """Why the helper exists: the single cancel other code relies on."""
    blocked = asyncio.Event()
    stubborn = asyncio.ensure_future(_drops_first_cancel(blocked))
    await asyncio.sleep(0.01)
    stubborn.cancel()
    await asyncio.wait_for(blocked.wait(), 10)
    assert not stubborn.done()
    await cancel_and_wait([stubborn])
    assert stubborn.cancelled()


async def test_an_error_of_a_task_left_behind_is_retrieved() -> None:
    """The caller may be cancelled while it waits: a task that then fails is not reported
    as an exception nobody retrieved."""
    seen: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    ended = asyncio.Event()
    await _give_up_on_a_task_that_fails_later(ended)
    await asyncio.wait_for(ended.wait(), 10)
    for _ in range(3):  # a task's unretrieved error is reported when it is collected
        await asyncio.sleep(0.01)
        gc.collect()
    assert not [c for c in seen if "never retrieved" in str(c.get("message", ""))], seen


async def _give_up_on_a_task_that_fails_later(ended: asyncio.Event) -> None:
    gate = asyncio.Event()

    async def fails_after_cancel() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        await gate.wait()
        ended.set()
        raise ConnectionError("Connection closed by server.")

    task = asyncio.ensure_future(fails_after_cancel())
    await asyncio.sleep(0.01)
    waiter = asyncio.ensure_future(cancel_and_wait([task]))
    await asyncio.sleep(0)
    waiter.cancel()  # the caller gives up (the worker stops) after one cancel
    await asyncio.gather(waiter, return_exceptions=True)
    gate.set()
