"""Start worker processes locally (the demo, tests and the bench share this)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from producer.connection import connect
from producer.keys import QueueKeys
from slotfill.testing.redis_server import unblock_stream_reads


def pin_engine_env(env: dict[str, str], cpu: int) -> dict[str, str]:
    """``env`` for a process that will be held on CPU ``cpu`` (``os.sched_setaffinity``) with
    the vLLM CPU engines it starts: their OpenMP threads are bound to that CPU too (vLLM's
    ``auto`` binds every engine on a box to the same first core).

    Why one core per engine on a small shared box: vLLM's CPU build runs each engine as two
    processes (scheduler and model worker) that busy-wait for each other between steps, each
    on a core of its own when they may. Held on one core, the waiting one yields its core to the
    other. Measured on a 2-core box, two engine workers running 24 jobs of 1,500 tokens side by
    side: 47-52 s and 93-103 s of CPU unpinned, 27-28 s and 53-54 s pinned one core each."""
    return {**env, "VLLM_CPU_OMP_THREADS_BIND": str(cpu)}


class WorkerProcess:
    """``slotfill worker`` as a child process, configured through ``SLOTFILL_*`` variables."""

    def __init__(self, redis_url: str, consumer: str, log_path: str | Path,
                 **settings: str | int | float) -> None:
        self.redis_url = redis_url
        self.consumer = consumer
        self.queue = str(settings.get("queue", "default"))
        self.log_path = Path(log_path)
        env = dict(os.environ)
        env.update({"SLOTFILL_REDIS_URL": redis_url, "SLOTFILL_CONSUMER": consumer,
                    "PYTHONUNBUFFERED": "1"})
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        for k, v in settings.items():
            env[f"SLOTFILL_{k.upper()}"] = str(v)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cpu: int | None = None) -> WorkerProcess:
        """Start it; with ``cpu``, held on that CPU with its engine processes
        (``pin_engine_env``)."""
        if cpu is not None:
            self.env = pin_engine_env(self.env, cpu)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen([sys.executable, "-m", "slotfill", "worker"],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        if cpu is not None:  # seconds before its engine starts (imports), whose processes inherit it
            os.sched_setaffinity(self.proc.pid, {cpu})
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until the worker's heartbeat appears (engine loaded, pulling)."""
        r = connect(self.redis_url)
        key = QueueKeys.for_queue(self.queue).worker(self.consumer)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log: "
                                   f"{self.log_path}\n{self.tail()}")
            if r.exists(key):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s; log: {self.log_path}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def dump_stacks(self, settle_s: float = 1.0) -> None:
        """Have a worker that ignored SIGTERM write its threads' stacks to its log (SIGUSR1,
        worker/runner.py): where it hangs, for the test's report."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(settle_s)  # the handler writes from C; give it a moment before -9

    def kill(self) -> None:
        """SIGKILL the worker and every engine process it spawned."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it overstays."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            unblock_stream_reads(self.redis_url)  # its idle read would hold the drain 2 s
            try:
                self.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.dump_stacks()
            self.kill()
        try:  # engine processes left behind by a killed parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode
