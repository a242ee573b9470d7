"""Admission (worker/admission.py): the arithmetic, without Redis or an engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from worker.admission import Admission, EngineView, Policy, newest, prompt_tokens, to_read
from worker.engines.base import StepStats
from worker.settings import WorkerSettings
from worker.state import FeederState

SLOTS, TARGET, BUDGET = 32, 8, 2048
ENGINE = Policy(engine_aware=True, slots=SLOTS, ready_target=TARGET, token_budget=BUDGET,
                kv_high_water=0.9)
FIXED = Policy(engine_aware=False, slots=SLOTS, ready_target=TARGET, token_budget=BUDGET,
               kv_high_water=0.9)


def view(held: int, running: int, kv: float = 0.1, ready_tokens: int = 0,
         publishing: int = 0) -> EngineView:
    return EngineView(held=held, running=running, kv_usage=kv, ready_tokens=ready_tokens,
                      publishing=publishing)


class Rig:
    """A fake monotonic clock (worker/admission.py's ``time.monotonic``), the engine's step
    stats and a count of finished jobs, from which an :class:`Admission` measures rates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import worker.admission as adm_mod

        self.now = 100.0
        monkeypatch.setattr(adm_mod.time, "monotonic", lambda: self.now)
        self.stats = StepStats()
        self.done = 0

    def admission(self, starved: Callable[[], int] | None = None,
                  **settings: Any) -> Admission:
        """An Admission over this rig with ``WorkerSettings(**settings)``."""
        return Admission(WorkerSettings(**settings), self.stats, settings["max_num_seqs"],
                         finished=lambda: self.done, starved=starved or (lambda: 0))

    def full_window(self, adm: Admission, *, seconds: float, finished: int, steps: int,
                    slots: int, waiting: int, read_s: float) -> None:
        """``seconds`` of a full batch of ``slots`` (``steps`` steps, ``waiting`` waiting in
        the engine), ``finished`` jobs finishing, one read of ``read_s``; then an update."""
        self.now += seconds
        self.done += finished
        for _ in range(steps):
            self.stats.record(slots, waiting, 0.5, slots)
        adm.read_took(read_s)
        adm.update()

    def busy_window(self, adm: Admission) -> None:
        """0.4 s of a full 1,024-slot batch: 40 ms steps, 100 jobs/s finishing, 5 ms reads."""
        self.full_window(adm, seconds=0.4, finished=40, steps=10, slots=1024, waiting=100,
                         read_s=0.005)


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Rig:
    return Rig(monkeypatch)


def test_empty_engine_reads_its_slots_plus_the_ready_queue() -> None:
    assert to_read(view(0, 0), ENGINE, None) == SLOTS + TARGET
    assert to_read(view(0, 0), ENGINE, 16.0) == SLOTS + TARGET
    # 32 x 64 prompt tokens fill one step's budget: the slots, plus the one ready job.
    assert to_read(view(0, 0), ENGINE, 64.0) == SLOTS + 1


def test_short_prompts_match_the_fixed_rule() -> None:
    # 16-token prompts: the token budget (2048) is not what limits the ready queue.
    for held, running in ((40, 32), (35, 32), (30, 28), (12, 4), (39, 39)):
        tokens = (held - running) * 16
        assert (to_read(view(held, running, ready_tokens=tokens), ENGINE, 16.0)
                == to_read(view(held, running), FIXED, None) == SLOTS + TARGET - held)


def test_long_prompts_count_by_tokens() -> None:
    # Full batch, two 1500-token prompts waiting: 3000 tokens > one step's 2048 budget, so
    # nothing more is read; the fixed rule would take 6 more jobs.
    full = view(34, 32, ready_tokens=3000)
    assert to_read(full, ENGINE, 1500.0) == 0
    assert to_read(view(34, 32), FIXED, None) == 6
    # One 1500-token prompt waiting, expected next prompt 400 tokens: room for one more.
    assert to_read(view(33, 32, ready_tokens=1500), ENGINE, 400.0) == 1
    # Mixed: a 256-token average leaves room for the whole ready queue.
    assert to_read(view(32, 32), ENGINE, 256.0) == TARGET


def test_one_job_stays_ready_whatever_the_token_budget() -> None:
    # Prompts longer than a whole step's budget: still one ready job beyond the batch, so a
    # slot that frees never waits for a round trip to Redis.
    assert to_read(view(32, 32), ENGINE, 5000.0) == 1
    assert to_read(view(33, 32, ready_tokens=5000), ENGINE, 5000.0) == 0


def test_free_slots_are_filled_even_past_the_token_budget() -> None:
    # 10 free slots, nothing ready: all 10 are read (occupancy first), plus the one ready job.
    assert to_read(view(22, 22), ENGINE, 3000.0) == 11
    # 10 free slots, 4 jobs already on their way: 6 to fill them.
    assert to_read(view(26, 22, ready_tokens=4 * 3000), ENGINE, 3000.0) == 7


def test_running_from_a_step_older_than_the_last_finishes_is_clamped() -> None:
    # The step said 32 running, but 5 jobs left the engine since: 27 held, none ready.
    assert to_read(view(27, 32), ENGINE, 64.0) == SLOTS + TARGET - 27


def test_kv_cache_past_high_water_only_replaces_what_starts() -> None:
    # Memory-bound at 28 running: the 4 free slots are not filled; the ready queue is.
    assert to_read(view(30, 28, kv=0.95, ready_tokens=2 * 64), ENGINE, 64.0) == TARGET - 2
    assert to_read(view(28 + TARGET, 28, kv=0.95, ready_tokens=TARGET * 64), ENGINE,
                   64.0) == 0
    # Below the mark the same state fills the free slots as well.
    assert to_read(view(30, 28, kv=0.5, ready_tokens=2 * 64), ENGINE, 64.0) == 4 + TARGET - 2
    # The fixed rule ignores memory.
    assert to_read(view(30, 28, kv=0.95), FIXED, None) == SLOTS + TARGET - 30


def test_preempted_requests_stop_reading() -> None:
    # The engine preempted 12 requests back to waiting: 20 running, 20 ready (> target).
    assert to_read(view(40, 20, kv=0.97, ready_tokens=20 * 64), ENGINE, 64.0) == 0


def test_unwritten_results_beyond_a_capacity_slow_pulling() -> None:
    cap = SLOTS + TARGET
    for policy in (ENGINE, FIXED):
        assert to_read(view(0, 0, publishing=cap), policy, 16.0) == cap
        assert to_read(view(0, 0, publishing=cap + 5), policy, 16.0) == cap - 5
        assert to_read(view(0, 0, publishing=3 * cap), policy, 16.0) == 0


def test_no_headroom_means_no_ready_queue() -> None:
    p = Policy(engine_aware=True, slots=4, ready_target=0, token_budget=BUDGET,
               kv_high_water=0.9)
    assert to_read(view(4, 4), p, 64.0) == 0
    assert to_read(view(3, 4), p, 64.0) == 1


@pytest.mark.parametrize(("body", "tokens"), [
    ({"prompt": list(range(700))}, 700),
    ({"prompt": "x" * 400}, 100),
    ({"prompt": "é" * 10}, 5),  # 20 UTF-8 bytes
    ({"messages": [{"role": "system", "content": "a" * 40},
                   {"role": "user", "content": "b" * 8}]}, 4 + 10 + 4 + 2),
])
def test_prompt_tokens_exact_for_ids_estimated_for_text(body: object, tokens: int) -> None:
    assert prompt_tokens(json.dumps(body)) == tokens


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '{"max_tokens": 4}',
                                  '{"prompt": 5}', '{"messages": "hi"}'])
