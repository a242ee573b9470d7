"""``slotfill batch``: OpenAI Batch API files through a simulated-engine worker (in-process),
including a kill -9 of the submitting process and a resume (nothing submitted twice, nothing
lost)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from producer import ClientSettings, QueueKeys
from slotfill.cli.batch import BatchFileError, default_batch_id, run_batch
from slotfill.cli.main import app
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer


@pytest.fixture
def sim_worker(redis_server: RedisServer, queue: str) -> Iterator[InprocWorker]:
    with InprocWorker(redis_server.url, f"batch-{queue}", queue=queue, engine="sim",
                      sim_step_ms=3, max_num_seqs=8, headroom=4) as w:
        yield w


def write_input(path: Path, n: int, seed: int = 0, extras: bool = True) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            # OpenAI's newer `developer` role and a participant `name` are accepted.
            body = {"model": "gpt-4o-mini", "messages": [
                {"role": "developer" if i % 2 else "system", "content": "be brief"},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": f"hi {i}"}]}],
                "max_completion_tokens": rng.randint(3, 12)}
            url = "/v1/chat/completions"
        else:
            body = {"model": "gpt-4o-mini", "prompt": f"say {i}", "max_tokens": rng.randint(3, 12),
                    "temperature": 0.5}
            url = "/v1/completions"
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    if extras:
        lines.append({"custom_id": "bad-temp", "method": "POST", "url": "/v1/completions",
                      "body": {"prompt": "x", "temperature": 7}})
        lines.append({"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
                      "body": {"prompt": "x " * 600, "max_tokens": 5}})
        lines.append({"custom_id": "huge", "method": "POST", "url": "/v1/completions",
                      "body": {"prompt": "x" * 1_100_000}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return [x["custom_id"] for x in lines]


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_batch_file_round_trip(redis_server: RedisServer, r: redis.Redis, queue: str,
                               sim_worker: InprocWorker, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 30)
    res = CliRunner().invoke(app, ["batch", "submit", str(inp), "--out", str(out), "--queue", queue,
                                   "--redis-url", redis_server.url, "--no-progress"])
    assert res.exit_code == 0, res.output
    ok, errors = read_jsonl(out), read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted(str(x["custom_id"]) for x in ok + errors) == sorted(ids)
    assert len(ok) == 30
    assert {e["custom_id"] for e in errors} == {"bad-temp", "too-long", "huge"}
    by_id = {x["custom_id"]: x for x in ok + errors}
    chat = by_id["req-0"]["response"]
    assert isinstance(chat, dict) and chat["status_code"] == 200
    assert chat["body"]["object"] == "chat.completion"
    # The model that ran (the sim worker serves the generated tiny model), not the one asked.
    assert {x["response"]["body"]["model"] for x in ok} == {"tiny"}  # type: ignore[index]
    assert by_id["req-3"]["response"]["status_code"] == 200  # type: ignore[index]
    assert chat["body"]["choices"][0]["message"]["role"] == "assistant"
    assert chat["body"]["usage"]["completion_tokens"] > 0
    comp = by_id["req-1"]["response"]
    assert isinstance(comp, dict) and comp["body"]["object"] == "text_completion"
    assert comp["body"]["choices"][0]["text"] and comp["request_id"] in by_id["req-1"]["id"]
    bad = by_id["bad-temp"]["response"]
    assert isinstance(bad, dict) and bad["status_code"] == 400
    assert "temperature" in bad["body"]["error"]["message"]
    huge = by_id["huge"]["response"]
    assert isinstance(huge, dict) and "over the" in huge["body"]["error"]["message"]
    long_ = by_id["too-long"]["response"]
    assert isinstance(long_, dict) and long_["status_code"] == 400
    assert long_["body"]["error"]["code"] == "prompt_too_long"
    # Batch jobs run at low priority unless told otherwise.
    job = by_id["req-1"]["response"]["request_id"]  # type: ignore[index]
    assert r.hget(QueueKeys.for_queue(queue).job(str(job)), "priority") == b"low"

    bid = default_batch_id(inp)
    st = CliRunner().invoke(app, ["batch", "status", bid, "--queue", queue, "--redis-url",
                                  redis_server.url, "--json"])
    assert st.exit_code == 0, st.output
    state = json.loads(st.output)
    assert state["state"] == "completed" and state["total"] == "33"
    assert state["submitted"] == 31 and state["jobs"] == {"succeeded": 30, "failed": 1}
    listing = CliRunner().invoke(app, ["batch", "status", "--queue", queue, "--redis-url",
                                       redis_server.url])
    assert listing.exit_code == 0 and bid in listing.output

    # Running it again writes nothing new and submits nothing.
    again = run_batch(r, ClientSettings(redis_url=redis_server.url), inp, out, queue=queue,
                      progress=False)
    assert again.written_before == 33 and again.submitted == 0
    assert len(read_jsonl(out)) == 30


def test_batch_resumes_after_kill_without_resubmitting(
        redis_server: RedisServer, r: redis.Redis, queue: str, sim_worker: InprocWorker,
        tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 240
    ids = write_input(inp, n, seed=1, extras=False)
    env = {**os.environ, "SLOTFILL_REDIS_URL": redis_server.url, "SLOTFILL_QUEUE": queue}
    proc = subprocess.Popen([sys.executable, "-m", "slotfill", "batch", "submit", str(inp),
                             "--out", str(out), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def forty_written() -> bool:
        assert proc.poll() is None, proc.communicate()[0]
        return len(read_jsonl(out)) >= 40

    wait_until(forty_written, timeout=60, what="the batch process to write 40 lines")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(read_jsonl(out))
    assert written < n, "the batch finished before it could be interrupted"
    with open(out, "a") as f:  # a write torn by the kill
        f.write('{"id": "batch_req_x", "custom_id": "req-')

    rep = run_batch(r, ClientSettings(redis_url=redis_server.url), inp, out, queue=queue,
                    progress=False)
    lines = read_jsonl(out)
    got = [str(x["custom_id"]) for x in lines]
    assert sorted(got) == sorted(ids)  # each line exactly once: none lost, none doubled
    assert all(x["response"]["status_code"] == 200 for x in lines)  # type: ignore[index]
    assert rep.written_before == written
    assert rep.written_before + rep.succeeded == n
    keys = QueueKeys.for_queue(queue)
    bid = default_batch_id(inp)
    assert r.hlen(keys.batch_jobs(bid)) == n
    # Every job the queue ever ran belongs to a distinct line: no line was submitted twice.
    stats = {k.decode(): int(v) for k, v in r.hgetall(keys.stats).items()}
    assert sum(v for k, v in stats.items() if k.startswith("finished_")) == n
    job_ids = {x["response"]["request_id"] for x in lines}  # type: ignore[index]
    assert len(job_ids) == n


def test_invalid_file_submits_nothing(redis_server: RedisServer, r: redis.Redis, queue: str,
                                      tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": "x"}}) + "\n"
                   + json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                 "body": {}}) + "\n{not json\n")
    with pytest.raises(BatchFileError) as e:
        run_batch(r, ClientSettings(redis_url=redis_server.url), inp, tmp_path / "o.jsonl",
                  queue=queue, progress=False)
    assert "line 2" in str(e.value) and "line 3" in str(e.value)
    assert r.xlen(QueueKeys.for_queue(queue).stream("low")) == 0
    res = CliRunner().invoke(app, ["batch", "submit", str(inp), "--out", str(tmp_path / "o.jsonl"),
                                   "--queue", queue, "--redis-url", redis_server.url])
    assert res.exit_code == 2 and "nothing submitted" in res.output
