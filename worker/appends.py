"""One write to a job's token stream and checkpoint, as ``WorkerStore.append_tokens`` takes
it."""

from __future__ import annotations

from dataclasses import dataclass

from worker.claim import ClaimedJob


@dataclass(frozen=True)
class Append:
    """One write to a job's token stream and checkpoint (``append_tokens``)."""

    row: ClaimedJob
    text: str
    ids: str
    """The new token ids, JSON ("" when only announcing the attempt)."""
    offset: int
    """The job's tokens written before this one (a resumed attempt's start at its checkpoint)."""
    tokens: int
    """Tokens in this append."""
    seq: int
    """This append's number in its attempt (1, 2, ...; 0 when only announcing)."""
    stream: bool = True
    """Write the token stream (a streaming job); False: the checkpoint only."""
    checkpoint: str = ""
    """The new ids as checkpoint items (``"id,"`` each); "" writes no checkpoint."""
    resumed_at: int | None = None
    """Tokens of the checkpoint this attempt continues from; None: it started from scratch."""
