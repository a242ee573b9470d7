"""A claimed job, as it crosses from Lua: decoded here, and only here.

``start_jobs`` and ``reclaim_jobs`` (``producer/lua/includes/claim.lua``) return each claim as
flat field/value pairs; :func:`decode` turns them into a frozen :class:`ClaimedJob` whose
:class:`Disposition` says what the worker does with it. A reply that lacks a field or names an
unknown disposition is a bug in the scripts: it raises, it is never guessed at.
:class:`LostClaims` tracks claims that may have run in Redis with their reply lost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from redis.exceptions import ResponseError


class Disposition(str, Enum):
    """What the worker does with a claimed entry (decided in Lua, at claim time)."""

    run = "run"
    run_alone = "run_alone"
    """Run it with nothing else in the engine (culprit isolation; includes/poison.lua)."""
    cancelled = "cancelled"
    """Cancelled before it ran: publish that."""
    expired = "expired"
    """Its deadline passed before it ran: publish that."""
    malformed = "malformed"
    """No usable job id: the entry goes to the dead-letter stream (there is no job)."""
    poisoned = "poisoned"
    """Past the poison rule's limits: fail it and dead-letter it."""

    @property
    def runs(self) -> bool:
        """The job goes into the engine."""
        return self in (Disposition.run, Disposition.run_alone)


class ClaimError(ValueError):
    """A script's claim reply is not what worker/claim.py decodes (a protocol bug)."""


@dataclass(frozen=True)
class ClaimedJob:
    """One delivered stream entry, now held by this worker."""

    stream: str
    entry: str
    job_id: str
    """"" for a malformed entry."""
    body: str
    attempts: int
    """Times a worker started the job, this start included."""
    deliveries: int
    """Times the entry was delivered (this one included)."""
    disposition: Disposition
    queued_at: float

    @property
    def key(self) -> str:
        """The worker's key for what it holds: the job id, or the entry for one without."""
        return self.job_id or f"entry:{self.stream}:{self.entry}"

    def becomes(self, disposition: Disposition) -> ClaimedJob:
        """The same claim, now to be handled as ``disposition`` (a cancel heard meanwhile)."""
        return replace(self, disposition=disposition)


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _body(x: Any) -> str:
    # A body that is not UTF-8 keeps its bytes (surrogate-escaped): its job fails as
    # ``undecodable`` instead of running on replacement characters.
    return x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else str(x)


def decode_one(flat: list[Any]) -> ClaimedJob:
    if len(flat) % 2:
        raise ClaimError(f"odd field/value list of {len(flat)} items")
    f = {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    try:
        return ClaimedJob(
            stream=_s(f["stream"]), entry=_s(f["entry"]), job_id=_s(f["job"]),
            body=_body(f["body"]), attempts=int(f["attempts"]), deliveries=int(f["deliveries"]),
            disposition=Disposition(_s(f["disposition"])), queued_at=float(f["queued_at"]))
    except KeyError as e:
        raise ClaimError(f"claim without field {e.args[0]!r}: {sorted(f)}") from None
    except ValueError as e:
        raise ClaimError(f"bad claim value ({e}) in fields {sorted(f)}") from None


def decode(raw: list[Any]) -> list[ClaimedJob]:
    """A script's reply (a list of claims) as typed records."""
    return [decode_one(flat) for flat in raw]


@dataclass
class LostClaims:
    """Whether a claim of ours (``start_jobs``, ``reclaim_jobs``) may have run in Redis with
    its reply lost (a timeout, a dropped connection): its entries are then pending to this
    worker, which does not know them. Sweeps for them (``reclaim_jobs`` with ``own``: entries
    idle ``idle_s``, as many as there are free slots) go on until one that begins ``idle_s``
    after the first ended takes nothing: the lost claim ran before that first sweep's reply
    came back (it reached Redis first), so by then its entries have been idle ``idle_s``,
    while those this worker holds were renewed just before each sweep. Sweeps are at least
    ``idle_s / 2`` apart: each renews every held entry first."""

    idle_s: float = 0.5
    due: bool = False
    _first_done: float | None = None
    _last_done: float = float("-inf")

    def ready(self, now: float) -> bool:
        """A sweep is due now."""
        return self.due and now - self._last_done >= self.idle_s / 2

    def failed(self, e: BaseException) -> None:
        """A claim call failed with ``e``: an error reply ran nothing, any other failure (a
        timeout, a dropped connection) may have run it."""
        if not isinstance(e, ResponseError):
            self.due = True
            self._first_done = None

    def swept(self, started: float, done: float, took: int) -> None:
        """A sweep that began at ``started`` and ended at ``done`` took ``took`` entries."""
        self._last_done = done
        if self._first_done is None:
            self._first_done = done
        elif started >= self._first_done + self.idle_s and not took:
            self.due = False
