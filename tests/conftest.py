"""Shared fixtures: a real redis-server per session; workers in-process (simulated engine) for
logic tests, as real subprocesses where a process must die or the shell command is tested.
What needs real engines (the shared engine workers, the kill test's pair, the bench's smoke
run) starts with the session at a low priority, so its boots use the CPU the logic and fault
tests leave idle; the real-engine tests run last."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fakeredis
import pytest
import redis

from producer import Client, ClientSettings
from slotfill.testing.fleet import WorkerProcess, pin_engine_env
from slotfill.testing.redis_server import RedisServer
from tests.engine_priority import (
    BENCH_CORE,
    LAST_NICE,
    engine_core,
    foreground,
    in_background,
    late,
    low_priority,
    promote_late,
)

if TYPE_CHECKING:  # the worker runtime: not on a light install (.ci/floors.sh)
    from slotfill.testing.inproc import InprocWorker

pytest_plugins = ["tests.xdist_kit"]

_queue_ids = itertools.count()
ROOT = Path(__file__).resolve().parent.parent

ENGINE_SLOTS = 8
ENGINE_HEADROOM = 4


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's server keeps nothing on disk: no test restarts it, and on this shared
    disk its AOF fsyncs have lagged ("Asynchronous AOF fsync is taking too long"), one more
    way for a reply to come late. The tests of durability start servers with AOF of their
    own (tests/test_faults_redis.py, tests/test_faults_ha.py)."""
    server = RedisServer(appendfsync=None, workdir=str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def queue() -> str:
    """A fresh queue name per test, so tests never see each other's jobs."""
    return f"t{os.getpid()}-{next(_queue_ids)}"


@pytest.fixture
def client(redis_server: RedisServer, queue: str) -> Iterator[Client]:
    c = Client.from_url(redis_server.url, queue=queue)
    yield c
    c.close()


@pytest.fixture
def fake_r() -> Iterator[redis.Redis]:
    """An in-memory Redis (fakeredis; Lua through lupa) of its own, for producer-side unit
    tests where a server adds nothing. The client's scripts (submit, cancel, token append) run
    on it; the worker's claim scripts do not (fakeredis answers an XREADGROUP with nothing new
    inside Lua with an empty array, Redis with nil): those stay on the real server."""
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield r
    r.close()


@pytest.fixture
def fake_client(fake_r: redis.Redis, queue: str) -> Client:
    return Client(fake_r, ClientSettings(queue=queue))


@pytest.fixture
def inproc(redis_server: RedisServer, queue: str) -> Iterator[Callable[..., InprocWorker]]:
    """Make in-process simulated-engine workers on this test's queue (``inproc("a",
    max_num_seqs=4)``, started); whatever is still running at the end is drained."""
    from slotfill.testing.inproc import InprocWorker

    made: list[InprocWorker] = []

    def make(name: str, **settings: Any) -> InprocWorker:
        w = InprocWorker(redis_server.url, name, **{"queue": queue, **settings}).start()
        made.append(w)
        return w

    yield make
    for w in made:
        if w.alive:
            w.stop(30)


SHARED_ENGINES = {"engine_worker", "engine_client", "feature_worker", "feature_client"}
FEATURES_QUEUE = "features"
LORA_RANK = 8
FEATURE_LEASE_S = 4.0
EAGER = "true"
"""``enforce_eager`` for every test engine but the session's: vLLM's CPU build then skips the
inductor compile of its warm-up (one boot: 65 s of CPU with a cold compile cache, as on CI,
where the session's engines boot at once; 30 s eager). The session engine keeps the default, compiled,
as a user's worker runs."""


def _phase(item: pytest.Item) -> int:
    """0: no real engine; 1: the session's shared engines; 2: tests that boot their own."""
    if item.get_closest_marker("engine") is None:
        return 0
    return 1 if SHARED_ENGINES & set(getattr(item, "fixturenames", ())) else 2


_shared_engines: list[WorkerProcess] = []
_early_stops: list[threading.Thread] = []
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test that uses the shared engines, stop them in the background: the
    tests that boot engines of their own then have the CPU, and the shutdown overlaps them."""
    if _phase(item) == 1 and (nextitem is None or _phase(nextitem) != 1):
        for w in _shared_engines:
            t = threading.Thread(target=w.stop, name=f"stop-{w.consumer}")
            t.start()
            _early_stops.append(t)
        _shared_engines.clear()


@pytest.hookimpl(tryfirst=True)  # before xdist's, which names each test's group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-engine tests run last, so the shared engines boot while the others run (see
    ``_boot_shared_engines``); tests that boot engines of their own come at the very end.
    Before the others: the long units (``slow`` tests, modules that start servers for all
    their tests), so under pytest-xdist no worker starts one when the rest are nearly done.
    The sort is stable: file order otherwise."""
    from tests.xdist_kit import ENGINE_GROUP, group_of

    def long_unit(item: pytest.Item) -> bool:
        return (item.get_closest_marker("slow") is not None
                or group_of(item) not in (None, ENGINE_GROUP))

    items.sort(key=lambda item: (_phase(item), not long_unit(item)))


@pytest.fixture(scope="session")
def _session_engine(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[WorkerProcess]:
    """The session's real-engine worker, started (not yet ready)."""
    d = tmp_path_factory.mktemp("engine-worker")
    w = WorkerProcess(
        redis_server.url, "engine-worker", d / "worker.log", queue="e2e",
        max_num_seqs=ENGINE_SLOTS, headroom=ENGINE_HEADROOM, max_model_len=512,
        max_num_batched_tokens=1024, step_log=str(d / "steps.jsonl"),
        lease_seconds=30, engine_hang_seconds=300,
    ).start(cpu=engine_core(0))
    in_background(w)
    _shared_engines.append(w)
    yield w
    for t in _early_stops:
        t.join()
    w.stop()


@pytest.fixture(scope="session")
def _feature_engine(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[WorkerProcess]:
    """A second real engine with what the session's default worker lacks: LoRA adapters,
    priority scheduling and a lower logprobs cap (tests/test_features.py), and a short lease
    with frequent heartbeats, so that a starved event loop shows as reclaimed jobs
    (tests/test_engine_big_prompts.py); started."""
    from slotfill.testing.tiny_lora import make_tiny_lora

    d = tmp_path_factory.mktemp("feature-worker")
    make_tiny_lora(d / "adapters" / "style", rank=LORA_RANK)
    make_tiny_lora(d / "adapters" / "too-big", rank=2 * LORA_RANK)
    w = WorkerProcess(
        redis_server.url, "feature-worker", d / "worker.log", queue=FEATURES_QUEUE,
        max_num_seqs=4, headroom=2, max_model_len=512, max_num_batched_tokens=1024,
        lease_seconds=FEATURE_LEASE_S, heartbeat_seconds=0.5, engine_hang_seconds=300,
        priority_scheduling="true",
        max_logprobs=5, lora_dir=str(d / "adapters"), max_loras=1, max_lora_rank=LORA_RANK,
        enforce_eager=EAGER,
    ).start(cpu=engine_core(1))
    in_background(w)
    _shared_engines.append(w)
    yield w
    for t in _early_stops:
        t.join()
    w.stop()


@pytest.fixture(scope="session", autouse=True)
def _boot_shared_engines(request: pytest.FixtureRequest) -> None:
    """Start the shared engine workers with the session's first test when a selected test
    needs them: their 30-60 s boots then overlap the tests that run before the engine tests.
    Likewise the kill test's pair and the bench's smoke run (two engines of its own). Under
    pytest-xdist a worker learns its tests one batch at a time: ``_boot_with_group``."""
    # Imported here, not at the top: pytest registers (and assert-rewrites) the plugin first.
    from tests.xdist_kit import xdist_worker

    if not xdist_worker(request.config):
        _boot(request, request.session.items)


_group_booted: list[bool] = []


@pytest.fixture(autouse=True)
def _boot_with_group(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist, the worker that runs the engine group's first test (a fault test
    when any is selected) boots what the group needs; the group's other tests follow on that
    worker while the other workers run the rest."""
    from tests.xdist_kit import in_engine_group, xdist_worker

    if (_group_booted or not xdist_worker(request.config)
            or not in_engine_group(request.node)):
        return
    _group_booted.append(True)
    _boot(request, [item for item in request.session.items if in_engine_group(item)])


def _boot(request: pytest.FixtureRequest, items: list[pytest.Item]) -> None:
    used = set().union(*(getattr(item, "fixturenames", ()) for item in items))
    if {"engine_worker", "engine_client"} & used:
        request.getfixturevalue("_session_engine")
    if {"feature_worker", "feature_client"} & used:
        request.getfixturevalue("_feature_engine")
    # What only the last tests use starts early only when tests without engines run first
    # to overlap it: with -m engine alone nothing would, and it would only take CPU from
    # the shared engines' tests (test_engine_e2e's dry-step bound is sensitive to load).
    if not any(_phase(item) == 0 for item in items):
        return
    if "engine_pair" in used:
        request.getfixturevalue("_engine_pair")
    if "bench_smoke" in used:
        request.getfixturevalue("bench_smoke")


@pytest.fixture
def engine_pair(_engine_pair: dict[str, WorkerProcess]) -> dict[str, WorkerProcess]:
    """The kill test's two real-engine workers (booted with the session), at the default
    priority from now on; not necessarily ready."""
    foreground(*_engine_pair.values())
    return _engine_pair


@pytest.fixture(scope="session")
def _engine_pair(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, WorkerProcess]]:
    """Two real-engine workers on one queue (``kill-e2e``) for the real-engine kill test
    (tests/test_faults_kill.py), which SIGKILLs one of them: booted with the session in the
    background, not yet ready. Whatever still runs at the end is killed."""
    d = tmp_path_factory.mktemp("kill-pair")
    # A long lease: two engines on two busy cores can stall a worker for seconds, and a stall
    # past the lease hands the stalled worker's jobs to its peer before the kill (the test then
    # counts re-executions that the kill did not cause). CI saw stalls of 10 s and more.
    settings: dict[str, str | int | float] = dict(
        queue="kill-e2e", max_num_seqs=8, headroom=4, max_model_len=2048,
        max_num_batched_tokens=1024, lease_seconds=20, engine_hang_seconds=300,
        heartbeat_seconds=0.5, checkpoint_interval_ms=200, enforce_eager=EAGER)
    pair = {n: in_background(WorkerProcess(redis_server.url, n, d / f"{n}.log",
                                            step_log=str(d / f"{n}.steps"),
                                            **settings).start(cpu=engine_core(i)), LAST_NICE)
            for i, n in enumerate(("real-a", "real-b"))}
    yield pair
    for w in pair.values():
        if w.proc is not None and w.proc.poll() is None:
            w.kill()


@pytest.fixture(scope="session")
def bench_smoke(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``python -m bench``'s smoke run (tests/test_bench_smoke.py) started in the background
    at a low priority; the process and its results directory (its output in output.txt).
    Interrupted (Ctrl-C: it stops the engines and Redis it started) if the session ends
    first."""
    from tests.test_bench_smoke import smoke_command

    d = tmp_path_factory.mktemp("bench-smoke")
    with open(d / "output.txt", "wb") as log:
        proc = subprocess.Popen(smoke_command(d), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=low_priority,
                                env=pin_engine_env({**os.environ, "COLUMNS": "200"},
                                                   engine_core(BENCH_CORE)))
    late.append(proc.pid)
    yield proc, d
    for sig, wait_s in ((signal.SIGINT, 60.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)


@pytest.fixture(scope="session")
def engine_worker(_session_engine: WorkerProcess) -> WorkerProcess:
    """One real vLLM engine (CPU build, generated tiny model) for the whole session."""
    foreground(_session_engine)
    try:
        _session_engine.wait_ready(timeout=600)
    except Exception:
        _session_engine.kill()
        raise
    promote_late()
    return _session_engine


@pytest.fixture(scope="session")
def feature_worker(_feature_engine: WorkerProcess) -> WorkerProcess:
    """The LoRA / priority / logprobs-cap / short-lease engine, ready (stopped with the
    session's engine after the last test that uses the shared engines)."""
    foreground(_feature_engine)
    try:
        _feature_engine.wait_ready(timeout=600)
    except Exception:
        _feature_engine.kill()
        raise
    promote_late()
    return _feature_engine


@pytest.fixture
def engine_client(redis_server: RedisServer, engine_worker: WorkerProcess) -> Iterator[Client]:
    c = Client.from_url(redis_server.url, queue="e2e")
    yield c
    c.close()


@pytest.fixture(scope="session")
def stop_later() -> Iterator[Callable[[WorkerProcess], None]]:
    """Stop a worker process in the background (a real engine takes 10 s or more to shut
    down) while the next tests run; the session waits for it before it ends."""
    threads: list[threading.Thread] = []

    def stop(w: WorkerProcess) -> None:
        if w in _shared_engines:  # stopped here, not again after the shared-engine tests
            _shared_engines.remove(w)
        t = threading.Thread(target=w.stop, name=f"stop-{w.consumer}")
        t.start()
        threads.append(t)

    yield stop
    for t in threads:
        t.join()


def step_log_path(w: WorkerProcess) -> Path:
    return Path(w.env["SLOTFILL_STEP_LOG"])
