"""Blocking client for backends (Django, Flask, Celery tasks, scripts)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import protocol, queue_config, shards, waiting
from producer.acks import run_acked
from producer.connection import connect, connection_kwargs
from producer.errors import InvalidRequest, JobNotFound, WaitTimeout
from producer.keys import QueueKeys
from producer.protocol import Job
from producer.redis_errors import translated
from producer.schema import JobRequest, JobResult, JobStatus
from producer.scripts import batch_args, batched, source
from producer.settings import ClientSettings
from producer.shards import LayoutCache, ShardLayout
from producer.streaming import FIRST_ID, READ_COUNT, StreamCursor, StreamEvent


class Client:
    """Submit jobs and read their results.

    ``Client.from_url("redis://localhost:6379/0")``; every method takes ``queue=`` to use a
    queue other than the client's default.
    """

    def __init__(self, redis_client: redis.Redis, settings: ClientSettings | None = None) -> None:
        self.redis = redis_client
        self.settings = settings or ClientSettings()
        self._submit = self.redis.register_script(source("submit_job"))
        self._cancel = self.redis.register_script(source("cancel_job"))
        self._wait_jobs = self.redis.register_script(source("wait_jobs"))
        self._submit_batch = self.redis.register_script(batched("submit_job"))
        self._layouts = LayoutCache()

    @classmethod
    def from_url(cls, url: str | None = None, **settings: Any) -> Client:
        cfg = ClientSettings.model_validate({**({"redis_url": url} if url else {}), **settings})
        with translated():  # a cluster client reads the slot map here already
            return cls(connect(cfg.redis_url), cfg)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _keys(self, queue: str | None) -> QueueKeys:
        return protocol.queue_keys(queue or self.settings.queue)

    def layout(self, queue: str | None = None) -> ShardLayout:
        """The queue's shard layout (producer/shards.py), read at most every few seconds."""
        name = self._keys(queue).queue
        held = self._layouts.get(name)
        if held is None:
            with translated():
                held = self._layouts.put(shards.read_layout(self.redis, name))
        return held

    def _job_keys(self, job_id: str, queue: str | None) -> QueueKeys:
        """The keys of the shard holding ``job_id`` (no round trip for an unsharded queue;
        one ``EXISTS``, more only when the job is not where its id routes)."""
        layout = self.layout(queue)
        if not layout.sharded:
            return layout.keys(0)
        routed = layout.for_job(job_id)
        with translated():
            if self.redis.exists(routed.job(job_id)):
                return routed
            return next((k for k in layout.others(job_id) if self.redis.exists(k.job(job_id))),
                        routed)

    def submit(
        self,
        prompt: str | list[int] | None = None,
        *,
        request: JobRequest | dict[str, Any] | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Job:
        """Validate and enqueue one job. ``timeout``: seconds from now to its deadline.

        Raises InvalidRequest (caller's fault), QueueFull or RedisUnavailable (retry later).
        """
        if prompt is not None:
            params["prompt"] = prompt
        with translated():
            now = None if timeout is None else protocol.server_time(self.redis.time())
        req = protocol.build_request(request, params, timeout, now)
        layout = self.layout(queue)
        _, (key_list, args) = shards.submit_call(layout, self.settings, req, idempotency_key)
        with translated():
            try:
                reply = self._acked(self._submit, key_list, args)
            except ResponseError as e:
                raise protocol.refusal(e) or e from None
        return protocol.parse_submit(reply, layout.queue)

    def configure_queue(self, *, max_pending: int | None = None,
                        max_payload_bytes: int | None = None, shards: int | None = None,
                        queue: str | None = None) -> dict[str, int]:
        """Set the queue's limits in Redis, where the submit step reads them (an operator's
        act; callers of ``submit_job`` cannot pass their own cap), and with ``shards`` split
        it into that many shards (producer/shards.py; limits then apply to each shard).
        Returns what was set."""
        keys = self._keys(queue)
        try:
            with translated():
                out = queue_config.configure(self.redis, keys, max_pending, max_payload_bytes,
                                             shards)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        self._layouts.forget(keys.queue)
        return out

    def submit_many(
        self, requests: Iterable[JobRequest | dict[str, Any]], *, queue: str | None = None,
        chunk: int = 1000,
    ) -> list[str]:
        """Validate all, then enqueue in chunks, one script call each. Returns the job ids
        in order. RedisUnavailable mid-way: the chunks before it are stored, the one in
        flight may be.

        If the queue fills, raises QueueFull whose ``accepted`` lists, in input order, each
        request's job id or None where it was refused; no chunk after that one is sent.
        """
        layout = self.layout(queue)
        calls = shards.submit_calls(layout, self.settings, requests)
        accepted: list[str | None] = []
        for start in range(0, len(calls), chunk):
            accepted.extend(shards.submit_by_shard(calls[start:start + chunk], self._send))
            protocol.raise_if_refused(accepted, len(calls), layout.queue)
        return [i for i in accepted if i is not None]

    def _send(self, shard: QueueKeys, calls: list[shards.Call]) -> list[str | None]:
        """One batched submit of ``calls``, all to ``shard``."""
        with translated():
            try:
                replies = self._acked(self._submit_batch, *batch_args(calls))
            except ResponseError as e:
                raise protocol.refusal(e) or e from None
        return protocol.parse_submit_many(replies, shard.queue)

    def _acked(self, script: Any, key_list: list[str], args: list[Any]) -> Any:
        """Run a submit script; with ``replica_acks``, acknowledge only what replicas hold."""
        return run_acked(self.redis, script, key_list, args, self.settings.replica_acks,
                         self.settings.replica_ack_timeout_ms)

    def status(self, job_id: str, *, queue: str | None = None) -> JobStatus:
        with translated():
            raw = self.redis.hget(self._job_keys(job_id, queue).job(job_id), "status")
        st = protocol.parse_status(raw)
        if st is None:
            raise JobNotFound(job_id)
        return st

    def result(self, job_id: str, *, queue: str | None = None) -> JobResult | None:
        """The result if the job is finished, else None. Never blocks."""
        return self._result(job_id, self._job_keys(job_id, queue))

    def _result(self, job_id: str, keys: QueueKeys) -> JobResult | None:
        with translated():
            raw = self.redis.hget(keys.job(job_id), "result")
        return protocol.parse_result(raw)

    def wait(self, job_id: str, timeout: float = 30.0, *, queue: str | None = None) -> JobResult:
        """Block until the job is finished (no polling: see :meth:`wait_many`)."""
        keys = self._job_keys(job_id, queue)
        with translated():
            # A plain read first: a job that already ended (often, reading results behind
            # the workers) costs Redis one HGET, not a script call.
            done = self._result(job_id, keys)
            if done is not None:
                return done
            try:
                return self._wait_many({keys: [job_id]}, timeout)[job_id]
            except WaitTimeout:
                raise WaitTimeout(f"job {job_id} not finished after {timeout}s") from None

    def wait_many(self, job_ids: Iterable[str], timeout: float = 30.0, *,
                  queue: str | None = None) -> dict[str, JobResult]:
        """Block until every job of ``job_ids`` is finished; their results by id, in input
        order. A few round trips per shard, not per job: one ``wait_jobs`` step returns the
        results already there and registers a waiter on the rest, whose ends are then
        popped off one waiter list (their terminal steps push the results there).

        Raises JobNotFound (its message lists the unknown ids) before blocking when any id
        has no record, WaitTimeout (``missing``: the ids not finished, ``results``: those
        that were) when ``timeout`` runs out."""
        layout = self.layout(queue)
        ids = list(dict.fromkeys(job_ids))
        with translated():
            got = self._wait_many(waiting.by_shard(layout, ids), timeout, layout)
        return {i: got[i] for i in ids}

    def _wait_many(self, groups: dict[QueueKeys, list[str]], timeout: float,
                   layout: ShardLayout | None = None) -> dict[str, JobResult]:
        deadline = time.monotonic() + timeout
        w = waiting.Waiting()
        for keys, ids in groups.items():
            self._register(w, keys, ids, timeout)
        # Not where its id routes (a layout change): look on the other shards.
        for keys, job_id in w.relocations(layout):
            self._register(w, keys, [job_id], timeout)
        if w.unknown:
            raise w.not_found()
        for keys in list(w.pending):
            self._drain(w, keys, deadline)
        if w.missing():
            raise w.timed_out(timeout)
        return w.results

    def _register(self, w: waiting.Waiting, keys: QueueKeys, ids: list[str],
                  timeout: float) -> None:
        for start in range(0, len(ids), waiting.REGISTER_CHUNK):
            part = ids[start:start + waiting.REGISTER_CHUNK]
            key_list, args = waiting.register_args(keys, w.token, part, timeout)
            try:
                w.registered(keys, part, self._wait_jobs(keys=key_list, args=args))
            except ResponseError as e:
                raise protocol.refusal(e) or e from None

    def _drain(self, w: waiting.Waiting, keys: QueueKeys, deadline: float) -> None:
        """Pop the results of ``keys``' registered jobs as they end, until none is left or the
        deadline passes (then one last look without blocking)."""
        key = keys.waiter(w.token)
        kwargs = connection_kwargs(self.redis)
        while w.pending.get(keys):
            left = deadline - time.monotonic()
            if left <= 0:
                w.woken(keys, self.redis.lpop(key, len(w.pending[keys])) or [])  # type: ignore[arg-type]
                return
            try:
                reply = self.redis.blmpop(protocol.block_slice(left, kwargs), 1, key,
                                          direction="LEFT", count=len(w.pending[keys]))
            except RedisTimeoutError:  # a late reply (busy server): the next round decides
                continue
            results = waiting.popped(reply)
            if results:
                w.woken(keys, results)
            else:  # a quiet slice: look again (a worker older than wait_jobs pushes nothing)
                self._register(w, keys, sorted(w.pending[keys]), left)
                if w.unknown:
                    raise w.not_found()

    def cancel(self, job_id: str, *, queue: str | None = None) -> str:
        """Cancel a job: ``cancelled`` (was queued), ``requested`` (running: the worker aborts
        it within one engine step), ``finished`` (too late) or ``unknown``."""
        keys = self._job_keys(job_id, queue)
        with translated():
            try:
                reply = self._cancel(keys=protocol.cancel_keys(keys, job_id),
                                     args=[job_id, self.settings.result_ttl])
            except ResponseError as e:
                raise protocol.refusal(e) or e from None
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def stream(self, job_id: str, *, after: str = FIRST_ID, timeout: float | None = None,
               queue: str | None = None) -> Iterator[StreamEvent]:
        """Follow a job's output as it is generated: ``TokenDelta`` events, ``Restarted``
        when the job starts over on another worker (drop the text so far), ``Moved`` when it
        continues on another worker (keep it: only new text follows), and last the
        ``JobResult``. Resume after a disconnect with ``after=<entry_id of the last event>``:
        nothing is lost or repeated. Any number of readers may follow one job. A job that
        was not submitted with ``stream=True`` yields its whole text once it ends.
        ``timeout``: seconds before WaitTimeout (None: until the job ends). A Redis outage
        raises RedisUnavailable: resume with ``after=`` once it is back."""
        keys = self._job_keys(job_id, queue)
        with translated():
            yield from self._stream(job_id, after, timeout, keys)

    def _stream(self, job_id: str, after: str, timeout: float | None, keys: QueueKeys
                ) -> Iterator[StreamEvent]:
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
                (status, streaming), exists = pipe.execute()
                how = protocol.stream_probe(job_id, status, streaming, exists)
                if how == "result":
                    yield from protocol.whole_result(self._stream_result(job_id, keys), cursor)
                    return
                if how == "wait":  # nothing streams (yet): a waiter registration wakes us
                    self._nap(nap, keys, job_id, min(block, protocol.STREAM_PROBE_S))
                    continue
            reply = self.redis.xread({keys.tokens(job_id): cursor.last_id}, count=READ_COUNT,
                                     block=max(1, int(1000 * block)))
            for entry_id, fields in protocol.stream_entries(reply):
                event = cursor.feed(entry_id, fields)
                if event is not None:
                    yield event
                if cursor.ended:
                    yield self._stream_result(job_id, keys)
                    return
            probe = not reply

    def _nap(self, nap: waiting.Nap, keys: QueueKeys, job_id: str, block: float) -> None:
        """Block until the job ends or ``block`` passes (registered once per ``NAP_S``)."""
        if time.monotonic() >= nap.until:
            key_list, args = waiting.register_args(keys, nap.token, [job_id], waiting.NAP_S)
            if self._wait_jobs(keys=key_list, args=args)[0] != 1:
                return  # it ended (or is gone) meanwhile: the next probe reads which
            nap.until = time.monotonic() + waiting.NAP_S
        self.redis.blmpop(block, 1, keys.waiter(nap.token), direction="LEFT", count=1)

    def _stream_result(self, job_id: str, keys: QueueKeys) -> JobResult:
        res = self._result(job_id, keys)
        if res is None:
            raise JobNotFound(job_id)
        return res
