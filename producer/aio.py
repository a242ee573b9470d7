"""asyncio client (FastAPI, aiohttp, async Django views). Mirrors :class:`producer.Client`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import protocol, shards, waiting
from producer.acks import AsyncAcks
from producer.connection import connect_async, connection_kwargs
from producer.errors import JobNotFound, WaitTimeout
from producer.keys import QueueKeys
from producer.protocol import Job
from producer.redis_errors import translated
from producer.schema import JobRequest, JobResult, JobStatus
from producer.scripts import batch_args, batched, source
from producer.settings import ClientSettings
from producer.shards import LayoutCache, ShardLayout
from producer.streaming import FIRST_ID, READ_COUNT, StreamCursor, StreamEvent


class AsyncClient:
    """Same methods as :class:`producer.Client`, awaitable."""

    def __init__(
        self, redis_client: aioredis.Redis, settings: ClientSettings | None = None
    ) -> None:
        self.redis = redis_client
        self.settings = settings or ClientSettings()
        self._submit = self.redis.register_script(source("submit_job"))
        self._cancel = self.redis.register_script(source("cancel_job"))
        self._wait_jobs = self.redis.register_script(source("wait_jobs"))
        self._submit_batch = self.redis.register_script(batched("submit_job"))
        self._acks = AsyncAcks(self.redis)
        self._layouts = LayoutCache()

    @classmethod
    def from_url(cls, url: str | None = None, **settings: Any) -> AsyncClient:
        cfg = ClientSettings.model_validate({**({"redis_url": url} if url else {}), **settings})
        return cls(connect_async(cfg.redis_url), cfg)

    async def close(self) -> None:
        await self._acks.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _keys(self, queue: str | None) -> QueueKeys:
        return protocol.queue_keys(queue or self.settings.queue)

    async def layout(self, queue: str | None = None) -> ShardLayout:
        """The queue's shard layout (producer/shards.py), read at most every few seconds."""
        name = self._keys(queue).queue
        held = self._layouts.get(name)
        if held is None:
            with translated():
                held = self._layouts.put(await shards.read_layout_async(self.redis, name))
        return held

    async def _job_keys(self, job_id: str, queue: str | None) -> QueueKeys:
        """Same as :meth:`producer.Client._job_keys`."""
        layout = await self.layout(queue)
        if not layout.sharded:
            return layout.keys(0)
        routed = layout.for_job(job_id)
        with translated():
            if await self.redis.exists(routed.job(job_id)):
                return routed
            for k in layout.others(job_id):
                if await self.redis.exists(k.job(job_id)):
                    return k
        return routed

    async def submit(
        self,
        prompt: str | list[int] | None = None,
        *,
        request: JobRequest | dict[str, Any] | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Job:
        if prompt is not None:
            params["prompt"] = prompt
        with translated():
            now = None if timeout is None else protocol.server_time(await self.redis.time())
        req = protocol.build_request(request, params, timeout, now)
        layout = await self.layout(queue)
        _, (key_list, args) = shards.submit_call(layout, self.settings, req, idempotency_key)
        with translated():
            try:
                reply = await self._acked(self._submit, key_list, args)
            except ResponseError as e:
                raise protocol.refusal(e) or e from None
        return protocol.parse_submit(reply, layout.queue)

    async def submit_many(
        self, requests: Iterable[JobRequest | dict[str, Any]], *, queue: str | None = None,
        chunk: int = 1000,
    ) -> list[str]:
        layout = await self.layout(queue)
        calls = shards.submit_calls(layout, self.settings, requests)
        accepted: list[str | None] = []
        for start in range(0, len(calls), chunk):
            part = calls[start:start + chunk]
            got: list[str | None] = [None] * len(part)
            for where in shards.by_shard(part, lambda c: c[0].queue).values():
                key_list, args = batch_args([part[p][1] for p in where])
                with translated():
                    try:
                        replies = await self._acked(self._submit_batch, key_list, args)
                    except ResponseError as e:
                        raise protocol.refusal(e) or e from None
                for p, job in zip(where, protocol.parse_submit_many(
                        replies, part[where[0]][0].queue), strict=True):
                    got[p] = job
            accepted.extend(got)
            protocol.raise_if_refused(accepted, len(calls), layout.queue)
        return [i for i in accepted if i is not None]

    async def _acked(self, script: Any, key_list: list[str], args: list[Any]) -> Any:
        """Run a submit script; with ``replica_acks``, acknowledge only what replicas hold."""
        return await self._acks.run(script, key_list, args, self.settings.replica_acks,
                                    self.settings.replica_ack_timeout_ms)

    async def status(self, job_id: str, *, queue: str | None = None) -> JobStatus:
        with translated():
            raw = await self.redis.hget((await self._job_keys(job_id, queue)).job(job_id),
                                        "status")
        st = protocol.parse_status(raw)
        if st is None:
            raise JobNotFound(job_id)
        return st

    async def result(self, job_id: str, *, queue: str | None = None) -> JobResult | None:
        return await self._result(job_id, await self._job_keys(job_id, queue))

    async def _result(self, job_id: str, keys: QueueKeys) -> JobResult | None:
        with translated():
            raw = await self.redis.hget(keys.job(job_id), "result")
        return protocol.parse_result(raw)

    async def wait(
        self, job_id: str, timeout: float = 30.0, *, queue: str | None = None
    ) -> JobResult:
        keys = await self._job_keys(job_id, queue)
        with translated():
            done = await self._result(job_id, keys)  # see Client.wait
            if done is not None:
                return done
            try:
                return (await self._wait_many({keys: [job_id]}, timeout))[job_id]
            except WaitTimeout:
                raise WaitTimeout(f"job {job_id} not finished after {timeout}s") from None

    async def wait_many(self, job_ids: Iterable[str], timeout: float = 30.0, *,
                        queue: str | None = None) -> dict[str, JobResult]:
        """Same as :meth:`producer.Client.wait_many`."""
        layout = await self.layout(queue)
        ids = list(dict.fromkeys(job_ids))
        with translated():
            got = await self._wait_many(waiting.by_shard(layout, ids), timeout, layout)
        return {i: got[i] for i in ids}

    async def _wait_many(self, groups: dict[QueueKeys, list[str]], timeout: float,
                         layout: ShardLayout | None = None) -> dict[str, JobResult]:
        deadline = time.monotonic() + timeout
        w = waiting.Waiting()
        for keys, ids in groups.items():
            await self._register(w, keys, ids, timeout)
        # Not where its id routes (a layout change): look on the other shards.
        for keys, job_id in w.relocations(layout):
            await self._register(w, keys, [job_id], timeout)
        if w.unknown:
            raise w.not_found()
        for keys in list(w.pending):
            await self._drain(w, keys, deadline)
        if w.missing():
            raise w.timed_out(timeout)
        return w.results

    async def _register(self, w: waiting.Waiting, keys: QueueKeys, ids: list[str],
                        timeout: float) -> None:
        for start in range(0, len(ids), waiting.REGISTER_CHUNK):
            part = ids[start:start + waiting.REGISTER_CHUNK]
            key_list, args = waiting.register_args(keys, w.token, part, timeout)
            try:
                w.registered(keys, part, await self._wait_jobs(keys=key_list, args=args))
            except ResponseError as e:
                raise protocol.refusal(e) or e from None

    async def _drain(self, w: waiting.Waiting, keys: QueueKeys, deadline: float) -> None:
        """Same as :meth:`producer.Client._drain`."""
        key = keys.waiter(w.token)
        kwargs = connection_kwargs(self.redis)
        while w.pending.get(keys):
            left = deadline - time.monotonic()
            if left <= 0:
                w.woken(keys, await self.redis.lpop(key, len(w.pending[keys])) or [])  # type: ignore[arg-type]
                return
            try:
                reply = await self.redis.blmpop(protocol.block_slice(left, kwargs), 1, key,
                                                direction="LEFT", count=len(w.pending[keys]))
            except RedisTimeoutError:  # a late reply (busy server): the next round decides
                continue
            results = waiting.popped(reply)
            if results:
                w.woken(keys, results)
            else:  # a quiet slice: look again (a worker older than wait_jobs pushes nothing)
                await self._register(w, keys, sorted(w.pending[keys]), left)
                if w.unknown:
                    raise w.not_found()

    async def cancel(self, job_id: str, *, queue: str | None = None) -> str:
        keys = await self._job_keys(job_id, queue)
        with translated():
            try:
                reply = await self._cancel(keys=protocol.cancel_keys(keys, job_id),
                                           args=[job_id, self.settings.result_ttl])
            except ResponseError as e:
                raise protocol.refusal(e) or e from None
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def stream(self, job_id: str, *, after: str = FIRST_ID, timeout: float | None = None,
                     queue: str | None = None) -> AsyncIterator[StreamEvent]:
        """Same as :meth:`producer.Client.stream`, as an async iterator."""
        keys = await self._job_keys(job_id, queue)
        with translated():
            async for event in self._stream(job_id, after, timeout, keys):
                yield event

    async def _stream(self, job_id: str, after: str, timeout: float | None, keys: QueueKeys
                      ) -> AsyncIterator[StreamEvent]:
        cursor = StreamCursor(after)
        end = None if timeout is None else time.monotonic() + timeout
        kwargs = connection_kwargs(self.redis)
        probe = True
        nap = waiting.Nap()
        while True:
            left = protocol.BLOCK_SLICE_S if end is None else end - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"job {job_id} not finished after {timeout}s")
            block = protocol.block_slice(left, kwargs)
            if probe:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hmget(keys.job(job_id), "status", "streaming")
                pipe.exists(keys.tokens(job_id))
                (status, streaming), exists = await pipe.execute()
                how = protocol.stream_probe(job_id, status, streaming, exists)
                if how == "result":
                    for last in protocol.whole_result(
                            await self._stream_result(job_id, keys), cursor):
                        yield last
                    return
                if how == "wait":  # nothing streams (yet): a waiter registration wakes us
                    await self._nap(nap, keys, job_id, min(block, protocol.STREAM_PROBE_S))
                    continue
            reply = await self.redis.xread({keys.tokens(job_id): cursor.last_id},
                                           count=READ_COUNT, block=max(1, int(1000 * block)))
            for entry_id, fields in protocol.stream_entries(reply):
                event = cursor.feed(entry_id, fields)
                if event is not None:
                    yield event
                if cursor.ended:
                    yield await self._stream_result(job_id, keys)
                    return
            probe = not reply

    async def _nap(self, nap: waiting.Nap, keys: QueueKeys, job_id: str, block: float) -> None:
        """Same as :meth:`producer.Client._nap`."""
        if time.monotonic() >= nap.until:
            key_list, args = waiting.register_args(keys, nap.token, [job_id], waiting.NAP_S)
            if (await self._wait_jobs(keys=key_list, args=args))[0] != 1:
                return
            nap.until = time.monotonic() + waiting.NAP_S
        await self.redis.blmpop(block, 1, keys.waiter(nap.token), direction="LEFT", count=1)

    async def _stream_result(self, job_id: str, keys: QueueKeys) -> JobResult:
        res = await self._result(job_id, keys)
        if res is None:
            raise JobNotFound(job_id)
        return res
