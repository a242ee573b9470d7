"""Write streaming jobs' output to their token streams, coalesced.

The engine hands over new text every step for every streaming job; writing each one would be
one Redis command per token per job. Instead every job collects its deltas and one writer
task sends what all jobs collected once per ``stream_interval_ms``, in one pipelined round
trip, one ``append_tokens`` step per job. One writer means a job's entries reach Redis in the
order they were generated; :meth:`TokenStreamer.drain` lets the feeder write a job's last
delta before its result (whose step adds the ``end`` entry).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from worker.claim import ClaimedJob
from worker.store import REDIS_ERRORS, WorkerStore

log = logging.getLogger("slotfill.worker")

RETRY_MAX_S = 2.0


@dataclass
class _Sink:
    row: ClaimedJob
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    announced: bool = False
    """The attempt's ``start`` entry has been written."""
    offset: int = 0
    """Tokens of this attempt already handed to the writer."""
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False

    @property
    def pending(self) -> bool:
        return bool(self.ids or self.text) or not self.announced


@dataclass
class StreamCounters:
    appends: int = 0
    """``append_tokens`` steps that wrote (start and delta entries)."""
    fenced: int = 0
    """Appends refused because the job had moved on (reclaimed elsewhere, or ended)."""
    flushes: int = 0
    """Round trips of the writer."""


class TokenStreamer:
    def __init__(self, store: WorkerStore, interval_ms: float, max_entries: int,
                 ttl_s: int) -> None:
        self.store = store
        self.interval_s = interval_ms / 1000
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.counters = StreamCounters()
        self._sinks: dict[str, _Sink] = {}
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()

    def open(self, row: ClaimedJob) -> None:
        """Start streaming ``row``'s attempt (announced to readers with the next write)."""
        self._sinks[row.key] = _Sink(row)
        self._wake.set()

    def add(self, key: str, text: str, token_ids: list[int]) -> None:
        """New output of a streaming job (called from the engine's output loop)."""
        sink = self._sinks.get(key)
        if sink is None or not (text or token_ids):
            return
        sink.text.append(text)
        sink.ids.extend(token_ids)
        self._wake.set()

    async def drain(self, key: str) -> None:
        """Return once everything ``key`` produced is written (or fenced off), then forget
        it. Its result may be published after this without overtaking its last delta."""
        sink = self._sinks.get(key)
        if sink is None:
            return
        sink.closing = True
        self._wake.set()
        self._urgent.set()
        try:
            await sink.drained.wait()
        finally:
            self._sinks.pop(key, None)

    def discard(self, key: str) -> None:
        """Forget a job without writing more (the attempt ends without a result here)."""
        sink = self._sinks.pop(key, None)
        if sink is not None:
            sink.drained.set()

    async def run(self) -> None:
        """The writer: one round trip per interval while any job has unwritten output."""
        delay = 0.05
        while True:
            await self._wake.wait()
            if self.interval_s > 0 and not self._urgent.is_set():
                try:  # coalesce: let the engine produce a few more steps' worth
                    await asyncio.wait_for(self._urgent.wait(), self.interval_s)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            self._urgent.clear()
            try:
                await self._flush()
                delay = 0.05
            except REDIS_ERRORS as e:
                log.warning("token stream write failed (%s); retrying in %.2fs", e, delay)
                self._wake.set()
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
            except Exception:
                # A bug here must not hold results back: jobs waiting in ``drain`` would
                # never publish. Their streams lose the unwritten part; results keep it all.
                log.exception("token stream writer failed; dropping unwritten deltas")
                self._give_up()

    def _give_up(self) -> None:
        for sink in self._sinks.values():
            sink.text.clear()
            sink.ids.clear()
            sink.announced = True
            if sink.closing:
                sink.drained.set()

    async def _flush(self) -> None:
        batch = [(s, len(s.text), len(s.ids)) for s in self._sinks.values() if s.pending]
        if batch:
            appends = [(s.row, "".join(s.text[:n_text]),
                        json.dumps(s.ids[:n_ids]) if n_ids else "", s.offset)
                       for s, n_text, n_ids in batch]
            # Taken off the buffers only once written: a failed round trip resends them.
            written = await self.store.append_tokens(appends, self.max_entries, self.ttl_s)
            self.counters.flushes += 1
            for (s, n_text, n_ids), ok in zip(batch, written, strict=True):
                if ok:
                    self.counters.appends += 1
                else:
                    self.counters.fenced += 1
                s.announced = True
                s.offset += n_ids
                del s.text[:n_text]
                del s.ids[:n_ids]
        for s in self._sinks.values():
            if s.closing:
                if s.pending:
                    self._urgent.set()  # output that arrived during the write
                    self._wake.set()
                else:
                    s.drained.set()
