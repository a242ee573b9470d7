"""Many calls of one Lua step sent as one batched script call (``producer.scripts.batched``)."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ResponseError

from producer.redis_errors import is_transient
from producer.scripts import batch_args

Call = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class Coalesced:
    """One Lua step for many jobs: the calls made within the same few event-loop turns (the
    jobs one engine step finished) go to Redis as one batched script call, each still its own
    atomic step with its own reply: a call that raises inside the batch (a record that breaks
    the step) gets its own error and the others stand. A batch Redis refuses as a whole for
    a reason that is not transient is retried call by call. Calls whose first keys hash to
    different slots go in different batches."""

    MAX_BATCH = 128
    TURNS = 2
    """Event-loop turns a batch stays open: a job's finishing write starts in a task of its
    own (shielded), one or two turns after the engine step that ended it."""

    def __init__(self, batch_script: Any, one_script: Any) -> None:
        self.batch_script, self.one_script = batch_script, one_script
        self.open: list[Call] = []
        self.flushers: set[asyncio.Task[None]] = set()

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.open.append((keys, args, fut))
        if len(self.open) == 1:
            task = asyncio.ensure_future(self._flush())
            self.flushers.add(task)
            task.add_done_callback(self.flushers.discard)
        return await fut

    async def _flush(self) -> None:
        for _ in range(self.TURNS):
            await asyncio.sleep(0)
        calls, self.open = self.open, []
        # One batch per hash slot (a sharded queue's jobs live on several: producer/shards.py);
        # the slots' batches go out together.
        by_slot: dict[int, list[Call]] = {}
        for call in calls:
            by_slot.setdefault(key_slot(call[0][0].encode()), []).append(call)
        await asyncio.gather(*(self._send_all(group) for group in by_slot.values()))

    async def _send_all(self, calls: list[Call]) -> None:
        for i in range(0, len(calls), self.MAX_BATCH):
            await self._send(calls[i:i + self.MAX_BATCH])

    async def _send(self, calls: list[Call]) -> None:
        try:
            if len(calls) == 1:
                replies = [await self.one_script(keys=calls[0][0], args=calls[0][1])]
            else:
                keys, args = batch_args([(k, a) for k, a, _ in calls])
                replies = await self.batch_script(keys=keys, args=args)
            for (_, _, fut), reply in zip(calls, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, ResponseError):  # this call's own error (scripts.py)
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        except ResponseError as e:
            if len(calls) == 1 or is_transient(e):
                _fail(calls, e)
            else:
                for call in calls:  # each caller gets its own answer
                    await self._send([call])
        except Exception as e:
            _fail(calls, e)  # each caller handles it (a lost connection: retry)
        finally:
            for _, _, fut in calls:
                fut.cancel()  # only those still waiting: the flush itself was cancelled


def _fail(calls: list[Call], e: Exception) -> None:
    for _, _, fut in calls:
        if not fut.done():
            fut.set_exception(e)