def test_bodies_that_are_not_requests_count_zero(body: str) -> None:
    assert prompt_tokens(body) == 0


def test_newest_sums_only_the_jobs_not_running() -> None:
    assert newest(iter([5, 7, 100]), 2) == 12
    assert newest(iter([5, 7]), 0) == 0
    assert newest(iter([5]), 3) == 5


def test_admission_reads_engine_stats_and_learns_prompt_sizes() -> None:
    stats = StepStats()
    adm = Admission(WorkerSettings(max_num_seqs=4, headroom=2, max_num_batched_tokens=1000,
                                   admission="engine"), stats, slots=4)
    assert adm.capacity == 6 and adm.next_prompt_tokens is None
    assert adm.observe(json.dumps({"prompt": list(range(900))}), flagged=False) == 900
    assert adm.observe("{not json", flagged=True) == 0  # flagged rows leave the estimate
    assert adm.next_prompt_tokens == 900
    stats.record(running=4, waiting=1, kv=0.2, slots=4)
    adm.update()
    # 5 held, 4 running: the newest (900 tokens) waits; 100 left of the budget < 900.
    assert adm.want(5, 0, iter([900, 10, 10, 10, 10])) == 0
    assert adm.want(4, 0, iter([10, 10, 10, 10])) == 1
    fixed = Admission(WorkerSettings(max_num_seqs=4, headroom=2, admission="fixed"), stats, 4)
    assert fixed.want(5, 0, iter([900])) == 1


