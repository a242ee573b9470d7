"""URL forms of the connection factory, and which Redis failures are passing conditions."""

from __future__ import annotations

import pytest
import redis
from redis import exceptions as rx

from producer.connection import connect, parse_url
from producer.errors import RedisUnavailable, WaitTimeout
from producer.redis_errors import error_code, is_config_error, is_transient, translated
from slotfill.testing.redis_server import RedisServer


def test_sentinel_url_with_credentials_several_sentinels_service_db_and_sentinel_password(
        ) -> None:
    t = parse_url("redis+sentinel://app:p%40ss@10.0.0.1:26379,10.0.0.2:26380/mymaster/3"
                  "?sentinel_password=s3cret&socket_timeout=2.5")
    assert t is not None and t.kind == "sentinel" and not t.ssl
    assert t.hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert (t.username, t.password, t.service, t.db) == ("app", "p@ss", "mymaster", 3)
    assert t.sentinel_password == "s3cret" and t.sentinel_kwargs()["password"] == "s3cret"
    assert "password" not in parse_url("redis+sentinel://h:1/m").sentinel_kwargs()  # type: ignore[union-attr]
    node = t.node_kwargs()
    assert node["password"] == "p@ss" and node["socket_timeout"] == 2.5


def test_tls_and_cluster_forms() -> None:
    t = parse_url("rediss+sentinel://h1:26379/svc")
    assert t is not None and t.ssl and t.db == 0 and t.node_kwargs()["ssl"] is True
    c = parse_url("redis+cluster://:pw@n1:7000,n2:7001,n3")
    assert c is not None and c.kind == "cluster" and c.password == "pw"
    assert c.hosts == [("n1", 7000), ("n2", 7001), ("n3", 6379)]
    assert parse_url("rediss+cluster://n1:7000") is not None
    assert parse_url("redis://localhost:6379/0") is None  # from_url takes it as is
    assert parse_url("unix:///tmp/r.sock?db=2") is None


@pytest.mark.parametrize("url", [
    "redis+sentinel://h:26379",              # no service name
    "redis+sentinel://h:26379/svc/x",        # db not a number
    "redis+sentinel://h:26379/a/1/2",
    "redis+cluster://h:7000/1",              # a cluster has db 0 only
    "redis+cluster://",
    "redis+cluster://h:port",
])
def test_malformed_urls_are_refused_without_echoing_passwords(url: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_url(url.replace("://", "://u:topsecret@"))
    assert "topsecret" not in str(e.value)


def test_plain_urls_still_go_through_from_url() -> None:
    r = connect("redis://127.0.0.1:1/0")
    assert isinstance(r, redis.Redis)
    r.close()


@pytest.mark.parametrize(("exc", "code"), [
    (rx.ReadOnlyError("You can't write against a read only replica.", status_code="READONLY"),
     "READONLY"),
    (rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.",
                         status_code="OOM"), "OOM"),
    (rx.TryAgainError("Multiple keys request during rehashing of slot",
                      status_code="TRYAGAIN"), "TRYAGAIN"),
    (rx.ClusterDownError("The cluster is down", status_code="CLUSTERDOWN"), "CLUSTERDOWN"),
    (rx.MasterDownError("Link with MASTER is down", status_code="MASTERDOWN"), "MASTERDOWN"),
    (rx.BusyLoadingError("Redis is loading the dataset in memory", status_code="LOADING"),
     "LOADING"),
    (rx.ResponseError("NOREPLICAS Not enough good replicas to write."), "NOREPLICAS"),
    (rx.ResponseError("BUSY Redis is busy running a script."), "BUSY"),
    (rx.ResponseError("Command # 1 (EVALSHA 6f72 6 k) of pipeline caused error: NOREPLICAS "
                      "Not enough good replicas to write."), "NOREPLICAS"),
    # Raised after a cluster failover: the promoted node had never loaded our scripts.
    (rx.NoScriptError("No matching script. Please use EVAL."), ""),
    (rx.ConnectionError("Error 111 connecting to 127.0.0.1:6379."), ""),
    (rx.TimeoutError("Timeout reading from socket"), ""),
])
def test_passing_conditions_are_classified_by_class_and_code(exc: Exception, code: str) -> None:
    assert error_code(exc) == code
    assert is_transient(exc) and not is_config_error(exc)
    with pytest.raises(RedisUnavailable) as caught, translated():
        raise exc
    assert caught.value.code == code and caught.value.retryable
    assert isinstance(caught.value, rx.ConnectionError)  # old `except redis.ConnectionError`


@pytest.mark.parametrize("exc", [
    rx.AuthenticationError("invalid username-password pair", status_code="WRONGPASS"),
    rx.NoPermissionError("this user has no permissions to run the 'xadd' command",
                         status_code="NOPERM"),
])
def test_configuration_errors_are_not_waited_out(exc: Exception) -> None:
    assert is_config_error(exc) and not is_transient(exc)
    with pytest.raises(type(exc)), translated():
        raise exc


def test_script_bugs_and_slotfill_errors_pass_through_unchanged() -> None:
    assert not is_transient(rx.ResponseError("ERR user_script:3: Script attempted to access "
                                              "nonexistent global variable"))
    with pytest.raises(WaitTimeout), translated():
        raise WaitTimeout("not finished")  # a TimeoutError, hence an OSError: not an outage


async def test_an_async_client_holds_more_than_a_hundred_waits_at_once(
        redis_server: RedisServer) -> None:
    """Each wait in flight holds a connection for its blocking read: the 101st must not fail
    with redis-py 8's default pool of 100 ("Too many connections")."""
    import asyncio

    from producer import AsyncClient

    url = redis_server.url
    client = AsyncClient.from_url(url, queue="many-waits")
    try:
        ids = [(await client.submit(prompt="nobody serves this queue")).id for _ in range(150)]

        async def one(job_id: str) -> str:
            try:
                await client.wait(job_id, timeout=1)
            except WaitTimeout:
                return "timeout"
            except RedisUnavailable as e:
                return f"unavailable: {e}"
            return "result"

        outcomes = await asyncio.gather(*(one(i) for i in ids))
    finally:
        await client.close()
    assert outcomes == ["timeout"] * 150, sorted(set(outcomes))
    assert connect(url).connection_pool.max_connections > 150
