"""Reaching Redis from a shell command: the URL checked, a fast first ping, and every failure
as one line with a hint and an exit code (README, "Exit codes").

The clients themselves retry a broken connection (right for a backend); a person at a shell
wants to know within seconds, so the first contact here is one ping without retries.
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError
from redis.retry import Retry

from producer.connection import connect as open_redis
from producer.keys import QueueKeys
from producer.queue_stats import discover_queues, worker_beats
from producer.settings import ClientSettings
from producer.shards import ShardLayout, read_layout

EXIT_JOB_FAILED = 1
"""The job ended but did not succeed (failed, cancelled, expired)."""
EXIT_USAGE = 2
"""A request the command refused: bad arguments, unknown job, timeout, queue full."""
EXIT_ENGINE_DEAD = 3
"""``slotfill worker``: the engine died or hung (a supervisor should restart it)."""
EXIT_SETTINGS = 4
"""Bad settings, a Redis URL without a known scheme, or a missing extra."""
EXIT_REDIS = 5
"""Redis unreachable (down, unknown host, timeout) or refused the credentials."""

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
PING_TIMEOUT_S = 3.0


class CliError(Exception):
    """A mistake to report as one line (``slotfill: <message> (<hint>)``) and an exit code."""

    def __init__(self, message: str, hint: str = "", code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code

    def line(self) -> str:
        return f"slotfill: {self.message}" + (f" ({self.hint})" if self.hint else "")


def where(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in creds else user}@{host}"


def check_url(url: str) -> None:
    if not url.startswith(SCHEMES):
        raise CliError(f"Redis URL {url!r} has no known scheme",
                       "write it as redis://host:6379/0; rediss:// for TLS, unix:///path.sock",
                       EXIT_SETTINGS)


def redis_error(url: str, e: Exception) -> CliError:
    """One line for a Redis failure: which Redis, what went wrong, what to try."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, AuthenticationError) or (
            isinstance(e, ResponseError) and text.startswith(("WRONGPASS", "NOAUTH", "NOPERM"))):
        if "@" not in url:
            return CliError(f"Redis at {where(url)} requires a password",
                            "give it in the URL: redis://user:password@host:6379/0", EXIT_REDIS)
        return CliError(f"Redis at {where(url)} refused the credentials: {text}",
                        "check the user:password in the URL or SLOTFILL_REDIS_URL", EXIT_REDIS)
    return CliError(f"cannot reach Redis at {where(url)}: {text}",
                    "is redis-server running? set --redis-url or SLOTFILL_REDIS_URL", EXIT_REDIS)


def ping(url: str) -> None:
    """Raise CliError unless Redis answers within a few seconds."""
    check_url(url)
    try:
        probe = open_redis(url, socket_connect_timeout=PING_TIMEOUT_S,
                           socket_timeout=PING_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
    except ValueError as e:
        raise CliError(f"bad Redis URL {where(url)}: {e}", "see README, Settings",
                       EXIT_SETTINGS) from None
    except (redis.RedisError, RedisClusterException, OSError) as e:  # a cluster connects here
        raise redis_error(url, e) from None
    try:
        probe.ping()
    except (redis.RedisError, OSError) as e:
        raise redis_error(url, e) from None
    finally:
        probe.close()


def settings_for(redis_url: str | None, queue: str | None = None) -> ClientSettings:
    """Client settings from the environment, the command's options on top; Redis pinged."""
    fields = {k: v for k, v in (("redis_url", redis_url), ("queue", queue)) if v}
    try:
        settings = ClientSettings.model_validate(fields)
    except ValueError as e:
        raise CliError(f"bad settings: {str(e).splitlines()[0]}", "see README, Settings",
                       EXIT_SETTINGS) from None
    ping(settings.redis_url)
    return settings


def connect(redis_url: str | None) -> tuple[redis.Redis, ClientSettings]:
    settings = settings_for(redis_url)
    return open_redis(settings.redis_url), settings


def live_workers(r: redis.Redis, queue: str) -> int:
    return len(worker_beats(r, QueueKeys.for_queue(queue)))


def holds_job(r: redis.Redis, queue: str, job_id: str) -> bool:
    """Whether ``queue`` (any of its shards: producer/shards.py) has ``job_id``."""
    try:
        layout = read_layout(r, queue)
    except ValueError:
        layout = ShardLayout.single(queue)
    return any(r.exists(k.job(job_id))
               for k in [layout.for_job(job_id), *layout.others(job_id)])


def locate_job(r: redis.Redis, job_id: str, queue: str, explicit: bool) -> str:
    """The queue holding ``job_id``: ``queue`` when it is there (or was given explicitly and
    the job is nowhere), else the one known queue that has it."""
    if holds_job(r, queue, job_id):
        return queue
    others = [q for q in discover_queues(r) if q != queue]
    found = [q for q in others if holds_job(r, q, job_id)]
    if len(found) == 1 and not explicit:
        return found[0]
    if found:
        raise CliError(f"job {job_id} is not in queue {queue!r}",
                       f"it is in {', '.join(repr(q) for q in found)}: add --queue")
    searched = f"nor in the {len(others)} other queues" if others else "(no other queue exists)"
    raise CliError(f"no job {job_id} in queue {queue!r} ({live_workers(r, queue)} live "
                   f"workers) {searched}", "finished jobs are kept result_ttl seconds")
