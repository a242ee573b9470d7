"""A new user's mistakes at the shell: each ends as one line with a hint and the documented exit
code (README, "Exit codes"), never a traceback; job commands without ``--queue``; ``cancel``.

The commands run as ``python -m slotfill`` does (the same entry point, the error handler
included), against real redis-servers: in the test's own process (a fresh interpreter per
command cost ~1 s of CPU each, ~35 s in all), except ``slotfill worker`` and one check that the
real ``python -m slotfill`` answers the same.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import redis

from producer import Client, JobStatus
from slotfill.cli import entry
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def _env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTFILL_")}
    full_env.update({"COLUMNS": "80", "PYTHONPATH": str(ROOT), **(env or {})})
    return full_env


def slotfill_process(*args: str, env: dict[str, str] | None = None,
                     timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m slotfill ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "slotfill", *args], capture_output=True,
                          text=True, env=_env(env), timeout=timeout, cwd=ROOT)


@contextlib.contextmanager
def _main_module(module: types.ModuleType) -> Iterator[None]:
    """``sys.modules["__main__"]`` swapped (only that entry: restoring all of ``sys.modules``
    would drop the modules the command imported)."""
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = module
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


def slotfill(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """What ``python -m slotfill ARGS`` does, in this process: its entry point with that
    ``sys.argv`` (and program name), environment and working directory; stdout, stderr and
    the exit code captured."""
    main_module = types.ModuleType("__main__")
    main_module.__package__ = "slotfill"  # click names the program "python -m slotfill"
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with (mock.patch.dict(os.environ, _env(env), clear=True),
          mock.patch.object(sys, "argv", [str(ROOT / "slotfill" / "__main__.py"), *args]),
          _main_module(main_module),
          contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            entry.main()
        except SystemExit as e:
            code = e.code
    assert code is None or isinstance(code, int), code
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def test_the_real_command_answers_as_the_in_process_one() -> None:
    """The ``python -m slotfill`` process and the in-process runner above agree."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["wait", "abc", "--redis-url", url], ["status", "-h"], ["--version"]):
        real, here = slotfill_process(*args), slotfill(*args)
        assert (real.returncode, real.stdout, real.stderr) == (
            here.returncode, here.stdout, here.stderr), args


