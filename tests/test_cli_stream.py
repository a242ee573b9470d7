"""What ``slotfill submit --stream`` / ``slotfill stream`` print for the deltas a worker
writes, including the ones without text (no Redis needed: the client's stream is given)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest

from producer import Client, JobResult, JobStatus, Restarted, StreamEvent, TokenDelta
from slotfill.cli.jobs import _follow


class _Stream:
    def __init__(self, events: list[StreamEvent]) -> None:
        self.events = events

    def stream(self, job_id: str, after: str, timeout: float) -> Iterator[StreamEvent]:
        yield from self.events


def _printed(events: list[StreamEvent], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = _follow(cast(Client, _Stream(events)), "j", None, 5.0)
    return code, capsys.readouterr().out


def _delta(text: str, ids: list[int], n: int, attempt: int = 1) -> TokenDelta:
    return TokenDelta(text, ids, f"{n}-0", attempt, n)


def test_a_held_back_character_prints_as_text_not_as_its_token_ids(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A character split over byte tokens: vLLM's detokenizer gives its first byte's token
    no text, and the whole character with the next delta (seen in the suite: a stray
    ``227 `` printed before the text)."""
    done = JobResult(id="j", status=JobStatus.succeeded, text="\u3083 ok",
                     token_ids=[227, 131, 9, 10])
    code, out = _printed([_delta("", [227], 1), _delta("\u3083", [131], 2),
                          _delta(" ok", [9, 10], 3), done], capsys)
    assert (code, out) == (0, "\u3083 ok\n")


def test_a_worker_without_a_tokenizer_prints_its_token_ids(
        capsys: pytest.CaptureFixture[str]) -> None:
    done = JobResult(id="j", status=JobStatus.succeeded, token_ids=[5, 6, 7])
    code, out = _printed([_delta("", [5], 1), _delta("", [6, 7], 2), done], capsys)
    assert (code, out) == (0, "5 6 7 \n")


def test_ids_of_a_restarted_attempt_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    done = JobResult(id="j", status=JobStatus.failed, token_ids=[8])
    code, out = _printed([_delta("", [5], 1), Restarted(2, "2-0", "w2"),
                          _delta("", [8], 1, attempt=2), done], capsys)
    assert (code, out) == (1, "8 \n")
