"""Redis' clock as a worker learns it: a sample slowed by an event-loop stall must not move
the offset that deadlines are checked against (pure logic: a fake client, no server)."""

from __future__ import annotations

import fakeredis

from worker.store import WorkerStore


def _store() -> WorkerStore:
    return WorkerStore(fakeredis.FakeAsyncRedis(), "q", "w")


def test_a_slow_sample_does_not_replace_an_exact_one() -> None:
    s = _store()
    s._set_clock((1000, 0), 99.999, 100.001)  # 2 ms round trip: Redis is 900 s behind
    assert abs(s.clock_offset - 900.0) < 1e-9
    # 2 s later a sample whose request waited 2 s before it left (a stalled loop): taken, it
    # would put Redis' clock 1 s ahead and expire a 0.8 s deadline before its job started.
    s._set_clock((1002, 0), 101.0, 103.0)
    assert abs(s.clock_offset - 900.0) < 1e-9
    # An exact sample is always taken, a jumped host clock included.
    s._set_clock((1003, 0), 203.0, 203.001)
    assert abs(s.clock_offset - 800.0) < 1e-3


def test_the_sample_in_use_ages_so_the_clock_is_relearned() -> None:
    s = _store()
    s._set_clock((1000, 0), 99.9995, 100.0005)  # 1 ms round trip
    # 10 ms round trips only: taken once the 1 ms sample has aged past their error (5 ms).
    s._set_clock((1000, 500_000), 100.495, 100.505)
    assert abs(s.clock_offset - 900.0) < 1e-9
    s._set_clock((1010, 0), 109.995, 110.005)  # 10 s later: error held 0.5 + 10 ms
    assert abs(s.clock_offset - 900.0) < 1e-9 and s._clock_at == 110.005
