"""Request features passed through to vLLM (structured output, logprobs, stop ids, seeds,
penalties, priority, LoRA): validation at submit, then each on the real engine (CPU build,
tiny model with random weights, so only properties of the output are checked, never text).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import redis

from producer import Client, InvalidRequest, JobResult, JobStatus, Priority, QueueKeys
from producer.protocol import build_request
from producer.schema import JobRequest, dump
from slotfill.cli.batch_format import Line, output_line, to_request
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer
from tests.conftest import FEATURES_QUEUE
from worker.engines.logprobs import MIN_LOGPROB, convert_logprobs

PROMPT_IDS = [5, 17, 42, 99, 123, 7, 300, 11]
"""Token-id prompts: the same input whatever the tokenizer does with text."""

BAD_FEATURE_REQUESTS: dict[str, dict[str, Any]] = {
    "two constraints": {"response_format": {"type": "json_object"},
                        "structured_outputs": {"regex": "a+"}},
    "two kinds in structured_outputs": {"structured_outputs": {"regex": "a", "choice": ["a"]}},
    "no kind in structured_outputs": {"structured_outputs": {}},
    "unknown kind": {"structured_outputs": {"grammar": "root ::= 'a'"}},
    "regex does not compile": {"structured_outputs": {"regex": "(unclosed"}},
    "empty regex": {"structured_outputs": {"regex": ""}},
    "empty choice": {"structured_outputs": {"choice": []}},
    "empty choice string": {"structured_outputs": {"choice": ["yes", ""]}},
    "choice not strings": {"structured_outputs": {"choice": [1, 2]}},
    "schema not an object": {"response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "x", "schema": [1]}}},
    "schema missing": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    "schema name missing": {"response_format": {"type": "json_schema",
                                                "json_schema": {"schema": {}}}},
    "bad schema name": {"response_format": {"type": "json_schema",
                                            "json_schema": {"name": "a b", "schema": {}}}},
    "unknown response_format": {"response_format": {"type": "xml"}},
    "top_logprobs without logprobs": {"top_logprobs": 2},
    "top_logprobs over 20": {"logprobs": True, "top_logprobs": 21},
    "negative top_logprobs": {"logprobs": True, "top_logprobs": -1},
    "completion-style logprobs int": {"logprobs": 5},
    "negative stop token id": {"stop_token_ids": [3, -1]},
    "too many stop token ids": {"stop_token_ids": list(range(65))},
    "adapter with a path": {"adapter": "../etc"},
    "adapter with a slash": {"adapter": "a/b"},
    "empty adapter": {"adapter": ""},
}


@pytest.mark.parametrize("name", sorted(BAD_FEATURE_REQUESTS))
def test_bad_feature_fields_are_refused_at_submit(name: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        build_request({"prompt": "a", **BAD_FEATURE_REQUESTS[name]}, {}, None)
    assert e.value.caller_fault and not e.value.retryable


def test_feature_fields_round_trip_through_the_wire_json() -> None:
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {
                      "name": "person", "schema": {"type": "object"}, "strict": True}}},
                  {"response_format": {"type": "json_object"}},
                  {"response_format": {"type": "text"}, "structured_outputs": {"regex": "a+"}},
                  {"structured_outputs": {"json": {"type": "array"}}},
                  {"structured_outputs": {"choice": ["x", "y"]}},
                  {"logprobs": True, "top_logprobs": 4, "stop_token_ids": [1, 2],
                   "adapter": "style-v2.1"}):
        req = build_request({"prompt": "a", **extra}, {}, None)
        wire = json.loads(dump(req))
        for key, value in extra.items():
            assert wire[key] == value, key  # OpenAI's key names on the wire ("schema", "json")
        assert JobRequest.model_validate_json(dump(req)) == req


class _Lp:
    def __init__(self, logprob: float, rank: int, text: str) -> None:
        self.logprob, self.rank, self.decoded_token = logprob, rank, text


def test_convert_logprobs_lists_the_top_ranks_not_the_sampled_token() -> None:
    raw = [{7: _Lp(-2.5, 4, "x"), 1: _Lp(-0.1, 1, "a"), 2: _Lp(-1.0, 2, "b")},  # 7 outside top 2
           {1: _Lp(-0.2, 1, "a"), 2: _Lp(float("-inf"), 2, "b")}]             # sampled is top 1
    out = convert_logprobs(raw, [7, 1], None, 2)
    assert out is not None and [o["token_id"] for o in out] == [7, 1]
    assert [t["token_id"] for t in out[0]["top_logprobs"]] == [1, 2]
    assert out[0]["logprob"] == -2.5 and out[0]["token"] == "x"
    assert out[1]["top_logprobs"][1]["logprob"] == MIN_LOGPROB  # -inf is not JSON
    assert [o["top_logprobs"] for o in convert_logprobs(raw, [7, 1], None, 0) or []] == [[], []]
    assert convert_logprobs(None, [7, 1], None, 2) is None


# --- on the real engine --------------------------------------------------------------------

@pytest.fixture
def feature_client(redis_server: RedisServer, feature_worker: WorkerProcess
                   ) -> Iterator[Client]:
    c = Client.from_url(redis_server.url, queue=FEATURES_QUEUE)
    yield c
    c.close()


def run(client: Client, **request: Any) -> JobResult:
    request.setdefault("prompt", PROMPT_IDS)
    res = client.wait(client.submit(**request).id, timeout=180)
    assert res.status in (JobStatus.succeeded, JobStatus.failed), res
    return res


def ok(client: Client, **request: Any) -> JobResult:
    res = run(client, **request)
    assert res.status is JobStatus.succeeded, res.error
    return res


def token_ids(res: JobResult) -> list[int]:
    assert res.logprobs is not None
    return [t.token_id for t in res.logprobs]


PET = {"type": "object", "additionalProperties": False, "required": ["ok", "kind"],
          "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog"]}}}


@pytest.mark.engine
def test_json_schema_output_parses_and_validates(engine_client: Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
    for seed in (1, 2, 3):
        res = ok(engine_client, response_format=fmt, max_tokens=120, temperature=0.8,
                 seed=seed)
        assert res.finish_reason == "stop", res.text
        jsonschema.validate(json.loads(res.text), PET)


@pytest.mark.engine
def test_json_object_and_json_in_structured_outputs(engine_client: Client) -> None:
    """Any JSON object: nothing bounds its strings or whitespace, and random weights like
    both (greedy runs off into whitespace here), so some seeds hit max_tokens first; those
    still start as an object. The seeds are fixed: the outcome is the same every run."""
    finished = 0
    for seed in range(6):
        res = ok(engine_client, response_format={"type": "json_object"}, max_tokens=120,
                 temperature=1.0, seed=seed)
        assert res.text.lstrip().startswith("{"), res.text
        if res.finish_reason == "stop":
            assert isinstance(json.loads(res.text), dict), res.text
            finished += 1
    print(f"json_object: {finished}/6 seeds closed the object within 120 tokens")
    assert finished >= 1
    res = ok(engine_client, structured_outputs={"json": PET}, max_tokens=120, temperature=0.8,
             seed=1)
    jsonschema.validate(json.loads(res.text), PET)


@pytest.mark.engine
def test_regex_and_choice_constrain_the_text(engine_client: Client) -> None:
    pattern = r"[a-z]{3,8}-[0-9]{2}"
    for seed in (1, 2):
        res = ok(engine_client, structured_outputs={"regex": pattern}, max_tokens=30,
                 temperature=1.0, seed=seed)
        assert re.fullmatch(pattern, res.text), res.text
    choices = ["red", "green", "blue"]
    seen = {ok(engine_client, structured_outputs={"choice": choices}, max_tokens=10,
               temperature=1.0, seed=seed).text for seed in range(4)}
    assert seen <= set(choices), seen


@pytest.mark.engine
def test_constraints_the_engine_cannot_compile_fail_alone(engine_client: Client) -> None:
    """Python's re accepts look-ahead; the grammar backend does not: invalid_request at run
    time, and the engine keeps serving."""
    for bad in ({"structured_outputs": {"regex": "(?=a)a+"}},
                {"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "x", "schema": {"type": "foo"}}}}):
        res = run(engine_client, max_tokens=5, **bad)
        assert res.status is JobStatus.failed and res.error is not None, bad
        assert res.error.code == "invalid_request" and not res.error.retryable, res.error
    assert ok(engine_client, max_tokens=3, ignore_eos=True).usage.completion_tokens == 3


@pytest.mark.engine
def test_logprobs_one_per_token_with_the_asked_top_list(engine_client: Client) -> None:
    res = ok(engine_client, max_tokens=6, ignore_eos=True, temperature=0, logprobs=True,
             top_logprobs=3)
    assert res.logprobs is not None and len(res.logprobs) == res.usage.completion_tokens == 6
    for tok in res.logprobs:
        assert tok.logprob <= 0 and tok.token is not None
        assert len(tok.top_logprobs) == 3
        tops = [t.logprob for t in tok.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        # Greedy takes a most likely token. (Not necessarily top_logprobs[0]: the dummy
        # weights are so small that every token ties at about -ln(vocab size).)
        assert tok.logprob == pytest.approx(tops[0])
    plain = ok(engine_client, max_tokens=4, ignore_eos=True, logprobs=True)
    assert plain.logprobs is not None and len(plain.logprobs) == 4
    assert all(t.top_logprobs == [] for t in plain.logprobs)
    assert ok(engine_client, max_tokens=2).logprobs is None


@pytest.mark.engine
def test_top_logprobs_over_the_worker_cap_fail_typed(feature_client: Client) -> None:
    res = run(feature_client, max_tokens=2, logprobs=True, top_logprobs=8)  # cap is 5 there
    assert res.status is JobStatus.failed and res.error is not None
    assert res.error.code == "invalid_request" and "max_logprobs" in res.error.message
    assert ok(feature_client, max_tokens=2, logprobs=True, top_logprobs=5).logprobs


@pytest.mark.engine
def test_stop_token_ids_end_the_generation(engine_client: Client) -> None:
    # Greedy decoding of the dummy weights alternates two tokens; a presence penalty makes
    # every token new, so the stop id can be one first generated third.
    run_args = {"max_tokens": 8, "ignore_eos": True, "temperature": 0, "logprobs": True,
                "presence_penalty": 2.0}
    free = token_ids(ok(engine_client, **run_args))
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stop_id = free[at]
    res = ok(engine_client, stop_token_ids=[stop_id], **run_args)
    print(f"free run {free}, stop id {stop_id}: {token_ids(res)} ({res.finish_reason})")
    assert res.finish_reason == "stop"
    assert token_ids(res) == free[:at + 1]  # the stop token ends it, and is kept
    held = ok(engine_client, stop_token_ids=[stop_id], min_tokens=at + 3, **run_args)
    ids = token_ids(held)
    print(f"min_tokens={at + 3}: {ids} ({held.finish_reason})")
    assert len(ids) >= at + 3 and stop_id not in ids[:at + 3]
    assert held.finish_reason == ("stop" if len(ids) < 8 else "length")
    if held.finish_reason == "stop":
        assert ids[-1] == stop_id


@pytest.mark.engine
def test_ignore_eos_gives_the_exact_count(engine_client: Client) -> None:
    res = ok(engine_client, max_tokens=40, ignore_eos=True, temperature=0)
    assert res.usage.completion_tokens == 40 and res.finish_reason == "length"


@pytest.mark.engine
def test_seed_makes_sampling_repeatable(engine_client: Client) -> None:
    def sample(seed: int) -> str:
        return ok(engine_client, max_tokens=12, ignore_eos=True, temperature=1.0,
                  seed=seed).text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


@pytest.mark.engine
def test_penalties_change_the_greedy_output(engine_client: Client) -> None:
    def greedy(**penalty: float) -> list[int]:
        return token_ids(ok(engine_client, max_tokens=16, ignore_eos=True, temperature=0,
                            logprobs=True, **penalty))
    base, presence, frequency = greedy(), greedy(presence_penalty=2.0), greedy(
        frequency_penalty=2.0)
    print(f"greedy {base}\npresence {presence}\nfrequency {frequency}")
    assert greedy() == base
    assert presence != base and frequency != base


@pytest.mark.engine
def test_priorities_run_on_a_priority_scheduling_worker(feature_client: Client) -> None:
    jobs = [feature_client.submit(prompt=PROMPT_IDS, max_tokens=8, ignore_eos=True,
                                  priority=p) for p in ("low", "normal", "high") * 3]
    for job in jobs:
        res = feature_client.wait(job.id, timeout=180)
        assert res.status is JobStatus.succeeded and res.usage.completion_tokens == 8, res


@pytest.mark.engine
def test_lora_adapter_changes_the_output(feature_client: Client) -> None:
    def greedy(adapter: str | None) -> list[int]:
        return token_ids(ok(feature_client, max_tokens=8, ignore_eos=True, temperature=0,
                            logprobs=True, adapter=adapter))
    base, tuned = greedy(None), greedy("style")
    print(f"base {base}\nadapter {tuned}")
    assert len(tuned) == 8 and tuned != base
    assert greedy("style") == tuned and greedy(None) == base


@pytest.mark.engine
def test_unknown_or_unusable_adapters_fail_typed(feature_client: Client,
                                                 engine_client: Client) -> None:
    for client, name, words in ((feature_client, "nope", "not found"),
                                (feature_client, "too-big", "rank"),
                                (engine_client, "style", "without LoRA")):
        res = run(client, max_tokens=2, adapter=name)
        assert res.status is JobStatus.failed and res.error is not None, name
        assert res.error.code == "unknown_adapter" and not res.error.retryable, res.error
        assert words in res.error.message, res.error.message
    assert ok(feature_client, max_tokens=2, ignore_eos=True, adapter="style")


BAD_RAW_BODIES = {
    "bad regex": ({"structured_outputs": {"regex": "("}}, "invalid_request"),
    "two constraints": ({"response_format": {"type": "json_object"},
                         "structured_outputs": {"choice": ["a"]}}, "invalid_request"),
    "adapter path": ({"adapter": "../../etc"}, "invalid_request"),
    "top_logprobs over 20": ({"logprobs": True, "top_logprobs": 50}, "invalid_request"),
    "no adapter here": ({"adapter": "style"}, "unknown_adapter"),
}


@pytest.mark.engine
def test_raw_xadd_bodies_with_bad_feature_fields_fail_alone(engine_client: Client,
                                                            r: redis.Redis) -> None:
    keys = QueueKeys.for_queue("e2e")
    ids = {}
    for name, (fields, _code) in BAD_RAW_BODIES.items():
        ids[name] = secrets.token_hex(16)
        r.xadd(keys.stream("normal"), {"id": ids[name], "body": json.dumps(
            {"prompt": "a", "max_tokens": 2, **fields})})
    good = engine_client.submit(prompt="fine", max_tokens=3, ignore_eos=True)
    for name, (_fields, code) in BAD_RAW_BODIES.items():
        done = keys.done(ids[name])
        assert r.blmove(done, done, 60, "LEFT", "LEFT"), name
        res = engine_client.wait(ids[name], timeout=10)
        assert res.status is JobStatus.failed and res.error is not None, name
        assert res.error.code == code, (name, res.error)
    assert engine_client.wait(good.id, timeout=60).usage.completion_tokens == 3


def test_batch_lines_carry_logprobs_in_openai_shapes() -> None:
    req = to_request("/v1/completions", {"prompt": "a", "logprobs": 2}, Priority.low)
    assert req.logprobs and req.top_logprobs == 2
    toks = [{"token": "ab", "token_id": 5, "logprob": -0.5,
             "top_logprobs": [{"token": "ab", "token_id": 5, "logprob": -0.5},
                              {"token": "c", "token_id": 6, "logprob": -1.5}]},
            {"token": "d", "token_id": 9, "logprob": -2.0, "top_logprobs": []}]
    res = JobResult.model_validate({"id": "j", "status": "succeeded", "text": "abd",
                                    "logprobs": toks})
    _, out = output_line(Line(1, "c1", "/v1/completions", {"prompt": "a"}), res)
    lp = out["response"]["body"]["choices"][0]["logprobs"]
    assert lp == {"tokens": ["ab", "d"], "token_logprobs": [-0.5, -2.0],
                  "top_logprobs": [{"ab": -0.5, "c": -1.5}, {}], "text_offset": [0, 2]}
    _, out = output_line(Line(2, "c2", "/v1/chat/completions", {"messages": []}), res)
    assert out["response"]["body"]["choices"][0]["logprobs"] == {"content": toks}
    failed = JobResult.model_validate({"id": "k", "status": "failed", "error": {
        "code": "unknown_adapter", "message": "adapter 'x' not found"}})
    _, out = output_line(Line(3, "c3", "/v1/completions", {"prompt": "a"}), failed)
    assert out["response"]["status_code"] == 400  # the caller's fault, like invalid_request
