"""The worker's Prometheus ``/metrics`` endpoint (``SLOTFILL_METRICS_PORT``; 0 = off).

Three kinds of series, all labelled with ``queue``:

- this worker's own state, read from the feeder and the engine's step statistics at scrape
  time (in-flight, engine running/waiting, slot occupancy, tokens, results by status, ...);
- latency histograms fed by ``Feeder.on_published`` from each result's timings;
- the queue's shared state, read from Redis at scrape time (depth, PEL, lag, oldest waiting
  age, dead letters, the queue's stats hash). Every worker of a queue exports the same
  values: aggregate them with ``max by (queue)``, not ``sum``. Scale on
  ``slotfill_queue_lag`` (jobs no worker has read) and ``slotfill_queue_oldest_waiting_seconds``.

``METRICS`` lists every family name; the Grafana dashboard in ``config/`` uses exactly these.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisClusterException

from producer import queue_stats
from producer.connection import connect

if TYPE_CHECKING:
    from worker.claim import ClaimedJob
    from worker.feeder import Feeder
    from worker.settings import WorkerSettings

log = logging.getLogger("slotfill.worker")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0)

METRICS: dict[str, str] = {
    # this worker
    "slotfill_worker_info": "gauge",
    "slotfill_worker_pulling": "gauge",
    "slotfill_worker_capacity": "gauge",
    "slotfill_worker_in_flight": "gauge",
    "slotfill_engine_slots": "gauge",
    "slotfill_engine_running": "gauge",
    "slotfill_engine_waiting": "gauge",
    "slotfill_slot_occupancy": "gauge",
    "slotfill_engine_kv_cache_usage": "gauge",
    "slotfill_engine_steps": "counter",
    "slotfill_engine_full_steps": "counter",
    "slotfill_engine_starved_steps": "counter",
    "slotfill_output_tokens": "counter",
    "slotfill_output_tokens_per_second": "gauge",
    "slotfill_results": "counter",
    "slotfill_reclaims": "counter",
    "slotfill_dead_letters": "counter",
    "slotfill_duplicate_results": "counter",
    "slotfill_solo_runs": "counter",
    "slotfill_leases_lost": "counter",
    "slotfill_released": "counter",
    "slotfill_publish_retries": "counter",
    "slotfill_callbacks": "counter",
    "slotfill_stream_appends": "counter",
    "slotfill_stream_fenced": "counter",
    "slotfill_stream_writes": "counter",
    "slotfill_ttft_seconds": "histogram",
    "slotfill_e2e_seconds": "histogram",
    "slotfill_queue_wait_seconds": "histogram",
    # the queue (shared by every worker of it)
    "slotfill_redis_up": "gauge",
    "slotfill_queue_depth": "gauge",
    "slotfill_queue_pending": "gauge",
    "slotfill_queue_lag": "gauge",
    "slotfill_queue_oldest_waiting_seconds": "gauge",
    "slotfill_queue_workers": "gauge",
    "slotfill_queue_dead_letter_size": "gauge",
    "slotfill_queue_finished": "counter",
    "slotfill_queue_reclaimed": "counter",
    "slotfill_queue_adopted": "counter",
    "slotfill_queue_dead_lettered": "counter",
    "slotfill_queue_duplicates_suppressed": "counter",
    "slotfill_queue_duplicate_entries": "counter",
}
"""Every metric family this module exports, and its type. Counters appear on the wire with
the ``_total`` suffix, histograms as ``_bucket`` / ``_sum`` / ``_count``."""

QUEUE_CACHE_S = 1.0
"""Scrapes within this long reuse the last Redis snapshot (several scrapers, one Redis)."""


class WorkerMetrics:
    """Metrics of one worker process. ``on_published`` is a ``Feeder.on_published`` listener."""

    def __init__(self, feeder: Feeder, settings: WorkerSettings,
                 registry: CollectorRegistry | None = None) -> None:
        self.feeder = feeder
        self.settings = settings
        self.queue = settings.queue
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = registry or CollectorRegistry(auto_describe=True)
        lbl = ["queue"]
        self.ttft = Histogram("slotfill_ttft_seconds", "Time to first token, from submit "
                              "(queued_at) to the first generated token", lbl,
                              buckets=LATENCY_BUCKETS, registry=self.registry).labels(self.queue)
        self.e2e = Histogram("slotfill_e2e_seconds", "End to end: submit to result written",
                             lbl, buckets=LATENCY_BUCKETS, registry=self.registry
                             ).labels(self.queue)
        self.queue_wait = Histogram("slotfill_queue_wait_seconds", "Submit to start on a "
                                    "worker (the last start, after any reclaim)", lbl,
                                    buckets=LATENCY_BUCKETS, registry=self.registry
                                    ).labels(self.queue)
        self.callbacks = Counter("slotfill_callbacks", "Completion callbacks (Celery tasks) by "
                                 "outcome: sent, refused, error", ["queue", "outcome"],
                                 registry=self.registry)
        for outcome in ("sent", "refused", "error"):
            self.callbacks.labels(self.queue, outcome)
        self.registry.register(_Collector(self))
        self._redis: redis.Redis | None = None
        self._cache: tuple[float, queue_stats.QueueSnapshot | None] = (0.0, None)
        self._lock = threading.Lock()
        self._token_samples: deque[tuple[float, int]] = deque()
        self._server: Any = None

    # -- listeners -------------------------------------------------------------------------

    def on_published(self, row: ClaimedJob, status: str, result_json: str) -> None:
        try:
            t = json.loads(result_json).get("timings") or {}
        except ValueError:
            return
        queued, started = t.get("queued_at"), t.get("started_at")
        first, finished = t.get("first_token_at"), t.get("finished_at")
        if queued is not None and started is not None:
            self.queue_wait.observe(max(0.0, started - queued))
        if queued is not None and first is not None:
            self.ttft.observe(max(0.0, first - queued))
        if queued is not None and finished is not None:
            self.e2e.observe(max(0.0, finished - queued))

    def callback_outcome(self, outcome: str) -> None:
        self.callbacks.labels(self.queue, outcome).inc()

    # -- HTTP ------------------------------------------------------------------------------

    def start_http(self) -> bool:
        """Serve ``/metrics`` on ``metrics_host:metrics_port`` (a daemon thread)."""
        s = self.settings
        if not s.metrics_port:
            return False
        try:
            self._server, _ = start_http_server(s.metrics_port, s.metrics_host, self.registry)
        except OSError as e:
            log.warning("metrics endpoint not started on %s:%d: %s", s.metrics_host,
                        s.metrics_port, e)
            return False
        log.info("metrics on http://%s:%d/metrics", s.metrics_host, s.metrics_port)
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    # -- scrape-time reads -----------------------------------------------------------------

    def queue_snapshot(self) -> queue_stats.QueueSnapshot | None:
        with self._lock:
            at, snap = self._cache
            now = time.monotonic()
            if snap is not None and now - at < QUEUE_CACHE_S:
                return snap
            try:
                if self._redis is None:  # a cluster client connects here already
                    self._redis = connect(self.settings.redis_url, socket_timeout=2.0,
                                          socket_connect_timeout=2.0)
                snap = queue_stats.snapshot(self._redis, self.queue)
            except (redis.RedisError, RedisClusterException, OSError) as e:
                log.warning("metrics: queue state unavailable: %s", e)
                snap = None
            self._cache = (now, snap)
            return snap

    def tokens_per_second(self, tokens: int) -> float:
        """Output tokens/s over the scrapes of the last 30 s (0 on the first scrape)."""
        now = time.monotonic()
        with self._lock:
            samples = self._token_samples
            samples.append((now, tokens))
            while len(samples) > 2 and now - samples[1][0] >= 30.0:
                samples.popleft()
            t0, n0 = samples[0]
        return (tokens - n0) / (now - t0) if now > t0 else 0.0


class _Collector(Collector):
    def __init__(self, m: WorkerMetrics) -> None:
        self.m = m

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: families vary with what the queue holds

    def _gauge(self, name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["queue", *labels])
        g.add_metric([self.m.queue, *labels.values()], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        cm = CounterMetricFamily(name, doc, labels=["queue"])
        cm.add_metric([self.m.queue], value)
        return cm

    def collect(self) -> Iterator[Metric]:
        yield from self._engine_metrics()
        yield from self._worker_metrics()
        yield from self._queue_metrics()

    def _engine_metrics(self) -> Iterator[Metric]:
        m, gauge, counter = self.m, self._gauge, self._counter
        f, s = m.feeder, m.settings
        st = f.engine.stats
        yield gauge("slotfill_worker_info", "This worker (value 1)", 1, worker=s.consumer,
                    model=s.model or "tiny", engine=s.engine)
        yield gauge("slotfill_worker_pulling", "1 while the worker pulls new jobs (0 once "
                    "draining or dead)", int(f.state.pulling))
        yield gauge("slotfill_worker_capacity", "Places: engine slots + headroom", f.capacity)
        yield gauge("slotfill_worker_in_flight", "Jobs this worker holds (in the engine or "
                    "having their result written)", len(f.holdings))
        yield gauge("slotfill_engine_slots", "Engine batch slots (max_num_seqs)", f.engine.slots)
        yield gauge("slotfill_engine_running", "Sequences running in the engine (last step)",
                    st.running)
        yield gauge("slotfill_engine_waiting", "Requests waiting inside the engine (last step)",
                    st.waiting)
        yield gauge("slotfill_slot_occupancy", "Running sequences / slots (last step)",
                    st.running / f.engine.slots if f.engine.slots else 0.0)
        yield gauge("slotfill_engine_kv_cache_usage", "KV cache in use, 0..1", st.kv_cache_usage)
        yield counter("slotfill_engine_steps", "Engine steps", st.steps)
        yield counter("slotfill_engine_full_steps", "Engine steps with every slot busy",
                      st.full_steps)
        yield counter("slotfill_engine_starved_steps", "Engine steps with a free slot while "
                      "jobs waited in Redis", f.state.starved_steps)

    def _worker_metrics(self) -> Iterator[Metric]:
        m, q, gauge, counter = self.m, self.m.queue, self._gauge, self._counter
        f = m.feeder
        c = f.counters
        yield counter("slotfill_output_tokens", "Generated tokens", c.output_tokens)
        yield gauge("slotfill_output_tokens_per_second", "Generated tokens per second "
                    "(over the last 30 s of scrapes; rate() of the counter is better)",
                    m.tokens_per_second(c.output_tokens))
        res = CounterMetricFamily("slotfill_results", "Results this worker published, by "
                                  "status", labels=["queue", "status"])
        for status, n in sorted(dict(c.results).items()):
            res.add_metric([q, status], n)
        yield res
        yield counter("slotfill_reclaims", "Entries this worker took over from silent peers",
                      c.reclaimed)
        yield counter("slotfill_dead_letters", "Entries this worker moved to the dead-letter "
                      "stream", c.dead_lettered)
        yield counter("slotfill_duplicate_results", "Results this worker computed for a job "
                      "that already had one (suppressed, never visible)", c.duplicates)
        yield counter("slotfill_solo_runs", "Reclaimed suspects run alone in the engine "
                      "(culprit isolation after an engine crash)", c.solo_runs)
        yield counter("slotfill_leases_lost", "In-flight entries a peer took over because this "
                      "worker renewed too late", c.leases_lost)
        yield counter("slotfill_released", "Entries handed back unfinished (drain past the grace "
                      "period, engine death)", c.released)
        yield counter("slotfill_publish_retries", "Result writes retried while Redis was "
                      "unavailable", c.publish_retries)
        sc = f.streamer.counters
        yield counter("slotfill_stream_appends", "Entries appended to streaming jobs' token "
                      "streams (coalesced deltas and attempt starts)", sc.appends)
        yield counter("slotfill_stream_fenced", "Token-stream appends refused because the job "
                      "had moved on (reclaimed by a peer, or ended)", sc.fenced)
        yield counter("slotfill_stream_writes", "Round trips of the token-stream writer (each "
                      "carries every streaming job's new output)", sc.flushes)

    def _queue_metrics(self) -> Iterator[Metric]:
        m, q = self.m, self.m.queue
        snap = m.queue_snapshot()
        up = GaugeMetricFamily("slotfill_redis_up", "1 when the last queue read from Redis "
                               "worked", labels=["queue"])
        up.add_metric([q], 1 if snap is not None else 0)
        yield up
        if snap is None:
            return
        per_stream: list[tuple[str, str, Callable[[queue_stats.StreamStats], float]]] = [
            ("slotfill_queue_depth", "Unfinished jobs (waiting + running), per priority",
             lambda s: s.depth),
            ("slotfill_queue_pending", "Jobs delivered to a worker and not yet finished "
             "(the consumer group's PEL)", lambda s: s.pending),
            ("slotfill_queue_lag", "Jobs no worker has read yet (consumer-group lag): scale "
             "on this", lambda s: s.lag),
            ("slotfill_queue_oldest_waiting_seconds", "Age of the oldest job no worker has "
             "read yet (0: none waits)", lambda s: s.oldest_waiting_age),
        ]
        for name, doc, get in per_stream:
            g = GaugeMetricFamily(name, doc, labels=["queue", "priority"])
            for s in snap.streams:
                g.add_metric([q, s.priority], get(s))
            yield g
        g = GaugeMetricFamily("slotfill_queue_workers", "Workers with a live heartbeat",
                              labels=["queue"])
        g.add_metric([q], len(snap.workers))
        yield g
        g = GaugeMetricFamily("slotfill_queue_dead_letter_size", "Entries in the dead-letter "
                              "stream", labels=["queue"])
        g.add_metric([q], snap.dead_letters)
        yield g
        fin = CounterMetricFamily("slotfill_queue_finished", "Results published on the queue, "
                                  "by status (all workers)", labels=["queue", "status"])
        for status, n in sorted(snap.finished.items()):
            fin.add_metric([q, status], n)
        yield fin
        for name, key, doc in (
            ("slotfill_queue_reclaimed", "reclaimed", "Entries reclaimed from silent workers"),
            ("slotfill_queue_adopted", "adopted", "Entries a worker took back after the "
             "reply of the claim that gave them to it was lost"),
            ("slotfill_queue_dead_lettered", "dead_lettered", "Entries dead-lettered"),
            ("slotfill_queue_duplicates_suppressed", "duplicates_suppressed",
             "Second results for a finished job, suppressed"),
            ("slotfill_queue_duplicate_entries", "duplicate_entries",
             "Stream entries dropped because their job id was already taken"),
        ):
            cm = CounterMetricFamily(name, doc + " (all workers)", labels=["queue"])
            cm.add_metric([q], snap.stats.get(key, 0))
            yield cm
