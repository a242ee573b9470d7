"""A Redis that is down or stalled reaches callers as slotfill's own retryable error, from
every client method, sync and asyncio; a worker that Redis refuses for good (wrong password,
malformed URL) exits at once with its documented code (5, 4) instead of waiting forever or
calling it engine death."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import AsyncClient, Client
from producer.errors import RedisUnavailable
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

JOB = "0" * 32


def _calls(c: Client) -> list[Callable[[], Any]]:
    return [lambda: c.submit("x", max_tokens=2), lambda: c.submit_many([{"prompt": "y"}]),
            lambda: c.status(JOB), lambda: c.result(JOB), lambda: c.wait(JOB, timeout=5),
            lambda: c.cancel(JOB), lambda: list(c.stream(JOB, timeout=5))]


async def _async_calls(c: AsyncClient) -> list[RedisUnavailable]:
    async def stream() -> None:
        async for _ in c.stream(JOB, timeout=5):
            pass

    caught = []
    for call in (lambda: c.submit("x", max_tokens=2), lambda: c.submit_many([{"prompt": "y"}]),
                 lambda: c.status(JOB), lambda: c.wait(JOB, timeout=5),
                 lambda: c.cancel(JOB), stream):
        with pytest.raises(RedisUnavailable) as e:
            await call()
        caught.append(e.value)
    return caught


def test_every_client_method_raises_retryable_redis_unavailable_when_redis_is_down(
        tmp_path: Path) -> None:
    server = RedisServer(workdir=str(tmp_path)).start()
    url = server.url
    c = Client.from_url(url, queue="down")
    c.submit("warm", max_tokens=2)
    server.kill()
    for call in _calls(c):
        with pytest.raises(RedisUnavailable) as e:
            call()
        assert e.value.retryable and not e.value.caller_fault
    c.close()

    async def run() -> list[RedisUnavailable]:
        async with AsyncClient.from_url(url, queue="down") as ac:
            return await _async_calls(ac)

    assert all(e.retryable for e in asyncio.run(run()))


def test_a_stalled_redis_raises_redis_unavailable_after_the_socket_timeout(
        tmp_path: Path) -> None:
    with RedisServer(workdir=str(tmp_path)) as server:
        c = Client.from_url(f"{server.url}?socket_timeout=0.5", queue="stall")
        job = c.submit("warm", max_tokens=2)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(RedisUnavailable):
                c.status(job.id)
            with pytest.raises(RedisUnavailable):
                c.wait(job.id, timeout=10)
            assert time.monotonic() - t0 < 10  # not the wait's own timeout
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert c.status(job.id).value == "queued"  # and back once it answers
        c.close()


def test_a_wait_rides_through_a_stall_that_only_delays_its_blocking_read(
        tmp_path: Path) -> None:
    """A wait blocks in slices a little shorter than the socket timeout (BLMOVE on the done
    list); a Redis that pauses while one is blocked answers it after the socket timeout. That
    late answer is not an outage: the wait reads again and returns the result (it used to
    raise RedisUnavailable: a CPU engine test here, on a loaded box). A plain read still
    raises once unanswered for a socket timeout (the test above)."""
    with RedisServer(workdir=str(tmp_path)) as server:
        assert server.proc is not None
        c = Client.from_url(f"{server.url}?socket_timeout=2", queue="brief")
        job = c.submit("x", max_tokens=2)
        got: dict[str, Any] = {}

        def wait() -> None:
            try:
                got["result"] = c.wait(job.id, timeout=60)
            except Exception as e:  # handed to the test thread
                got["error"] = e

        waiter = threading.Thread(target=wait)
        waiter.start()
        probe = redis.Redis.from_url(server.url)
        wait_until(lambda: any("b" in cl["flags"] for cl in probe.client_list()), timeout=10,
                   interval=0.001, what="the wait blocked in BLMOVE")
        os.kill(server.proc.pid, signal.SIGSTOP)
        time.sleep(2.2)  # the stall: past the 2 s socket timeout of the blocked read
        os.kill(server.proc.pid, signal.SIGCONT)
        w = InprocWorker(server.url, "brief-w", queue="brief", engine="sim",
                         sim_step_ms=2).start()
        try:
            waiter.join(60)
        finally:
            w.stop()
        probe.close()
        c.close()
    assert "error" not in got, got
    assert got["result"].status.value == "succeeded"


@pytest.mark.parametrize(("bad", "code", "says"), [
    ("password", 5, "refused the credentials"),   # Redis refuses it: EXIT_REDIS
    ("url", 4, "sentinel URL must end in /service_name"),  # a settings error
])
def test_a_worker_that_redis_refuses_for_good_exits(tmp_path: Path, bad: str, code: int,
                                                    says: str) -> None:
    (tmp_path / "r").mkdir()
    with RedisServer(workdir=str(tmp_path / "r")) as server:
        url = (f"redis://nobody:wrong@127.0.0.1:{server.port}/0" if bad == "password"
               else f"redis+sentinel://127.0.0.1:{server.port}")  # no service name
        w = WorkerProcess(url, "refused", tmp_path / "w.log", queue="refused", engine="sim",
                          max_num_seqs=2, headroom=1).start()
        assert w.proc is not None
        try:
            assert w.proc.wait(timeout=60) == code, w.tail()
        finally:
            w.kill()
        log = w.log_path.read_text()
        assert "engine dead" not in log and says in log, log
