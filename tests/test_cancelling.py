"""``cancel_and_wait``: a task that drops a cancel (as ``asyncio.wait_for`` does on Python
before 3.12 when its inner send completes, CPython gh-86296; redis-py's asyncio connection
wraps every send in it) still ends, and the caller learns it."""

from __future__ import annotations

import asyncio
import gc

from worker.cancelling import CLEANUP_S, cancel_and_wait


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
    await finished
    await asyncio.wait_for(cancel_and_wait([stubborn, plain, finished]), 10)
    assert blocked.is_set()  # the first cancel was dropped, a second one ended it
    assert stubborn.cancelled() and plain.cancelled()
    assert finished.done() and not finished.cancelled()


async def test_one_cancel_alone_leaves_such_a_task_running() -> None:
    """Why the helper exists: the single cancel other code relies on."""
    blocked = asyncio.Event()
    stubborn = asyncio.ensure_future(_drops_first_cancel(blocked))
    await asyncio.sleep(0)  # the task runs to its first await
    stubborn.cancel()
    await asyncio.wait_for(blocked.wait(), 10)
    assert not stubborn.done()
    await cancel_and_wait([stubborn])
    assert stubborn.cancelled()


async def test_a_cancelled_caller_still_ends_every_task_then_raises() -> None:
    """The caller may be cancelled while it waits (the worker stops): the tasks still end,
    none left to die with the event loop, and the caller's cancel is raised after."""
    blocked = asyncio.Event()
    stubborn = asyncio.ensure_future(_drops_first_cancel(blocked))
    await asyncio.sleep(0)  # the task runs to its first await
    caller = asyncio.ensure_future(cancel_and_wait([stubborn]))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.wait_for(asyncio.gather(caller, return_exceptions=True), 10)
    assert caller.cancelled() and stubborn.cancelled() and blocked.is_set()


async def test_errors_of_the_tasks_are_kept_and_marked_seen() -> None:
    seen: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    await _cancel_one_that_fails()
    for _ in range(3):  # a task's unretrieved error is reported when it is collected
        await asyncio.sleep(0)
        gc.collect()
    assert not [c for c in seen if "never retrieved" in str(c.get("message", ""))], seen


async def _cancel_one_that_fails() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ConnectionError("Connection closed by server.") from None

    task = asyncio.ensure_future(fails_when_cancelled())
    await asyncio.sleep(0)  # the task runs to its first await
    await cancel_and_wait([task])
    assert task.done() and not task.cancelled()  # its error is in it (not read here)


async def test_a_task_that_cleans_up_is_not_cut_short() -> None:
    """Tasks that clean up when cancelled (a job aborting its engine request) get
    ``CLEANUP_S`` before another cancel, so a cleanup shorter than that completes."""
    cleaned = asyncio.Event()

    async def cleans_up() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)  # e.g. the engine's abort of the request
            cleaned.set()
            raise

    task = asyncio.ensure_future(cleans_up())
    await asyncio.sleep(0)  # the task runs to its first await
    await asyncio.wait_for(cancel_and_wait([task], CLEANUP_S), 10)
    assert task.cancelled() and cleaned.is_set()
