"""Opening Redis: the one place every slotfill client, worker, command and metrics exporter
gets its connection from, sync or asyncio, for a standalone server, a Sentinel-managed
master or a Redis Cluster.

URL forms (``SLOTFILL_REDIS_URL``)::

    redis://[[user]:password@]host[:port][/db]            one server (rediss:// for TLS)
    unix://[[user]:password@]/path/to/redis.sock[?db=N]
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]
    rediss+sentinel://...                                  TLS to sentinels and data nodes
    redis+cluster://[[user]:password@]host:port[,host:port...]
    rediss+cluster://...

``user``/``password`` authenticate to the data nodes (the master and replicas, or every
cluster node). Sentinels usually have a password of their own (``requirepass`` in
sentinel.conf): give it as the query parameters ``sentinel_password=`` (and
``sentinel_username=`` for an ACL user); without them the sentinels are asked without AUTH.
Percent-encode reserved characters in any of these.

Query parameters understood by every form: ``socket_timeout``, ``socket_connect_timeout``,
``health_check_interval`` (seconds), ``ssl_cert_reqs`` (``none``/``optional``/``required``),
``ssl_ca_certs`` (a path). Plain ``redis://``/``rediss://``/``unix://`` URLs accept every
parameter redis-py's ``from_url`` does.

A Sentinel client asks the sentinels for the master on each new connection and drops a
connection when the master it reaches answers READONLY (it was demoted) or NOREPLICAS (it
lost its replicas: during a switchover the old master keeps its role for seconds after the
sentinels named another), so it follows a failover by itself. A
cluster client follows MOVED redirections and refreshes its slot map after a failover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection as AsyncSentinelSSLConnection
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from producer.redis_errors import error_code

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}

DEFAULT_SOCKET_TIMEOUT = 5.0
"""Seconds before a read from a stalled Redis fails (a hung master must not hang a worker)."""
DEFAULT_CONNECT_TIMEOUT = 2.0

_FLOAT_OPTS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
_STR_OPTS = ("ssl_cert_reqs", "ssl_ca_certs")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    kind: str
    """``sentinel`` or ``cluster``."""
    hosts: list[tuple[str, int]]
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def node_kwargs(self) -> dict[str, Any]:
        """Connection settings of the data nodes."""
        kw: dict[str, Any] = {"socket_timeout": DEFAULT_SOCKET_TIMEOUT,
                              "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
                              **self.options}
        if self.username:
            kw["username"] = self.username
        if self.password:
            kw["password"] = self.password
        if self.ssl:
            kw["ssl"] = True
        return kw

    def sentinel_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"socket_timeout": self.options.get("socket_timeout", 1.0),
                              "socket_connect_timeout": self.options.get(
                                  "socket_connect_timeout", 1.0)}
        if self.sentinel_username:
            kw["username"] = self.sentinel_username
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        if self.ssl:
            kw["ssl"] = True
            kw.update({k: v for k, v in self.options.items() if k in _STR_OPTS})
        return kw


def parse_url(url: str) -> RedisTarget | None:
    """The target of a Sentinel or Cluster URL; None for a URL ``from_url`` takes as is.
    ValueError for a malformed one (a configuration error: say what is wrong)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or (scheme not in SENTINEL_SCHEMES and scheme not in CLUSTER_SCHEMES):
        return None
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in netloc:  # no path: redis+cluster://h:p?opt=1
        netloc, _, query = netloc.partition("?")
    creds, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts = [_host_port(h, url) for h in hostlist.split(",") if h]
    if not hosts:
        raise ValueError(f"{scheme} URL names no host: {_redact(url)}")
    params = dict(parse_qsl(query))
    options: dict[str, Any] = {k: float(params[k]) for k in _FLOAT_OPTS if k in params}
    options.update({k: params[k] for k in _STR_OPTS if k in params})
    common: dict[str, Any] = {"hosts": hosts, "username": username, "password": password,
                              "options": options}
    if scheme in CLUSTER_SCHEMES:
        if path.strip("/"):
            raise ValueError(f"a cluster has only database 0; drop the path: {_redact(url)}")
        return RedisTarget("cluster", ssl=CLUSTER_SCHEMES[scheme], **common)
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"sentinel URL must end in /service_name[/db]: {_redact(url)}")
    db = parts[1] if len(parts) == 2 else params.get("db", "0")
    if not db.isdigit():
        raise ValueError(f"sentinel URL database must be a number, got {db!r}")
    return RedisTarget("sentinel", ssl=SENTINEL_SCHEMES[scheme], service=unquote(parts[0]),
                       db=int(db), sentinel_username=params.get("sentinel_username"),
                       sentinel_password=params.get("sentinel_password"), **common)


