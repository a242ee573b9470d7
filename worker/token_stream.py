"""Write running jobs' output to their token streams and checkpoints, coalesced.

The engine hands over new text every step for every streaming job; writing each one would be
one Redis command per token per job. Instead every job collects its deltas and one writer
task sends what all jobs collected once per ``stream_interval_ms``, in one pipelined round
trip, one ``append_tokens`` step per job. The same step adds the new token ids to the job's
checkpoint (what a peer resumes from); a job that does not stream is only checkpointed, in
the same round trip, at most once per ``checkpoint_interval_ms``. One writer means a job's
entries reach Redis in the order they were generated; :meth:`TokenStreamer.drain` lets the
feeder write a job's last delta before its result (whose step adds the ``end`` entry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from worker.claim import ClaimedJob
from worker.store import REDIS_ERRORS, Append, WorkerStore

log = logging.getLogger("slotfill.worker")

RETRY_MAX_S = 2.0


@dataclass
class _Sink:
    row: ClaimedJob
    stream: bool = True
    """Write the token stream; False: a job that only checkpoints."""
    checkpoint: bool = True
    resumed_at: int | None = None
    """Tokens of the checkpoint the attempt continues from (None: from scratch)."""
    due_s: float = 0.0
    """Checkpoint only: minimum time between writes."""
    last_sent: float = field(default_factory=time.monotonic)
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    announced: bool = False
    """The attempt's ``start`` entry has been written."""
    offset: int = 0
    """The job's tokens written (from the resumed-at point on a resumed attempt)."""
    seq: int = 0
    """Deltas of this attempt written to its stream."""
    sending: Append | None = None
    """The append on its way: a failed round trip (the reply may be lost after the write
    landed) resends exactly it, so the step can tell a retry from new output."""
    stopped: bool = False
    """Fenced off or refused: nothing more is written for this attempt."""
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False

    def __post_init__(self) -> None:
        self.offset = self.resumed_at or 0

    @property
    def pending(self) -> bool:
        if self.stopped:
            return False
        if self.sending is not None:
            return True
        if not self.stream:  # checkpoint only: new ids, once per interval
            return bool(self.ids) and time.monotonic() - self.last_sent >= self.due_s
        return bool(self.ids or self.text) or not self.announced

    def next_append(self) -> Append:
        """What to send now: the unacknowledged append again, or the output collected since."""
        if self.sending is None:
            ids = json.dumps(self.ids) if self.ids and self.stream else ""
            items = "".join(f"{t}," for t in self.ids) if self.checkpoint else ""
            seq = self.seq + 1 if (self.text or self.ids) else 0
            self.sending = Append(self.row, "".join(self.text) if self.stream else "", ids,
                                  self.offset, len(self.ids), seq, self.stream, items,
                                  self.resumed_at)
            self.text.clear()
            self.ids.clear()
            self.last_sent = time.monotonic()
        return self.sending

    def acknowledged(self, code: int) -> None:
        a = self.sending
        assert a is not None
        self.sending = None
        self.announced = True
        if code == 1:
            self.offset += a.tokens
            self.seq = max(self.seq, a.seq)
        else:
            self.stopped = True
            self.text.clear()
            self.ids.clear()


@dataclass
class StreamCounters:
    appends: int = 0
    """``append_tokens`` steps that wrote (start and delta entries), or found their write
    already there (a retry after a lost reply)."""
    fenced: int = 0
    """Appends refused because the job had moved on (reclaimed elsewhere, or ended)."""
    checkpointed: int = 0
    """Token ids written to checkpoints."""
    gaps: int = 0
    """Appends refused because they did not follow what the stream held (a bug)."""
    flushes: int = 0
    """Round trips of the writer."""


class TokenStreamer:
    def __init__(self, store: WorkerStore, interval_ms: float, max_entries: int,
                 ttl_s: int, checkpoint_interval_ms: float = 0.0) -> None:
        self.store = store
        self.interval_s = interval_ms / 1000
        self.checkpoint_s = checkpoint_interval_ms / 1000
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.counters = StreamCounters()
        self._sinks: dict[str, _Sink] = {}
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()

    @property
    def checkpoints(self) -> bool:
        return self.checkpoint_s > 0

    def open(self, row: ClaimedJob, stream: bool, resumed_at: int | None = None) -> bool:
        """Start writing ``row``'s attempt: its token stream (``stream``; announced to readers
        with the next write) and, where checkpoints are on, its checkpoint. ``resumed_at``:
        the checkpoint's length the attempt continues from. False: nothing to write."""
        if not (stream or self.checkpoints):
            return False
        self._sinks[row.key] = _Sink(row, stream, self.checkpoints, resumed_at,
                                     self.checkpoint_s)
        self._wake.set()
        return True

    def add(self, key: str, text: str, token_ids: list[int]) -> None:
        """New output of a streaming job (called from the engine's output loop)."""
        sink = self._sinks.get(key)
        if sink is None or not (text or token_ids):
            return
        first = sink.stream and sink.seq == 0 and sink.sending is None and not sink.ids
        sink.text.append(text)
        sink.ids.extend(token_ids)
        self._wake.set()
        if first:  # time to first token: the attempt's first delta does not wait the interval
            self._urgent.set()

    async def drain(self, key: str) -> None:
        """Return once everything ``key`` produced is written (or fenced off), then forget
        it. Its result may be published after this without overtaking its last delta."""
        sink = self._sinks.get(key)
        if sink is None:
            return
        if not sink.stream:  # its result supersedes the checkpoint
            self._sinks.pop(key, None)
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
            sink.sending = None
            sink.stopped = True
            if sink.closing:
                sink.drained.set()

    async def _flush(self) -> None:
        batch = [s for s in self._sinks.values() if s.pending]
        if batch:
            appends = [s.next_append() for s in batch]
            codes = await self.store.append_tokens(appends, self.max_entries, self.ttl_s,
                                                   self.ttl_s)
            self.counters.flushes += 1
            for s, a, code in zip(batch, appends, codes, strict=True):
                if code == 1:
                    self.counters.appends += 1
                    self.counters.checkpointed += a.tokens if a.checkpoint else 0
                elif code == 0:
                    self.counters.fenced += 1
                else:
                    self.counters.gaps += 1
                    log.error("job %s: token stream append refused (offset %d, delta %d "
                              "does not follow the stream)", s.row.job_id, s.offset, s.seq + 1)
                s.acknowledged(code)
        for s in self._sinks.values():
            if s.closing:
                if s.pending:
                    self._urgent.set()  # output that arrived during the write
                    self._wake.set()
                else:
                    s.drained.set()
