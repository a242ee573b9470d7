"""The checkpoint peeker's logic on stand-ins for vLLM's output processor state: each
registered request's new ids go to its sink once; a state without ids turns peeking off."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from worker.engines.vllm_peek import SLICES, CheckpointPeeker, peekable

LONG = 3600.0
"""An interval the background poll never reaches here: the tests poll by hand."""


def _llm(states: dict[str, Any]) -> Any:
    return SimpleNamespace(output_processor=SimpleNamespace(request_states=states))


def _state(ids: list[int] | None, external: str | None = None) -> Any:
    return SimpleNamespace(external_req_id=external,
                           detokenizer=SimpleNamespace(output_token_ids=ids))


async def test_new_ids_reach_the_sink_once_keyed_by_our_request_id() -> None:
    ids_a: list[int] = [1, 2]
    # Newer vLLM keys its states by an internal id and keeps ours as external_req_id.
    states = {"internal-a": _state(ids_a, external="a"), "b": _state([9])}
    peek = CheckpointPeeker(_llm(states), LONG)
    got: dict[str, list[tuple[str, list[int]]]] = {"a": [], "b": []}
    for key in ("a", "b"):
        peek.add(key, lambda t, i, key=key: got[key].append((t, list(i))))
    peek.add("c", lambda t, i: got.setdefault("c", []).append((t, list(i))))  # not in yet
    peek.poll()
    ids_a.extend([3, 4])
    peek.poll()
    peek.poll()  # nothing new
    assert got == {"a": [("", [1, 2]), ("", [3, 4])], "b": [("", [9])]}
    peek.remove("a")
    ids_a.append(5)
    peek.poll()
    assert got["a"] == [("", [1, 2]), ("", [3, 4])]
    peek.close()


async def test_a_state_without_ids_turns_peeking_off_and_no_processor_means_none() -> None:
    peek = CheckpointPeeker(_llm({"a": SimpleNamespace(detokenizer=None)}), LONG)
    assert peek.enabled
    peek.add("a", lambda t, i: None)
    peek.poll()
    assert not peek.enabled
    peek.close()
    assert not peekable(SimpleNamespace())
    assert not CheckpointPeeker(_llm({}), 0.0).enabled  # checkpoints off


async def test_each_slice_polls_its_own_jobs_and_all_slices_poll_every_job_once() -> None:
    """The background poll takes one slice per interval / SLICES, so a burst of checkpoint
    writes is 1/SLICES of the running jobs; each job still gets its ids once per interval."""
    n = 3 * SLICES + 1
    ids = {f"j{i}": [i] for i in range(n)}
    peek = CheckpointPeeker(_llm({k: _state(v) for k, v in ids.items()}), LONG)
    calls: dict[str, int] = {}
    for key in ids:
        peek.add(key, lambda t, i, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
    peek.poll(0)
    assert 0 < len(calls) <= n // SLICES + 1  # one slice only
    for part in range(1, SLICES):
        peek.poll(part)
    assert calls == dict.fromkeys(ids, 1)  # every job once over the whole interval
    for v in ids.values():
        v.append(99)
    for part in range(SLICES):
        peek.poll(part)
    assert calls == dict.fromkeys(ids, 2)
    peek.close()