def test_each_step_reaches_every_subscriber_and_the_stats_are_the_engines() -> None:
    stats = StepStats()
    calls: list[tuple[int, bool]] = []
    stats.subscribe(lambda step: calls.append((step.running, step.full)))
    state = FeederState()
    stats.subscribe(state.on_step)
    stats.record(running=3, waiting=0, kv=0.0, slots=4)
    state.backlog = True
    stats.record(running=3, waiting=0, kv=0.0, slots=4)  # a free slot while jobs waited
    stats.record(running=4, waiting=0, kv=0.0, slots=4)
    assert calls == [(3, False), (3, False), (4, True)]
    assert (stats.steps, stats.full_steps, state.starved_steps) == (3, 1, 1)
    with pytest.raises(AttributeError):
        stats.running = 2  # type: ignore[misc]  # only the engine writes (record)


def test_ready_queue_covers_what_finishes_during_a_refill() -> None:
    from worker.admission import ready_target

    assert ready_target(ENGINE, 0.0, 0.05) == 1  # nothing finishing yet: one ready job
    assert ready_target(ENGINE, 50.0, 0.011) == 2  # 0.55 finish per refill, twice over
    assert ready_target(ENGINE, 40.0, 0.06) == 5
    assert ready_target(ENGINE, 1000.0, 0.06) == TARGET  # headroom caps it
    assert ready_target(FIXED, 1000.0, 0.06) == TARGET
    no_headroom = Policy(engine_aware=True, slots=4, ready_target=0, token_budget=BUDGET,
                         kv_high_water=0.9)
    assert ready_target(no_headroom, 1000.0, 1.0) == 0
    # Full batch with 2 ready: a target of 3 reads one more; the default (headroom) six.
    assert to_read(view(34, 32, ready_tokens=128), ENGINE, 64.0, target=3) == 1
    assert to_read(view(34, 32, ready_tokens=128), ENGINE, 64.0) == TARGET - 2


def test_finish_rate_and_step_time_are_measured(rig: Rig) -> None:
    adm = rig.admission(max_num_seqs=32, headroom=8, admission="engine")
    for _ in range(20):  # 20 windows of 0.5 s: 25 jobs and 50 steps each
        rig.now += 0.5
        rig.done += 25
        for _ in range(50):
            rig.stats.record(running=0, waiting=0, kv=0.0, slots=32)
        adm.update()
        before = (adm.finish_per_s, adm.step_s)
        adm.want(0, 0, iter([]))
        assert (adm.finish_per_s, adm.step_s) == before  # asking changes nothing
        adm.read_took(0.004)
    assert adm.finish_per_s == pytest.approx(50.0, rel=0.01)
    assert adm.step_s == pytest.approx(0.01, rel=0.01)
    assert adm.read_s == pytest.approx(0.004, rel=0.01)
    # 50 jobs/s x (4 ms + 2 x 10 ms) x 2 = 2.4 -> 3 ready beyond the slots.
    assert adm.target == 3


def test_starved_steps_grow_the_ready_queue_and_calm_shrinks_it(rig: Rig) -> None:
    import worker.admission as adm_mod

    state = FeederState(backlog=True)
    rig.stats.subscribe(state.on_step)
    adm = rig.admission(max_num_seqs=4, headroom=3, admission="engine",
                        starved=lambda: state.starved_steps)

    def window(starved: bool) -> None:
        rig.now += 0.5
        for _ in range(10):
            rig.stats.record(running=3 if starved else 4, waiting=0, kv=0.1, slots=4)
        adm.update()

    assert adm.target == 1  # nothing finishes: the estimate alone asks for one
    window(starved=True)
    assert adm.learned == 2 and adm.target == 2
    for _ in range(5):
        window(starved=True)
    assert adm.target == 3  # capped by headroom
    for _ in range(adm_mod.CALM_WINDOWS - 1):
        window(starved=False)
    assert adm.target == 3
    window(starved=False)
    assert adm.target == 2
    for _ in range(2 * adm_mod.CALM_WINDOWS):
        window(starved=False)
    assert adm.target == 1 and adm.learned == 0


ADAPTIVE = Policy(engine_aware=False, slots=SLOTS, ready_target=TARGET, token_budget=BUDGET,
                  kv_high_water=0.9, adaptive=True)


def test_poisson_quantile() -> None:
    from worker.admission import poisson_quantile

    assert poisson_quantile(0.0, 0.001) == 0
    assert poisson_quantile(1.0, 0.5) == 1  # P(X > 1) = 0.26
    assert poisson_quantile(4.0, 0.001) == 11  # P(X > 10) = 0.0028, P(X > 11) = 0.00092
    assert poisson_quantile(10_000.0, 0.001) == 10_400  # normal approximation


