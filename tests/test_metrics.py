"""The worker's /metrics, scraped over HTTP from a worker (in-process, simulated engine), and
the Grafana dashboard checked against what it exports."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer import Client, JobStatus, QueueKeys
from producer.keys import GROUP
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer, free_port
from worker.ops.metrics import METRICS
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "slotfill.json"
SLOTS = 8
QUEUE = f"metrics{os.getpid()}"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def tokens(i: int) -> int:
    return 10 + (i * 7) % 30


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    want = {"queue": QUEUE, **labels}
    hits = [v for (n, lbl), v in samples.items() if n == name and all(
        (k, w) in lbl for k, w in want.items())]
    assert hits, f"{name}{labels} not exported"
    return sum(hits)


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, port: int) -> Iterator[InprocWorker]:
    r = redis.Redis.from_url(redis_server.url)
    keys = QueueKeys.for_queue(QUEUE)
    for stream in keys.streams:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    # A job delivered again and again to a consumer that goes silent: past the backstop
    # (3 x max_deliveries=1 deliveries) the worker's reclaim dead-letters it.
    c = Client.from_url(redis_server.url, queue=QUEUE)
    c.submit(prompt="ghost", max_tokens=2)
    got = r.xreadgroup(GROUP, "ghost", {keys.stream("normal"): ">"}, count=1)
    entry = got[0][1][0][0]
    for _ in range(3):  # each XCLAIM without JUSTID counts one more delivery
        r.xclaim(keys.stream("normal"), GROUP, "ghost", 0, [entry])
    w = InprocWorker(redis_server.url, f"metrics-{os.getpid()}", queue=QUEUE, engine="sim",
                     sim_step_ms=4, max_num_seqs=SLOTS, headroom=4, metrics_port=port,
                     lease_seconds=0.3, max_deliveries=1)
    try:
        with w:
            yield w
    finally:
        c.close()


@pytest.fixture(scope="module")
def final(worker: InprocWorker, redis_server: RedisServer, port: int
          ) -> tuple[Samples, dict[str, str], dict[str, float]]:
    """Scrapes during a backlog and after it drained."""
    c = Client.from_url(redis_server.url, queue=QUEUE)
    ids = c.submit_many([{"prompt": "x y z", "max_tokens": tokens(i)} for i in range(120)])
    bad = c.submit(prompt="x " * 600, max_tokens=5).id  # too long: fails in the worker

    def while_busy() -> Samples | None:
        """A scrape while the backlog is served, once the oldest waiting job waited a while."""
        s, _ = scrape(port)
        return s if (value(s, "slotfill_engine_running") > 0 and value(
            s, "slotfill_queue_oldest_waiting_seconds") > 0.1) else None

    busy = wait_until(while_busy, what="a scrape during the backlog")
    during = {name: value(busy, name) for name in (
        "slotfill_queue_lag", "slotfill_queue_oldest_waiting_seconds", "slotfill_queue_depth",
        "slotfill_queue_pending", "slotfill_engine_running", "slotfill_slot_occupancy",
        "slotfill_worker_in_flight")}
    results = [c.wait(i, timeout=60) for i in [*ids, bad]]
    assert sum(r.status is JobStatus.succeeded for r in results) == 120

    def at_the_end() -> tuple[Samples, dict[str, str]] | None:
        """The queue figures come from a snapshot cached about a second; the worker counts a
        result once its write's reply is back, which can come after a client saw it (a
        scrape in between once showed 119 of 120)."""
        got = scrape(port)
        done = (value(got[0], "slotfill_queue_finished_total") == 122
                and value(got[0], "slotfill_results_total") >= 122)
        return got if done else None

    samples, types = wait_until(
        at_the_end, what="the queue snapshot and the worker to count every result")
    c.close()
    return samples, types, during


def test_every_metric_family_is_exported(final: tuple[Samples, dict[str, str], dict[str, float]]
                                         ) -> None:
    types = final[1]
    for name, kind in METRICS.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert {n for n in types if n.startswith("slotfill_")} == set(METRICS)


def test_values_during_a_backlog(final: tuple[Samples, dict[str, str], dict[str, float]]) -> None:
    during = final[2]
    assert during["slotfill_queue_lag"] > 0  # what an autoscaler scales on
    assert during["slotfill_queue_oldest_waiting_seconds"] > 0.1
    assert during["slotfill_queue_depth"] >= during["slotfill_queue_lag"] + 1
    # Engine figures are the last step's: one between two finishing jobs and their refills
    # can show a slot free, so only "busy" is asserted here (test_refill measures refills).
    assert during["slotfill_queue_pending"] >= 1
    assert 0 < during["slotfill_engine_running"] <= SLOTS
    assert 0 < during["slotfill_slot_occupancy"] <= 1.0
    # In flight = in the engine (the adaptive rule, the default, holds at least headroom (4)
    # and at most the slots beyond the slots: more when finishes come fast or the loop reads
    # late) plus results being written (at most one such capacity more: worker/admission.py).
    assert 1 <= during["slotfill_worker_in_flight"] <= 2 * (SLOTS + max(4, SLOTS))


def test_values_after_the_run(final: tuple[Samples, dict[str, str], dict[str, float]]) -> None:
    s = final[0]
    assert value(s, "slotfill_results_total", status="succeeded") == 120
    assert value(s, "slotfill_results_total", status="failed") == 2  # too long + poisoned
    assert value(s, "slotfill_reclaims_total") >= 1
    assert value(s, "slotfill_dead_letters_total") == 1
    assert value(s, "slotfill_duplicate_results_total") == 0
    assert value(s, "slotfill_output_tokens_total") == sum(tokens(i) for i in range(120))
    assert value(s, "slotfill_output_tokens_per_second") > 0
    assert value(s, "slotfill_engine_steps_total") > 0
    assert value(s, "slotfill_engine_full_steps_total") > 0
    assert value(s, "slotfill_ttft_seconds_count") == 120
    assert value(s, "slotfill_e2e_seconds_count") == 122
    assert value(s, "slotfill_queue_wait_seconds_count") == 121  # the poisoned job never started
    assert value(s, "slotfill_queue_wait_seconds_sum") < value(s, "slotfill_e2e_seconds_sum")
    assert value(s, "slotfill_queue_finished_total", status="succeeded") == 120
    assert value(s, "slotfill_queue_finished_total", status="failed") == 2
    assert value(s, "slotfill_queue_reclaimed_total") >= 1
    assert value(s, "slotfill_queue_dead_lettered_total") == 1
    assert value(s, "slotfill_queue_dead_letter_size") == 1
    assert value(s, "slotfill_queue_depth") == 0 and value(s, "slotfill_queue_lag") == 0
    assert value(s, "slotfill_queue_workers") == 1
    assert value(s, "slotfill_redis_up") == 1
    assert value(s, "slotfill_worker_pulling") == 1
    assert value(s, "slotfill_worker_capacity") == SLOTS + 4
    assert value(s, "slotfill_engine_slots") == SLOTS


def _dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for p in panels:
            for t in p.get("targets", []) or []:  # type: ignore[attr-defined]
                exprs.append(t["expr"])
            walk(p.get("panels", []) or [])  # type: ignore[arg-type]

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        exprs.append(var["definition"])
    assert exprs
    return {m for e in exprs for m in re.findall(r"\bslotfill_[a-z0-9_]+", e)}


def test_dashboard_uses_exactly_the_exported_metrics(
        final: tuple[Samples, dict[str, str], dict[str, float]]) -> None:
    samples, types, _ = final
    exported = {name for name, _ in samples} | set(types)
    used = _dashboard_metric_names()
    assert used <= exported, f"dashboard uses metrics the worker does not export: {used - exported}"
    # ...and shows every family the worker exports.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert set(METRICS) <= families, set(METRICS) - families


def test_metrics_off_by_default_and_a_taken_port_is_not_fatal(
        redis_server: RedisServer, port: int, worker: InprocWorker) -> None:
    w = InprocWorker(redis_server.url, f"metrics-clash-{os.getpid()}", queue=QUEUE + "b",
                     engine="sim", metrics_port=port)
    with w:  # the port is the first worker's: this one runs without metrics
        pass
    assert w.exit_code == 0
    assert "metrics endpoint not started" in w.log_text()
    # Off by default: a worker given no port serves nothing.
    assert WorkerSettings.model_fields["metrics_port"].default == 0
