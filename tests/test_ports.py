"""The test kit's ports under pytest-xdist: each worker draws from a share of its own, so two
workers never check and bind the same port at once (a Redis Cluster node's bus port too)."""

from __future__ import annotations

import pytest

from slotfill.testing.cluster import BUS_OFFSET
from slotfill.testing.redis_server import LOWEST_PORT, PORT_PERIOD, candidate_port

BELOW = 32768  # Linux's default start of the ephemeral range


def _draw(monkeypatch: pytest.MonkeyPatch, worker: str | None, count: int, below: int = BELOW
          ) -> set[int]:
    if worker is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))
    return {candidate_port(below) for _ in range(5000)}


@pytest.mark.parametrize("count", [2, 3, 8])
def test_each_worker_draws_from_a_share_no_other_worker_touches(
        monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    shares = [_draw(monkeypatch, f"gw{n}", count) for n in range(count)]
    for n, ports in enumerate(shares):
        assert all(LOWEST_PORT <= p < BELOW for p in ports)
        assert max(ports) - min(ports) > PORT_PERIOD  # the whole range, not one slice of it
        # A port and the one a period above (a cluster node's bus port) share their offset.
        offsets = {(p - LOWEST_PORT) % PORT_PERIOD for p in ports}
        for other in shares[n + 1:]:
            assert not offsets & {(p - LOWEST_PORT) % PORT_PERIOD for p in other}
    assert BUS_OFFSET == PORT_PERIOD


def test_outside_xdist_every_port_of_the_range_is_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker number past the count (xdist never sets one) is no share either.
    for worker, count in ((None, 1), ("gw5", 2)):
        ports = _draw(monkeypatch, worker, count)
        assert all(LOWEST_PORT <= p < BELOW for p in ports)
        offsets = {(p - LOWEST_PORT) % PORT_PERIOD for p in ports}
        assert min(offsets) < PORT_PERIOD // 10 and max(offsets) > PORT_PERIOD * 9 // 10


def test_a_cluster_node_never_gets_another_nodes_port_or_bus(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The nodes' ports are all chosen before any node listens: a free-port check alone let
    one node take another's bus port (that node then failed to start)."""
    from slotfill.testing import cluster

    first = cluster.cluster_port()
    taken = {first, first + BUS_OFFSET}
    offers = iter([first, first + BUS_OFFSET, first - BUS_OFFSET, first + 1])
    monkeypatch.setattr(cluster, "candidate_port", lambda below: next(offers))
    monkeypatch.setattr(cluster, "port_is_free", lambda port: True)
    assert cluster.cluster_port(taken) == first + 1