def test_adaptive_ready_queue_follows_the_finish_rate_between_headroom_and_the_slots() -> None:
    from worker.admission import adaptive_ready

    assert adaptive_ready(ADAPTIVE, 0.0, 0.08) == TARGET  # nothing measured: the fixed count
    assert adaptive_ready(ADAPTIVE, 10.0, 0.08) == TARGET  # slow finishes: never fewer
    # ~4 finish per 40 ms step at 1,024 slots: 100/s over two steps and a read (85 ms).
    big = Policy(engine_aware=False, slots=1024, ready_target=8, token_budget=BUDGET,
                 kv_high_water=0.9, adaptive=True)
    assert adaptive_ready(big, 100.0, 0.085) == 19
    assert adaptive_ready(ADAPTIVE, 1e6, 0.1) == SLOTS  # never more than a batch
    none = Policy(engine_aware=False, slots=SLOTS, ready_target=0, token_budget=BUDGET,
                  kv_high_water=0.9, adaptive=True)
    assert adaptive_ready(none, 1e3, 0.1) == 0  # headroom 0: nothing beyond the slots
    assert to_read(view(0, 0), none, None, target=5) == SLOTS
    # Reads fill up to slots + the ready queue, whatever the engine reports.
    assert to_read(view(0, 0), ADAPTIVE, None, target=18) == SLOTS + 18
    assert to_read(view(40, 32), ADAPTIVE, None, target=3) == 0  # floor: headroom
    # Unwritten results beyond what it holds slow it as they slow the fixed rule.
    assert to_read(view(40, 32, publishing=SLOTS + 12 + 3), ADAPTIVE, None, target=12) == 1


def test_adaptive_is_the_default_and_grows_its_queue_with_the_measured_rate(rig: Rig) -> None:
    adm = rig.admission(max_num_seqs=1024, headroom=8)
    assert adm.policy.adaptive and adm.target == 8 and adm.want(0, 0, iter([])) == 1032
    for _ in range(30):
        rig.busy_window(adm)
        adm.want(1032, 0, iter([]))
    # 19 ready over the refill window (100/s over 85 ms, 0.999 quantile) + 9 read ahead of
    # one step's finishes (4 a step, 0.99 quantile).
    assert adm.target == 19 + 9
    assert adm.want(1032, 0, iter([])) == 20  # what the larger queue lacks


def test_a_slow_wake_deepens_the_adaptive_queue_until_it_decays(rig: Rig) -> None:
    """At 1,024 slots a loop that notices finishes late (busy with engine outputs, GC) needs
    the finishes of that delay held ready too: two steps and a read are not the window."""
    import worker.admission as adm_mod

    adm = rig.admission(max_num_seqs=1024, headroom=8)
    for _ in range(30):
        rig.busy_window(adm)
    ahead = adm_mod.poisson_quantile(100 * 0.04, adm_mod.AHEAD_MISS)
    assert adm.target == 19 + ahead  # 100/s over 85 ms, and one step's finishes read ahead
    adm.wake_took(0.2)  # a read sent 200 ms after the first finish it replaces
    # 100/s over 285 ms: mean 28.5, its 0.999 quantile.
    assert adm.target == ahead + adm_mod.poisson_quantile(100 * (0.005 + 0.2 + 0.08),
                                                          adm_mod.READY_MISS)
    assert adm.target > 40
    for _ in range(200):
        rig.busy_window(adm)
    assert adm.target == 19 + ahead  # forgotten once calm


def test_the_adaptive_rule_reads_one_steps_finishes_ahead_at_256_slots(rig: Rig) -> None:
    """An H200 at 256 slots: 13 ms steps, ~72 jobs/s finishing. The refill window's quantile
    is at or below the headroom of 8 there, so the rule used to hold exactly slots + 8 and
    read each replacement only after its job finished (refill p99 3.4 ms: a Redis round trip
    and the loop's delays). Holding one step's finishes more (0.99 quantile of ~0.94 a step:
    4) has the replacement already in the engine when a job finishes."""
    import worker.admission as adm_mod

    adm = rig.admission(max_num_seqs=256, headroom=8)
    for _ in range(30):  # windows of 0.26 s: 20 steps of 13 ms, 19 jobs finishing (73/s)
        rig.full_window(adm, seconds=0.26, finished=19, steps=20, slots=256, waiting=8,
                        read_s=0.002)
    window = adm.read_s + adm.wake_s + adm_mod.REFILL_STEPS * adm.step_s
    assert adm_mod.poisson_quantile(adm.finish_per_s * window, adm_mod.READY_MISS) <= 8
    assert adm.target == 8 + 4
    assert adm.want(264, 0, iter([])) == 4
    fixed = rig.admission(max_num_seqs=256, headroom=8, admission="fixed")
    assert fixed.want(264, 0, iter([])) == 0  # the fixed rule is unchanged