def _host_port(h: str, url: str) -> tuple[str, int]:
    host, colon, port = h.rpartition(":")
    if not colon:
        host, port = h, "26379" if "sentinel" in url.split("://", 1)[0] else "6379"
    if not port.isdigit():
        raise ValueError(f"bad host:port {h!r} in {_redact(url)}")
    return host.strip("[]"), int(port)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _creds, at, tail = rest.partition("@")
    return f"{scheme}{sep}***@{tail}" if at else url.split("?", 1)[0]


_DEMOTED = "the master refuses writes ({}); asking the sentinels for the master again"


class _FollowingConnection(SentinelManagedConnection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[no-untyped-call]
        except ResponseError as e:
            if error_code(e) == "NOREPLICAS" and self.connection_pool.is_master:
                self.disconnect()  # type: ignore[no-untyped-call]
                raise RedisConnectionError(_DEMOTED.format("NOREPLICAS")) from e
            raise


class _FollowingSSLConnection(_FollowingConnection, SentinelManagedSSLConnection):
    pass


class _AsyncFollowingConnection(AsyncSentinelConnection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as e:
            if error_code(e) == "NOREPLICAS" and self.connection_pool.is_master:
                await self.disconnect()
                raise RedisConnectionError(_DEMOTED.format("NOREPLICAS")) from e
            raise


class _AsyncFollowingSSLConnection(_AsyncFollowingConnection, AsyncSentinelSSLConnection):
    pass


MAX_CONNECTIONS = 10_000
"""Pool size for plain URLs unless the URL or the caller sets ``max_connections``: every
``wait``/``stream`` in flight holds a connection for its blocking read, and redis-py 8's
default of 100 made the 101st concurrent stream fail with "Too many connections" (a gateway or
an asyncio backend under load). 10,000 is Redis's own default ``maxclients``."""


def _pool_kwargs(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "max_connections" in kwargs or "max_connections=" in url:
        return kwargs
    return {**kwargs, "max_connections": MAX_CONNECTIONS}


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for ``url`` (any form above). ``kwargs`` add connection settings.

    A cluster client is returned typed as ``redis.Redis``: it has the same command methods,
    and callers that need cluster-specific paths ask :func:`is_cluster`."""
    target = parse_url(url)
    if target is None:
        return redis.Redis.from_url(url, **_pool_kwargs(url, kwargs))
    node = {**target.node_kwargs(), **kwargs}
    if target.kind == "cluster":
        nodes = [ClusterNode(h, p) for h, p in target.hosts]  # type: ignore[no-untyped-call]
        return cast(redis.Redis, RedisCluster(startup_nodes=nodes, **node))
    sentinel = Sentinel(target.hosts, sentinel_kwargs=target.sentinel_kwargs(), **node)  # type: ignore[no-untyped-call]
    conn = _FollowingSSLConnection if target.ssl else _FollowingConnection
    return cast(redis.Redis, sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service, db=target.db, connection_class=conn))


def connect_async(url: str, **kwargs: Any) -> aioredis.Redis:
    """The asyncio twin of :func:`connect`."""
    target = parse_url(url)
    if target is None:
        return aioredis.Redis.from_url(url, **_pool_kwargs(url, kwargs))
    node = {**target.node_kwargs(), **kwargs}
    if target.kind == "cluster":
        nodes = [AsyncClusterNode(h, p) for h, p in target.hosts]
        return cast(aioredis.Redis, AsyncRedisCluster(startup_nodes=nodes, **node))
    sentinel = AsyncSentinel(target.hosts, sentinel_kwargs=target.sentinel_kwargs(), **node)  # type: ignore[no-untyped-call]
    conn = _AsyncFollowingSSLConnection if target.ssl else _AsyncFollowingConnection
    return cast(aioredis.Redis, sentinel.master_for(
        target.service, db=target.db, connection_class=conn))


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster | AsyncRedisCluster)


def connection_kwargs(client: object) -> dict[str, Any]:
    """The per-connection settings of any client :func:`connect` returns."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        return dict(pool.connection_kwargs)
    manager = getattr(client, "nodes_manager", None)
    kw = getattr(client, "connection_kwargs", None) or getattr(manager, "connection_kwargs", {})
    return dict(kw)


def masters(client: redis.Redis) -> list[redis.Redis]:
    """A plain client per master: the client itself, or one per cluster primary (for
    commands that read one server's own state: INFO, SCAN)."""
    if not isinstance(client, RedisCluster):
        return [client]
    return [cast(redis.Redis, client.get_redis_connection(n))
            for n in client.get_primaries()]
