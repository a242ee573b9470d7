"""What a worker holds: jobs in flight (in the engine, or having their result written) and
claimed jobs waiting to run alone. The pull loop adds, job tasks move and remove; upkeep and
the crash report read."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from producer.schema import JobStatus
from worker.claim import ClaimedJob


@dataclass
class InFlight:
    row: ClaimedJob
    task: asyncio.Task[None]
    started_at: float
    prompt_tokens: int = 0
    """Estimated at read time (worker/admission.py): what it costs the engine to start."""
    abort_reason: JobStatus | None = None
    deadline_handle: asyncio.TimerHandle | None = None
    publishing: bool = False
    """Out of the engine, result not yet written: holds no engine capacity."""
    lost: bool = False
    """A peer took the job over (this worker's lease lapsed): it publishes nothing."""


class Holdings:
    def __init__(self) -> None:
        self.jobs: dict[str, InFlight] = {}
        self.solo_waiting: deque[ClaimedJob] = deque()
        """Claimed jobs that must run alone, not launched yet (held in our PEL)."""
        self.solo_key: str | None = None
        """Key of the job running alone, if any."""
        self._publishing = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def __contains__(self, key: object) -> bool:
        return key in self.jobs

    def get(self, key: str) -> InFlight | None:
        return self.jobs.get(key)

    @property
    def publishing(self) -> int:
        """Jobs out of the engine whose results are still being written."""
        return self._publishing

    @property
    def in_engine(self) -> int:
        """Held jobs not yet out of the engine (including ones about to be checked)."""
        return len(self.jobs) - self._publishing

    def add(self, flight: InFlight) -> None:
        self.jobs[flight.row.key] = flight

    def out_of_engine(self, flight: InFlight) -> bool:
        """The job's engine part is over (its slot is free); False if it already was."""
        if flight.publishing:
            return False
        flight.publishing = True
        self._publishing += 1
        return True

    def remove(self, key: str) -> None:
        flight = self.jobs.pop(key, None)
        if flight is not None:
            if flight.deadline_handle is not None:
                flight.deadline_handle.cancel()
            if flight.publishing:
                self._publishing -= 1
        if self.solo_key == key:
            self.solo_key = None

    def holds(self, key: str) -> bool:
        """In flight, or waiting to run alone."""
        return key in self.jobs or any(r.key == key for r in self.solo_waiting)

    def rows(self) -> list[ClaimedJob]:
        """Every entry this worker holds: in flight, and solo rows waiting their turn."""
        return [f.row for f in self.jobs.values()] + list(self.solo_waiting)

    def inside_engine(self) -> list[ClaimedJob]:
        """Jobs that went into the engine and have not left it."""
        return [f.row for f in self.jobs.values()
                if not f.publishing and f.row.disposition.runs]

    def newest_first_prompt_tokens(self) -> Iterator[int]:
        """Prompt tokens of the jobs not out of the engine, newest first (admission)."""
        return (f.prompt_tokens for f in reversed(self.jobs.values()) if not f.publishing)

    def take_waiting(self, key: str) -> ClaimedJob | None:
        """Remove and return the job waiting to run alone under ``key``, if any."""
        for row in self.solo_waiting:
            if row.key == key:
                self.solo_waiting.remove(row)
                return row
        return None