def one_line_error(res: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slotfill: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    server = RedisServer(appendfsync=None).start()
    redis.Redis(port=server.port).config_set("requirepass", "sekret")
    yield server
    server.stop()


@pytest.mark.parametrize("command", [["status"], ["wait", "abc"], ["submit", "hi"],
                                     ["cancel", "abc"], ["dlq", "list"], ["batch", "status"]])
def test_redis_down_is_one_line_exit_5(command: list[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    one_line_error(slotfill(*command, "--redis-url", url), 5, "cannot reach Redis", url,
                   "SLOTFILL_REDIS_URL")


def test_unknown_host_and_url_without_scheme() -> None:
    one_line_error(slotfill("status", "--redis-url", "redis://no-such-host.invalid:6379/0"), 5,
                   "cannot reach Redis", "no-such-host.invalid")
    one_line_error(slotfill("wait", "abc", env={"SLOTFILL_REDIS_URL": "localhost:6379"}), 4,
                   "no known scheme", "redis://host:6379/0")


def test_wrong_or_missing_password(locked_redis: RedisServer) -> None:
    port = locked_redis.port
    line = one_line_error(slotfill("status", "--redis-url", f"redis://:wrong@127.0.0.1:{port}/0"),
                          5, "refused the credentials")
    assert "wrong" not in line  # the password is never echoed
    one_line_error(slotfill("status", "--redis-url", f"redis://127.0.0.1:{port}/0"), 5,
                   "requires a password")
    ok = slotfill("status", "--redis-url", f"redis://:sekret@127.0.0.1:{port}/0")
    assert ok.returncode == 0, ok.stderr


def test_worker_checks_redis_before_loading_the_engine() -> None:
    """The vLLM engine is never started: the answer comes from the Redis check."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    one_line_error(slotfill_process("worker", "--redis-url", url), 5, "cannot reach Redis")
    one_line_error(slotfill_process("worker", "--redis-url", "127.0.0.1:6379"), 4,
                   "no known scheme")
    one_line_error(slotfill_process("worker", env={"SLOTFILL_LEASE_SECONDS": "-1"}), 4,
                   "bad settings", "lease_seconds")


def test_help_everywhere_and_version() -> None:
    commands = [[], ["worker"], ["demo"], ["submit"], ["wait"], ["stream"], ["cancel"],
                ["status"], ["dlq"], ["dlq", "list"], ["dlq", "show"], ["dlq", "replay"],
                ["batch"], ["batch", "submit"], ["batch", "status"]]
    for cmd in commands:
        res = slotfill(*cmd, "-h")
        assert res.returncode == 0 and "Usage:" in res.stdout, (cmd, res.stderr)
        too_wide = [x for x in res.stdout.splitlines() if len(x) > 80]
        assert not too_wide, (cmd, too_wide)
        if cmd and cmd[0] in ("submit", "wait", "stream", "cancel"):
            assert "--redis-url" in res.stdout and "-q, --queue" in res.stdout, cmd
    version = slotfill("--version")
    assert version.returncode == 0 and version.stdout.startswith("slotfill ")


def test_job_commands_find_the_queue(redis_server: RedisServer, queue: str,
                                     tmp_path: Path) -> None:
    url = redis_server.url
    with Client.from_url(url, queue=queue) as c:
        queued = c.submit(prompt="nobody serves this queue", max_tokens=4).id
        missing = slotfill("wait", "0" * 32, "--timeout", "1", "--redis-url", url)
        one_line_error(missing, 2, "no job", "'default'", "live workers")
        # Without --queue the job is found in the queue that holds it.
        res = slotfill("cancel", queued, "--redis-url", url)
        assert res.returncode == 0 and res.stdout.startswith(f"cancelled {queued}"), res
        assert c.status(queued) is JobStatus.cancelled
        again = slotfill("cancel", queued, "--redis-url", url)
        assert again.returncode == 1 and again.stdout.startswith("finished"), again
        # A mistyped --queue: the job is named where it is.
        wrong = slotfill("wait", queued, "-q", queue + "x", "--redis-url", url)
        one_line_error(wrong, 2, f"not in queue '{queue}x'", f"it is in '{queue}'")

        w = WorkerProcess(url, f"fh-{queue}", tmp_path / "w.log", queue=queue, engine="sim",
                          sim_step_ms=2, max_num_seqs=4, heartbeat_seconds=0.2).start()
        try:
            w.wait_ready(60)
            job = c.submit(prompt="hello", max_tokens=3).id
            done = slotfill("wait", job, "--timeout", "30", "--redis-url", url)
            assert done.returncode == 0 and '"succeeded"' in done.stdout, done
            status = slotfill("status", "--redis-url", url)
            assert status.returncode == 0, status.stderr
            assert all(len(x) <= 80 for x in status.stdout.splitlines()), status.stdout
            # The engine's sizes as chosen (the sim engine: the tiny model's), then a warning
            # for the queue with no worker.
            assert "512" in status.stdout and "2048" in status.stdout, status.stdout
            unserved = slotfill("submit", "hi", "-q", queue + "-ecco", "--redis-url", url)
            assert unserved.returncode == 0 and "no live worker" in unserved.stderr
            status = slotfill("status", "--redis-url", url)
            assert f"warning: queue '{queue}-ecco' has no live worker" in status.stdout
        finally:
            w.stop()


@pytest.mark.engine  # imports vLLM (and torch) into the test process: ~8 s of CPU
def test_cpu_build_defaults_are_set_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from worker.engines import vllm as engine

    if not current_platform.is_cpu():
        pytest.skip("the CPU build of vLLM only")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    engine._cpu_build_defaults()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE")
    engine._cpu_build_defaults()
    gib = int(os.environ["VLLM_CPU_KVCACHE_SPACE"])
    assert engine.CPU_KV_MIN_GIB <= gib <= engine.CPU_KV_MAX_GIB
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
