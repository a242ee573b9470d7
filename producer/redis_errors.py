"""Which Redis failures are passing conditions and which are configuration mistakes, decided
by exception class and Redis error code, never by message wording.

redis-py strips the code from the message of the errors it knows (``ReadOnlyError`` says
"You can't write against a read only replica."); the code stays in ``status_code``. Errors
it does not know (NOREPLICAS, BUSY, MISCONF) keep the code as the message's first word.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as rx

from producer.errors import RedisUnavailable, SlotfillError

TRANSIENT_CODES = frozenset({
    "READONLY",     # a failover demoted the node we talk to
    "NOREPLICAS",   # min-replicas-to-write not met: the replicas are catching up
    "OOM",          # maxmemory reached: workers finishing jobs free memory
    "TRYAGAIN",     # cluster: a slot is migrating
    "CLUSTERDOWN",  # cluster: a slot has no master (a failover in progress)
    "MASTERDOWN",   # a replica lost its master
    "LOADING",      # the server is loading its AOF/RDB after a restart
    "BUSY",         # a long script runs
    "MISCONF",      # the server cannot persist (disk full): refuses writes until fixed
    "MOVED", "ASK",  # cluster: our slot map is stale; the client refreshes it
})
"""Reply codes that mean "this Redis cannot serve you right now"."""

_TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.OutOfMemoryError,
    rx.TryAgainError, rx.ClusterDownError, rx.ClusterError, rx.AskError,
    rx.SlotNotCoveredError, OSError,
    # A failover promoted a node that never saw our scripts (they are not replicated), and
    # redis-py's reload went to the old topology: the next call loads them where they run.
    rx.NoScriptError,
)
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.S)
_CONFIG_CLASSES: tuple[type[BaseException], ...] = (
    rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError,
    rx.AuthenticationWrongNumberOfArgsError,
)


def error_code(e: BaseException) -> str:
    """Redis' error code of a reply error (``READONLY``), or "" when there is none."""
    code = getattr(e, "status_code", None)
    if code:
        return str(code)
    if isinstance(e, rx.ResponseError) and e.args:
        msg = str(e.args[0])
        # A pipeline prefixes the reply: "Command # 1 (EVALSHA ...) of pipeline caused error: "
        m = _PIPELINE_PREFIX.search(msg)
        first = (msg[m.end():] if m else msg).split(" ", 1)[0]
        if first.isupper() and first.isalpha():
            return first
    return ""


def is_config_error(e: BaseException) -> bool:
    """Wrong password, missing ACL permission: waiting will not fix it."""
    return isinstance(e, _CONFIG_CLASSES) or error_code(e) in ("WRONGPASS", "NOAUTH", "NOPERM")


def is_transient(e: BaseException) -> bool:
    """Redis is unreachable, stalled or temporarily refusing: retry with backoff."""
    if isinstance(e, RedisUnavailable):
        return True
    if isinstance(e, SlotfillError) or is_config_error(e):  # WaitTimeout is an OSError too
        return False
    return (isinstance(e, _TRANSIENT_CLASSES) or error_code(e) in TRANSIENT_CODES
            or _cluster_unreachable(e))


def _cluster_unreachable(e: BaseException) -> bool:
    # redis-py raises its generic cluster exception both for "no startup node answers" (an
    # outage) and for misuse such as a blocked pipeline command (a bug): only the first waits.
    return type(e) is rx.RedisClusterException and str(e).startswith(
        "Redis Cluster cannot be connected")


def unavailable(e: BaseException) -> RedisUnavailable:
    code = error_code(e)
    what = f"{code} {e}" if code and not str(e).startswith(code) else str(e)
    return RedisUnavailable(f"redis unavailable: {what or type(e).__name__}", code)


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise transient Redis failures as :class:`RedisUnavailable` (the client API's
    one retryable outage error); everything else passes unchanged."""
    try:
        yield
    except SlotfillError:
        raise
    except Exception as e:
        if is_transient(e):
            raise unavailable(e) from e
        raise
