"""Entries added without the submit step (plain ``XADD``, any language) meet the same rules in
the worker: strict JSON types, UTF-8, a priority that is its stream's, usable ids. Workers run
in-process except where a process must take real signals or run with a skewed clock (those
tests are marked ``fault``)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.keys import QueueKeys
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer


def _result(r: redis.Redis, keys: QueueKeys, job_id: str, timeout: float = 20.0) -> dict:
    raw = wait_until(lambda: r.hget(keys.job(job_id), "result"), timeout=timeout,
                     what=f"job {job_id}'s result")
    out: dict = json.loads(raw)
    return out


def test_plain_xadd_bodies_are_held_to_the_wire_rules(
        r: redis.Redis, queue: str, inproc: Callable[..., InprocWorker]) -> None:
    keys = QueueKeys.for_queue(queue)
    cases = {
        "coerced_int": ("normal", b'{"prompt": "x", "max_tokens": "10"}', "invalid_request"),
        "coerced_bool": ("normal", b'{"prompt": "x", "stream": "yes"}', "invalid_request"),
        "coerced_eos": ("normal", b'{"prompt": "x", "ignore_eos": "true"}', "invalid_request"),
        "bad_utf8": ("normal", b'{"prompt": "caf\xe9", "max_tokens": 2}', "undecodable"),
        "wrong_level": ("low", b'{"prompt": "x", "priority": "high"}', "invalid_request"),
        "fine": ("normal", '{"prompt": "café", "max_tokens": 2}'.encode(), None),
    }
    ids = {name: secrets.token_hex(16) for name in cases}
    for name, (level, body, _code) in cases.items():
        r.xadd(keys.stream(level), {"id": ids[name], "body": body})
    inproc("strict", sim_step_ms=5, lease_seconds=2).wait_ready(60)
    for name, (_level, _body, code) in cases.items():
        res = _result(r, keys, ids[name])
        if code is None:
            assert res["status"] == "succeeded", res
        else:
            assert res["status"] == "failed" and res["error"]["code"] == code, (name, res)
            assert res["finish_reason"] == "failed" and res["text"] == ""
            assert res["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}


def test_record_fields_written_by_hand_cannot_crash_a_worker(
        redis_server: RedisServer, r: redis.Redis, queue: str,
        inproc: Callable[..., InprocWorker]) -> None:
    """A client's ACL allows HSET on job records: numbers that are not numbers (the issue's
    ``now`` = ``yesterday`` made every worker that read the job exit, 29 times, past the
    backstop) are replaced when the job is claimed; the jobs run, the worker lives."""
    from producer import Client

    keys = QueueKeys.for_queue(queue)
    c = Client.from_url(redis_server.url, queue=queue)
    ids = [c.submit("x", max_tokens=2).id for _ in range(4)]
    r.hset(keys.job(ids[0]), "queued_at", "yesterday")
    r.hset(keys.job(ids[1]), "attempts", "many")
    r.hset(keys.job(ids[2]), mapping={"queued_at": "nan", "attempts": "1e999",
                                      "deadline": "soon"})
    w = inproc("hardy", sim_step_ms=5, lease_seconds=2).wait_ready(60)
    for i in ids:
        res = _result(r, keys, i)
        assert res["status"] == "succeeded" and res["attempts"] == 1, res
    assert w.alive, w.tail()  # serve() neither raised nor returned
    assert w.stop(30) == 0


@pytest.mark.fault
def test_sigterm_always_ends_a_worker_that_is_exiting(
        redis_server: RedisServer, r: redis.Redis, queue: str, tmp_path: Path) -> None:
    """The first SIGTERM drains (here: a long grace period, long jobs); a second one ends the
    process at once, and nothing it held is lost: a peer takes the jobs over."""
    from producer import Client

    keys = QueueKeys.for_queue(queue)
    c = Client.from_url(redis_server.url, queue=queue)
    w = WorkerProcess(redis_server.url, "slow", tmp_path / "w.log", queue=queue,
                      engine="sim", sim_step_ms=100, lease_seconds=2, grace_seconds=600).start()
    peer = None
    try:
        w.wait_ready(60)
        ids = [c.submit("x", max_tokens=400, ignore_eos=True).id for _ in range(2)]
        wait_until(lambda: all(r.hget(keys.job(i), "status") == b"running" for i in ids),
                   timeout=30, what="both jobs to run")
        assert w.proc is not None
        w.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining for up to" in w.tail(50), timeout=30,
                   what="the worker to drain")
        time.sleep(0.5)  # draining now: the grace period has 10 minutes to go
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(timeout=20)  # raises if the second SIGTERM did not end it
        peer = WorkerProcess(redis_server.url, "peer", tmp_path / "p.log", queue=queue,
                             engine="sim", sim_step_ms=1, lease_seconds=2).start()
        for i in ids:
            assert _result(r, keys, i, timeout=60)["status"] == "succeeded"
    finally:
        w.stop(5)
        if peer is not None:
            peer.stop(30)


def _skewed_worker(url: str, name: str, tmp: Path, queue: str, skew_s: float,
                   **settings: Any) -> WorkerProcess:
    """A worker process whose host clock is ``skew_s`` off (``time.time`` shifted at start)."""
    site = tmp / f"clock-{name}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import time\n_real = time.time\n"
        f"time.time = lambda: _real() + {skew_s!r}\n")
    w = WorkerProcess(url, name, tmp / f"{name}.log", queue=queue, engine="sim",
                      sim_step_ms=10, lease_seconds=2, **settings)
    w.env["PYTHONPATH"] = os.pathsep.join([str(site), w.env.get("PYTHONPATH", "")])
    return w.start()


@pytest.mark.fault
@pytest.mark.parametrize("skew_s", [3600.0, -3600.0])
def test_deadlines_are_on_redis_time_whatever_the_workers_clock(
        redis_server: RedisServer, r: redis.Redis, queue: str, tmp_path: Path,
        skew_s: float) -> None:
    """Issue 12 case 6: a worker 1 h fast expired every deadline job unrun; 1 h slow, it
    ignored a 1 s deadline."""
    from producer import Client

    keys = QueueKeys.for_queue(queue)
    c = Client.from_url(redis_server.url, queue=queue)
    w = _skewed_worker(redis_server.url, "skewed", tmp_path, queue, skew_s)
    try:
        w.wait_ready(60)
        roomy = c.submit("x", max_tokens=5, timeout=60).id       # ends long before
        tight = c.submit("x", max_tokens=400, ignore_eos=True, timeout=1.0).id  # 4 s of work
        assert _result(r, keys, roomy)["status"] == "succeeded"
        res = _result(r, keys, tight, timeout=30)
        assert res["status"] == "expired", res
        assert res["usage"]["completion_tokens"] < 400
    finally:
        w.stop(30)
