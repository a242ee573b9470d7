"""What a resumed attempt asks its engine for, and the seam between carried and new text:
max_tokens / min_tokens narrowed, the merge counting the whole job, a stop string that
crosses the seam ending the job there, and which features start over instead."""

from __future__ import annotations

import pytest

from producer.schema import JobRequest
from worker.engines.base import Generation
from worker.resume import RESTARTS, ResumePlan, Seam, restart_reason


def _req(**kw: object) -> JobRequest:
    return JobRequest.model_validate({"prompt": "p", "max_tokens": 10, **kw})


def test_the_rest_of_the_job_is_asked_for_and_merged_into_one_generation() -> None:
    plan = ResumePlan(_req(min_tokens=6), [1, 2, 3, 4], "abcd")
    rest = plan.narrowed()
    assert (rest.max_tokens, rest.min_tokens) == (6, 2)
    seam = Seam(plan.text, [], None, lambda: None)
    gen = plan.merge(Generation("ef", [5, 6], "length", 7, 2), seam)
    assert (gen.text, gen.token_ids, gen.completion_tokens, gen.prompt_tokens) == (
        "abcdef", [1, 2, 3, 4, 5, 6], 6, 7)


def test_a_stop_string_across_the_seam_ends_the_job_there_and_holds_back_the_text() -> None:
    out: list[str] = []
    aborted: list[bool] = []
    plan = ResumePlan(_req(stop=["END"]), [1, 2], "xxEN")
    seam = Seam(plan.text, ["END"], lambda t, ids: out.append(t), lambda: aborted.append(True))
    seam.feed("D and more", [3])
    assert aborted == [True] and out == []  # nothing past the stop reached the stream
    gen = plan.merge(Generation("D and more", [3], "abort", 1, 1, aborted=True), seam)
    assert (gen.text, gen.finish_reason, gen.aborted) == ("xx", "stop", False)


def test_new_text_without_a_stop_across_the_seam_is_released_in_order() -> None:
    out: list[str] = []
    seam = Seam("xxEN", ["END"], lambda t, ids: out.append(t), lambda: None)
    seam.feed("d", [3])
    assert out == []  # still within the longest stop string's reach
    seam.feed("o", [4])
    seam.feed("!", [5])
    seam.close()
    assert "".join(out) == "do!" and seam.cut is None


@pytest.mark.parametrize(("fields", "why"), [
    ({"response_format": {"type": "json_object"}}, RESTARTS["structured"]),
    ({"structured_outputs": {"choice": ["a", "b"]}}, RESTARTS["structured"]),
    ({"logprobs": True}, RESTARTS["logprobs"]),
    ({"seed": 7}, RESTARTS["seed"]),
    ({"frequency_penalty": 0.5}, RESTARTS["penalties"]),
    ({"stop": ["x"], "stop_token_ids": [2], "min_tokens": 3, "temperature": 0.7,
      "stream": True, "response_format": {"type": "text"}}, None),
])
def test_which_features_start_over(fields: dict[str, object], why: str | None) -> None:
    assert restart_reason(_req(**fields)) == why
