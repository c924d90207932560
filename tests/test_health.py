"""The health state machine of one actor: examples with exact times, then a stateful model check."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from relayrace._failure import Category, Failure
from relayrace._policy import NO_PENALTY, HealthPolicy
from relayrace.actors import Deployments
from relayrace.actors._health import Health, HealthSnapshot, State

C = Category
COUNTED = [C.PROVIDER_5XX, C.TIMEOUT, C.NETWORK, C.STREAM_ERROR, C.UNKNOWN]


def fail(category: Category, retry_after: float | None = None) -> Failure:
    return Failure(category=category, retry_after=retry_after)


def trip(health: Health, now: float) -> float:
    """Bench a default-policy actor by reaching the threshold at ``now``; return the bench end."""
    until = None
    for _ in range(health.policy.failure_threshold):
        until = health.record_failure(fail(C.PROVIDER_5XX), now, probe=False)
    assert until is not None
    return until


# --- fresh state ---------------------------------------------------------------------------


def test_fresh_actor_is_ok_and_available() -> None:
    health = Health(HealthPolicy())
    assert health.state(0.0) is State.OK
    assert health.available(0.0)
    assert health.next_change() == math.inf
    assert health.begin_attempt(0.0) is False


# --- the threshold and the exponential cooldown -----------------------------------------------


@pytest.mark.parametrize("category", COUNTED)
def test_threshold_benches_for_cooldown_base(category: Category) -> None:
    health = Health(HealthPolicy())  # threshold 3, base 5
    assert health.record_failure(fail(category), 10.0, probe=False) is None
    assert health.record_failure(fail(category), 11.0, probe=False) is None
    assert health.consecutive_failures == 2
    assert health.state(11.0) is State.OK
    assert health.record_failure(fail(category), 12.0, probe=False) == 17.0
    assert health.state(16.9) is State.BENCHED
    assert not health.available(16.9)
    assert health.next_change() == 17.0
    assert health.state(17.0) is State.PROBING
    assert health.next_change() == math.inf
    assert health.bench_count == 1


def test_success_resets_the_count_before_the_threshold() -> None:
    health = Health(HealthPolicy())
    health.record_failure(fail(C.TIMEOUT), 0.0, probe=False)
    health.record_failure(fail(C.TIMEOUT), 0.0, probe=False)
    assert health.record_success(1.0, probe=False) is False
    assert health.consecutive_failures == 0
    health.record_failure(fail(C.TIMEOUT), 2.0, probe=False)
    assert health.record_failure(fail(C.TIMEOUT), 2.0, probe=False) is None
    assert health.state(2.0) is State.OK


def test_failed_probes_double_the_bench_up_to_the_cap() -> None:
    # probe_interval as long as the cap: the plain doubling curve.
    health = Health(HealthPolicy(cooldown_base=5.0, cooldown_cap=30.0, probe_interval=30.0))
    now = trip(health, 0.0)
    assert now == 5.0
    ends = []
    for _ in range(4):
        assert health.state(now) is State.PROBING
        assert health.begin_attempt(now) is True
        until = health.record_failure(fail(C.PROVIDER_5XX), now, probe=True)
        assert until is not None
        ends.append(until - now)
        now = until
    assert ends == [10.0, 20.0, 30.0, 30.0]
    assert health.bench_count == 5


def _probe_failures(policy: HealthPolicy, count: int) -> list[float]:
    health = Health(policy)
    now = trip(health, 0.0)
    lengths = [now]
    for _ in range(count):
        assert health.begin_attempt(now) is True
        until = health.record_failure(fail(C.PROVIDER_5XX), now, probe=True)
        assert until is not None
        lengths.append(until - now)
        now = until
    return lengths


def test_by_default_a_provider_that_stays_down_is_probed_every_probe_interval() -> None:
    # The first bench is the base (5 s); after a failed probe the bench never passes
    # probe_interval (4 s): a provider that stays down is probed every 4 s, and is back in use
    # within 5 s of recovering if a request comes within a second of the bench's end.
    assert HealthPolicy().probe_interval == 4.0
    assert _probe_failures(HealthPolicy(), 6) == [5.0] + [4.0] * 6


@pytest.mark.parametrize(
    ("base", "interval", "cap", "expected"),
    [
        (1.0, 5.0, 300.0, [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]),  # doubles up to the interval
        (30.0, 4.0, 300.0, [30.0, 4.0, 4.0, 4.0, 4.0, 4.0]),  # a long first bench, then probes
        (1.0, 60.0, 3.0, [1.0, 2.0, 3.0, 3.0, 3.0, 3.0]),  # the cap still caps
    ],
)
def test_the_bench_curve_stops_doubling_at_probe_interval(
    base: float, interval: float, cap: float, expected: list[float]
) -> None:
    policy = HealthPolicy(cooldown_base=base, probe_interval=interval, cooldown_cap=cap)
    assert _probe_failures(policy, 5) == expected
    assert [policy.cooldown(n) for n in range(1, 7)] == expected


def test_with_active_probes_no_job_is_the_probe_before_the_actors_own() -> None:
    health = Health(HealthPolicy(), active_probes=True)
    end = trip(health, 0.0)
    # The bench ended, the actor's probe has not begun: a job neither probes nor is routed.
    assert health.state(end) is State.PROBING
    assert health.active_probe_due(end)
    assert not health.available(end) and health.begin_attempt(end) is False
    assert health.begin_active_probe(end) is True
    assert not health.active_probe_due(end) and not health.available(end)
    # It failed: benched for the next interval, and probed by the actor again at its end.
    assert health.record_failure(fail(C.NETWORK), end, probe=True) == end + 4.0
    assert health.begin_attempt(end + 4.0) is False
    assert health.begin_active_probe(end + 4.0) is True
    # It answered a completion: OK at once.
    assert health.record_success(end + 6.0, probe=True) is True
    assert health.state(end + 6.0) is State.OK and health.available(end + 6.0)
    # Only reachable (a model list): the next job decides, as with passive probes.
    end = trip(health, 100.0)
    assert health.begin_active_probe(end) is True
    health.record_reachable(probe=True)
    assert health.available(end) and health.begin_attempt(end) is True


def test_an_active_probe_is_only_for_a_bench_for_failures() -> None:
    # After the threshold or a failed probe: the actor may probe by itself.
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    assert health.begin_active_probe(end - 1.0) is False  # still benched
    assert health.begin_active_probe(end) is True
    assert health.probe_in_flight and not health.available(end)
    # A probe that only reached the provider (its model list) leaves the next job to decide.
    health.record_reachable(probe=True)
    assert health.state(end) is State.PROBING and health.available(end)
    assert health.begin_attempt(end) is True
    # A wait the provider sent, or an immediate bench: a cheap request would not settle it.
    for failure in (fail(C.RATE_LIMIT, retry_after=7.0), fail(C.AUTH)):
        other = Health(HealthPolicy())
        until = other.record_failure(failure, 0.0, probe=False)
        assert until is not None
        assert other.begin_active_probe(until) is False
        assert other.begin_attempt(until) is True  # the next job is the probe, as before
        # ...and when that probe fails, the next bench is for failures: probed actively.
        assert other.record_failure(fail(C.NETWORK), until, probe=True) == until + 4.0
        assert other.begin_active_probe(until + 4.0) is True


def test_failed_probe_rebenches_whatever_the_threshold() -> None:
    health = Health(HealthPolicy(failure_threshold=10))
    assert health.record_failure(fail(C.AUTH), 0.0, probe=False) == 600.0  # streak 1
    assert health.consecutive_failures == 0
    assert health.begin_attempt(600.0) is True
    # One counted failure, far below the threshold, but it was the probe: 5 * 2 ** 1, capped
    # by probe_interval (4 s).
    assert health.record_failure(fail(C.NETWORK), 600.0, probe=True) == 604.0
    assert health.state(603.0) is State.BENCHED


def test_successful_probe_recovers_and_resets_the_streak() -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    assert health.begin_attempt(end) is True
    assert health.record_failure(fail(C.TIMEOUT), end, probe=True) == end + 4.0
    end += 4.0
    assert health.begin_attempt(end) is True
    assert health.record_success(end + 1.0, probe=True) is True
    assert health.state(end + 1.0) is State.OK
    assert health.consecutive_failures == 0
    assert health.bench_count == 0
    assert not health.probe_in_flight
    # The streak starts again at 1.
    assert trip(health, 100.0) == 105.0


# --- categories with their own bench ---------------------------------------------------------


def test_immediate_categories_bench_long_at_once() -> None:
    health = Health(HealthPolicy(long_bench=600.0))
    assert health.record_failure(fail(C.AUTH), 1.0, probe=False) == 601.0
    assert health.state(600.0) is State.BENCHED
    assert health.consecutive_failures == 0

    # A provider's longer wait wins over long_bench, up to cooldown_cap.
    health = Health(HealthPolicy(long_bench=600.0, cooldown_cap=1000.0))
    assert health.record_failure(fail(C.QUOTA_EXHAUSTED, 900.0), 0.0, probe=False) == 900.0

    health = Health(HealthPolicy(long_bench=600.0))
    assert health.record_failure(fail(C.QUOTA_EXHAUSTED, 10.0), 0.0, probe=False) == 600.0


def test_bench_immediately_is_configurable() -> None:
    health = Health(HealthPolicy(bench_immediately=["provider_5xx"], long_bench=50.0))
    assert health.record_failure(fail(C.PROVIDER_5XX), 0.0, probe=False) == 50.0
    assert health.record_failure(fail(C.AUTH), 60.0, probe=False) is None
    assert health.consecutive_failures == 1


def test_rate_limit_with_retry_after_benches_for_it() -> None:
    health = Health(HealthPolicy())
    assert health.record_failure(fail(C.RATE_LIMIT, 30.0), 2.0, probe=False) == 32.0
    assert health.consecutive_failures == 0
    assert health.state(31.5) is State.BENCHED
    assert health.state(32.0) is State.PROBING


def test_rate_limit_without_retry_after_counts_like_a_5xx() -> None:
    health = Health(HealthPolicy())
    assert health.record_failure(fail(C.RATE_LIMIT), 0.0, probe=False) is None
    assert health.record_failure(fail(C.RATE_LIMIT, 0.0), 0.0, probe=False) is None
    assert health.consecutive_failures == 2
    assert health.record_failure(fail(C.RATE_LIMIT), 1.0, probe=False) == 6.0


def test_overloaded_benches_short_or_for_retry_after() -> None:
    health = Health(HealthPolicy(overload_bench=2.0))
    assert health.record_failure(fail(C.OVERLOADED), 10.0, probe=False) == 12.0
    assert health.consecutive_failures == 0

    health = Health(HealthPolicy(overload_bench=2.0))
    assert health.record_failure(fail(C.OVERLOADED, 7.0), 10.0, probe=False) == 17.0


@pytest.mark.parametrize("category", sorted(NO_PENALTY, key=lambda c: c.value))
def test_no_penalty_categories_change_nothing(category: Category) -> None:
    health = Health(HealthPolicy(failure_threshold=1))
    for t in range(5):
        assert health.record_failure(fail(category, 100.0), float(t), probe=False) is None
    assert health.consecutive_failures == 0
    assert health.bench_count == 0
    assert health.state(5.0) is State.OK


@pytest.mark.parametrize("category", sorted(NO_PENALTY, key=lambda c: c.value))
def test_no_penalty_probe_frees_the_slot_and_stays_probing(category: Category) -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    assert health.begin_attempt(end) is True
    assert not health.available(end)
    assert health.record_failure(fail(category), end + 1.0, probe=True) is None
    assert health.state(end + 1.0) is State.PROBING
    assert health.available(end + 1.0)
    assert health.bench_count == 1
    assert health.begin_attempt(end + 2.0) is True  # the next job probes


# --- benches are never shortened -------------------------------------------------------------


def test_a_shorter_bench_never_shortens_a_longer_one() -> None:
    health = Health(HealthPolicy(overload_bench=2.0))
    assert health.record_failure(fail(C.RATE_LIMIT, 60.0), 0.0, probe=False) == 60.0
    assert health.record_failure(fail(C.OVERLOADED), 1.0, probe=False) is None
    assert health.record_failure(fail(C.RATE_LIMIT, 5.0), 2.0, probe=False) is None
    assert health.next_change() == 60.0
    # A longer one extends it, without counting as a new bench in the streak.
    assert health.record_failure(fail(C.RATE_LIMIT, 70.0), 3.0, probe=False) == 73.0
    assert health.bench_count == 1
    assert health.state(72.0) is State.BENCHED


def test_failures_of_attempts_begun_before_the_bench_do_not_escalate_it() -> None:
    health = Health(HealthPolicy(failure_threshold=1))
    assert health.record_failure(fail(C.TIMEOUT), 0.0, probe=False) == 5.0
    assert health.record_failure(fail(C.TIMEOUT), 1.0, probe=False) is None
    assert health.record_failure(fail(C.TIMEOUT), 2.0, probe=False) is None
    assert health.bench_count == 1
    assert health.next_change() == 5.0


def test_success_during_a_bench_resets_counters_but_keeps_the_bench() -> None:
    health = Health(HealthPolicy())
    assert health.record_failure(fail(C.RATE_LIMIT, 20.0), 0.0, probe=False) == 20.0
    health.record_failure(fail(C.TIMEOUT), 1.0, probe=False)
    assert health.record_success(2.0, probe=False) is False
    assert health.state(19.0) is State.BENCHED
    assert health.consecutive_failures == 0
    assert health.bench_count == 0
    assert health.state(20.0) is State.PROBING
    assert health.begin_attempt(20.0) is True
    # The streak was reset, so the failed probe benches for the base again.
    assert health.record_failure(fail(C.TIMEOUT), 20.0, probe=True) == 25.0


def test_straggler_success_while_probing_recovers() -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    assert health.state(end) is State.PROBING
    assert health.record_success(end + 1.0, probe=False) is True
    assert health.state(end + 1.0) is State.OK


# --- one probe at a time -------------------------------------------------------------------


def test_exactly_one_probe_at_a_time() -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    assert health.available(end)
    assert health.begin_attempt(end) is True
    assert not health.available(end)
    assert health.begin_attempt(end) is False  # routed anyway (all benched): not a probe
    health.record_cancelled(probe=True)
    assert health.available(end + 1.0)
    assert health.state(end + 1.0) is State.PROBING
    assert health.begin_attempt(end + 1.0) is True


def test_cancelled_attempts_carry_no_penalty() -> None:
    health = Health(HealthPolicy(failure_threshold=1))
    health.begin_attempt(0.0)
    health.record_cancelled(probe=False)
    assert health.state(0.0) is State.OK
    assert health.consecutive_failures == 0


# --- manual bench ----------------------------------------------------------------------------


def test_manual_bench_for_seconds_then_back_to_ok() -> None:
    health = Health(HealthPolicy())
    health.bench(10.0, 100.0)
    assert health.state(109.0) is State.BENCHED
    assert not health.available(109.0)
    assert health.next_change() == 110.0
    assert health.state(110.0) is State.OK
    assert health.next_change() == math.inf


def test_manual_bench_until_unbench() -> None:
    health = Health(HealthPolicy())
    health.bench(0.0, None)
    assert health.next_change() == math.inf
    assert health.state(1e9) is State.BENCHED
    assert health.record_success(1e9, probe=False) is False
    assert health.state(1e9) is State.BENCHED
    health.unbench()
    assert health.state(1e9) is State.OK


def test_manual_bench_is_never_shortened() -> None:
    health = Health(HealthPolicy())
    health.bench(0.0, 100.0)
    health.bench(1.0, 10.0)
    assert health.next_change() == 100.0
    health.bench(2.0, 200.0)
    assert health.next_change() == 202.0
    # Automatic logic neither shortens nor lifts it.
    assert health.record_failure(fail(C.OVERLOADED), 3.0, probe=False) == 5.0
    assert health.state(150.0) is State.BENCHED
    assert health.snapshot(150.0, "a", 0).benched_until == 202.0


def test_automatic_bench_outlasting_a_manual_one() -> None:
    health = Health(HealthPolicy())
    health.bench(0.0, 10.0)
    assert health.record_failure(fail(C.AUTH), 0.0, probe=False) == 600.0
    assert health.next_change() == 600.0
    assert health.state(100.0) is State.BENCHED
    assert health.state(600.0) is State.PROBING


def test_manual_bench_over_probing_returns_to_probing() -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    health.bench(end, 10.0)
    assert health.state(end) is State.BENCHED
    assert health.begin_attempt(end) is False
    assert health.state(end + 10.0) is State.PROBING
    assert health.begin_attempt(end + 10.0) is True


def test_unbench_lifts_everything_and_resets_counters() -> None:
    health = Health(HealthPolicy())
    health.bench(0.0, None)
    trip(health, 0.0)
    health.record_failure(fail(C.TIMEOUT), 0.0, probe=False)
    health.unbench()
    assert health.state(0.0) is State.OK
    assert health.next_change() == math.inf
    assert health.consecutive_failures == 0
    assert health.bench_count == 0
    assert trip(health, 1.0) == 6.0  # the streak starts again at 1


def test_unbench_keeps_a_running_probe_marked() -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    assert health.begin_attempt(end) is True
    health.unbench()
    assert health.available(end)
    assert health.probe_in_flight
    # Its failure counts as an ordinary attempt's now: no re-bench below the threshold.
    assert health.record_failure(fail(C.TIMEOUT), end, probe=True) is None
    assert not health.probe_in_flight


def test_bench_rejects_negative_seconds() -> None:
    health = Health(HealthPolicy())
    with pytest.raises(ValueError, match="bench seconds"):
        health.bench(0.0, -1.0)
    with pytest.raises(ValueError, match="bench seconds"):
        health.bench(0.0, math.nan)


# --- exempt actors and the benched-share cap ---------------------------------------------------


def test_exempt_actor_counts_but_is_never_benched() -> None:
    health = Health(HealthPolicy(), exempt=True)
    for category in (C.AUTH, C.OVERLOADED, C.PROVIDER_5XX, C.PROVIDER_5XX, C.PROVIDER_5XX):
        assert health.record_failure(fail(category, 30.0), 0.0, probe=False) is None
    assert health.consecutive_failures == 3
    health.bench(0.0, None)  # ignored: exempt actors never cool down
    assert health.state(0.0) is State.OK
    assert health.available(0.0)
    assert health.next_change() == math.inf


def test_may_bench_false_counts_without_benching() -> None:
    health = Health(HealthPolicy())
    for _ in range(3):
        assert health.record_failure(fail(C.NETWORK), 0.0, probe=False, may_bench=False) is None
    assert health.record_failure(fail(C.AUTH), 0.0, probe=False, may_bench=False) is None
    assert health.state(0.0) is State.OK
    assert health.consecutive_failures == 3
    # Once the cap allows it, the next counted failure benches at once.
    assert health.record_failure(fail(C.NETWORK), 1.0, probe=False) == 6.0


def test_failed_probe_under_the_cap_stays_probing() -> None:
    health = Health(HealthPolicy())
    end = trip(health, 0.0)
    health.begin_attempt(end)
    assert health.record_failure(fail(C.TIMEOUT), end, probe=True, may_bench=False) is None
    assert health.state(end) is State.PROBING
    assert health.available(end)


# --- next_change and snapshots -----------------------------------------------------------------


def test_next_change_in_the_past_settles_on_the_next_call() -> None:
    health = Health(HealthPolicy())
    trip(health, 0.0)
    assert health.next_change() == 5.0
    assert health.state(8.0) is State.PROBING
    assert health.next_change() == math.inf


def test_snapshot_and_to_dict() -> None:
    health = Health(HealthPolicy())
    trip(health, 0.0)
    snap = health.snapshot(1.0, "openai", 2)
    assert snap == HealthSnapshot(
        name="openai",
        state=State.BENCHED,
        benched_until=5.0,
        consecutive_failures=3,
        manual=False,
        in_flight=2,
        probe_in_flight=False,
        bench_count=1,
        exempt=False,
        provider_state=State.BENCHED,
    )
    assert not snap.serving
    assert snap.to_dict() == {
        "name": "openai",
        "state": "benched",
        "benched_until": 5.0,
        "consecutive_failures": 3,
        "manual": False,
        "in_flight": 2,
        "probe_in_flight": False,
        "bench_count": 1,
        "exempt": False,
        "gave_up_until": None,
        "provider_state": "benched",
        "serving": False,
        "bench_reason": None,
        "benched_by": None,
        "deployments": {},
    }
    assert health.snapshot(5.0, "openai", 0).benched_until is None

    health.bench(6.0, None)
    forever = health.snapshot(6.0, "openai", 0)
    assert forever.benched_until == math.inf
    assert forever.manual
    assert forever.to_dict()["benched_until"] is None
    assert forever.to_dict()["state"] == "benched"


# --- the stateful check against a tiny model ---------------------------------------------------


@attrs.define
class Model:
    """The rules of DESIGN.md, written from the times rather than from settled state."""

    policy: HealthPolicy
    exempt: bool
    active: bool = False  # the actor probes by itself after a bench for failures
    fails: int = 0
    streak: int = 0
    auto_end: float | None = None  # end of the last automatic bench, until a success after it
    manual_end: float | None = None
    probe_out: bool = False
    failing: bool = False  # the last automatic bench was for failures (threshold, probe)

    def auto_state(self, now: float) -> State:
        if self.auto_end is None:
            return State.OK
        return State.BENCHED if now < self.auto_end else State.PROBING

    def state(self, now: float) -> State:
        if self.manual_end is not None and now < self.manual_end:
            return State.BENCHED
        return self.auto_state(now)

    def next_change(self, now: float) -> float:
        ends = [e for e in (self.manual_end, self.auto_end) if e is not None and e > now]
        return max(ends, default=math.inf)

    def waiting_for_active(self) -> bool:
        return self.active and self.failing

    def begin(self, now: float) -> bool:
        if (
            self.state(now) is State.PROBING
            and not self.probe_out
            and not self.waiting_for_active()
        ):
            self.probe_out = True
            return True
        return False

    def begin_active(self, now: float) -> bool:
        if self.failing and self.state(now) is State.PROBING and not self.probe_out:
            self.failing = False
            self.probe_out = True
            return True
        return False

    def end_probe(self, probe: bool) -> bool:
        was = probe and self.probe_out
        if was:
            self.probe_out = False
        return was

    def success(self, now: float, probe: bool) -> bool:
        recovered = self.state(now) is State.PROBING
        self.end_probe(probe)
        self.fails = self.streak = 0
        self.failing = False
        if self.auto_end is not None and now >= self.auto_end:
            self.auto_end = None
        return recovered

    def failure(
        self, category: Category, retry_after: float | None, now: float, probe: bool, may: bool
    ) -> float | None:
        probe = self.end_probe(probe)
        if category in NO_PENALTY:
            return None
        p = self.policy
        ra = min(retry_after, p.cooldown_cap) if retry_after and retry_after > 0 else None
        own: float | None = None
        if category in p.bench_immediately:
            own = max(p.long_bench, ra or 0.0)
        elif category is C.RATE_LIMIT and ra:
            own = ra
        elif category is C.OVERLOADED:
            own = ra or p.overload_bench
        else:
            self.fails += 1
        if self.exempt or not may:
            return None
        auto = self.auto_state(now)
        lengths = [] if own is None else [own]
        escalated = auto is not State.BENCHED and (
            (probe and auto is State.PROBING)
            or (own is None and self.fails >= p.failure_threshold)
        )
        if escalated:
            length = min(p.cooldown_cap, p.cooldown_base * 2**self.streak)
            if self.streak >= 1:  # a bench after a bench: at most probe_interval
                length = min(length, p.probe_interval)
            lengths.append(length)
        if not lengths:
            return None
        end = now + max(lengths)
        if auto is State.BENCHED:
            assert self.auto_end is not None
            if end <= self.auto_end:
                return None
        else:
            self.streak += 1
        self.auto_end = end
        self.failing = escalated
        return end

    def bench(self, now: float, seconds: float | None) -> None:
        if self.exempt or seconds == 0:
            return
        end = math.inf if seconds is None else now + seconds
        if self.manual_end is None or end > self.manual_end:
            self.manual_end = end

    def unbench(self) -> None:
        self.fails = self.streak = 0
        self.auto_end = self.manual_end = None
        self.failing = False


RETRY_AFTERS = st.none() | st.sampled_from([0.0, 1.0, 3.0, 30.0, 900.0])
MAY_BENCH = st.sampled_from([True, True, True, False])


class HealthMachine(RuleBasedStateMachine):
    """Random failures, successes, probes, cancels, manual benches and time, against the model."""

    health: Health
    model: Model

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.attempts: list[bool] = []  # one entry per attempt in flight: was it the probe
        self.promised_auto = -math.inf  # the latest automatic bench end ever reported
        self.promised_manual = -math.inf  # the latest manual bench end asked for
        self.last_until: float | None = None  # the previous snapshot's benched_until

    @initialize(
        threshold=st.integers(1, 4),
        base=st.sampled_from([1.0, 5.0]),
        cap=st.sampled_from([8.0, 40.0, 300.0]),
        interval=st.sampled_from([2.0, 5.0, 300.0]),
        long_bench=st.sampled_from([30.0, 600.0]),
        immediate=st.sampled_from([("auth", "quota_exhausted"), ("auth",), ("provider_5xx",)]),
        exempt=st.booleans(),
        active=st.booleans(),
    )
    def setup(
        self,
        threshold: int,
        base: float,
        cap: float,
        interval: float,
        long_bench: float,
        immediate: tuple[str, ...],
        exempt: bool,
        active: bool,
    ) -> None:
        policy = HealthPolicy(
            failure_threshold=threshold,
            cooldown_base=base,
            cooldown_cap=cap,
            probe_interval=interval,
            long_bench=long_bench,
            bench_immediately=immediate,
            overload_bench=2.0,
        )
        self.health = Health(policy, exempt=exempt, active_probes=active)
        self.model = Model(policy, exempt, active)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 40.0, 300.0, 700.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: len(self.attempts) < 5)
    @rule()
    def begin(self) -> None:
        probe = self.health.begin_attempt(self.now)
        assert probe == self.model.begin(self.now)
        self.attempts.append(probe)

    @precondition(lambda self: len(self.attempts) < 5)
    @rule()
    def begin_active_probe(self) -> None:
        probe = self.health.begin_active_probe(self.now)
        assert probe == self.model.begin_active(self.now)
        if probe:
            self.attempts.append(probe)

    @precondition(lambda self: self.attempts)
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        probe = self.attempts.pop(data.draw(st.integers(0, len(self.attempts) - 1)))
        recovered = self.health.record_success(self.now, probe=probe)
        assert recovered == self.model.success(self.now, probe)

    def _fail(
        self, probe: bool, category: Category, retry_after: float | None, may_bench: bool
    ) -> None:
        until = self.health.record_failure(
            Failure(category=category, retry_after=retry_after),
            self.now,
            probe=probe,
            may_bench=may_bench,
        )
        expected = self.model.failure(category, retry_after, self.now, probe, may_bench)
        assert until == expected
        if until is not None:
            assert until > self.now
            self.promised_auto = max(self.promised_auto, until)

    @precondition(lambda self: self.attempts)
    @rule(
        data=st.data(),
        category=st.sampled_from(list(Category)),
        retry_after=RETRY_AFTERS,
        may_bench=MAY_BENCH,
    )
    def failed(
        self,
        data: st.DataObject,
        category: Category,
        retry_after: float | None,
        may_bench: bool,
    ) -> None:
        probe = self.attempts.pop(data.draw(st.integers(0, len(self.attempts) - 1)))
        self._fail(probe, category, retry_after, may_bench)

    @rule(category=st.sampled_from([*COUNTED, C.RATE_LIMIT]), may_bench=MAY_BENCH)
    def job_fails_counted(self, category: Category, may_bench: bool) -> None:
        # A whole job that starts and fails at once with a failure that counts toward the
        # threshold: the common way to reach a bench.
        probe = self.health.begin_attempt(self.now)
        assert probe == self.model.begin(self.now)
        self._fail(probe, category, None, may_bench)

    @precondition(lambda self: self.attempts)
    @rule(data=st.data())
    def cancelled(self, data: st.DataObject) -> None:
        probe = self.attempts.pop(data.draw(st.integers(0, len(self.attempts) - 1)))
        self.health.record_cancelled(probe=probe)
        self.model.end_probe(probe)

    # The operator acts rarely: bench only when no manual bench is on, unbench only a sick actor.
    @precondition(lambda self: self.now >= self.promised_manual)
    @rule(seconds=st.none() | st.sampled_from([0.0, 1.0, 10.0, 100.0]))
    def manual_bench(self, seconds: float | None) -> None:
        self.health.bench(self.now, seconds)
        self.model.bench(self.now, seconds)
        if not self.health.exempt and seconds != 0:
            end = math.inf if seconds is None else self.now + seconds
            self.promised_manual = max(self.promised_manual, end)

    @precondition(lambda self: self.health.state(self.now) is not State.OK)
    @rule()
    def unbench(self) -> None:
        self.health.unbench()
        self.model.unbench()
        self.promised_auto = self.promised_manual = -math.inf
        self.last_until = None

    @invariant()
    def agrees_with_the_model(self) -> None:
        now = self.now
        state = self.health.state(now)
        assert state is self.model.state(now)
        assert self.health.next_change() == self.model.next_change(now)
        snap = self.health.snapshot(now, "a", len(self.attempts))
        assert snap.consecutive_failures == self.model.fails
        assert snap.bench_count == self.model.streak
        assert snap.probe_in_flight == self.model.probe_out
        assert snap.manual == (self.model.manual_end is not None and now < self.model.manual_end)
        available = self.health.available(now)
        assert available == (
            state is State.OK
            or (
                state is State.PROBING
                and not self.model.probe_out
                and not self.model.waiting_for_active()
            )
        )

    @invariant()
    def a_bench_never_ends_earlier_than_reported(self) -> None:
        now = self.now
        snap = self.health.snapshot(now, "a", 0)
        for promised in (self.promised_auto, self.last_until):
            if promised is not None and now < promised:
                assert snap.state is State.BENCHED
                assert snap.benched_until is not None
                assert snap.benched_until >= promised
        self.last_until = snap.benched_until

    @invariant()
    def manual_bench_is_not_shortened(self) -> None:
        if self.now < self.promised_manual:
            snap = self.health.snapshot(self.now, "a", 0)
            assert snap.manual
            assert snap.benched_until is not None
            assert snap.benched_until >= self.promised_manual

    @invariant()
    def exempt_is_never_benched(self) -> None:
        if self.health.exempt:
            assert self.health.state(self.now) is State.OK
            assert self.health.bench_count == 0

    @invariant()
    def at_most_one_probe_in_flight(self) -> None:
        probes = sum(self.attempts)
        assert probes <= 1
        assert probes == int(self.health.probe_in_flight)


HealthMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHealthMachine = HealthMachine.TestCase


# --- provider-sent waits are capped (#11 row 5) ----------------------------------------------


@pytest.mark.parametrize("category", [C.RATE_LIMIT, C.OVERLOADED])
@pytest.mark.parametrize("retry_after", [99_999_999.0, 251_606_169_464.0, math.inf])
def test_a_provider_sent_wait_benches_for_at_most_cooldown_cap(
    category: Category, retry_after: float
) -> None:
    health = Health(HealthPolicy(cooldown_cap=300.0))
    assert health.record_failure(fail(category, retry_after), 10.0, probe=False) == 310.0
    assert health.snapshot(10.0, "a", 0).benched_until == 310.0
    assert health.state(309.9) is State.BENCHED
    assert health.state(310.0) is State.PROBING


def test_a_provider_sent_wait_under_the_cap_is_honoured_as_sent() -> None:
    health = Health(HealthPolicy(cooldown_cap=300.0))
    assert health.record_failure(fail(C.RATE_LIMIT, 42.0), 0.0, probe=False) == 42.0


def test_a_provider_sent_wait_does_not_stretch_an_immediate_bench_past_long_bench() -> None:
    health = Health(HealthPolicy(long_bench=600.0, cooldown_cap=300.0))
    assert health.record_failure(fail(C.AUTH, 99_999_999.0), 0.0, probe=False) == 600.0


def test_a_nan_wait_is_no_wait() -> None:
    health = Health(HealthPolicy())
    assert health.record_failure(fail(C.RATE_LIMIT, math.nan), 0.0, probe=False) is None


def test_a_manual_bench_is_not_capped_by_cooldown_cap() -> None:
    health = Health(HealthPolicy(cooldown_cap=300.0))
    health.bench(0.0, 99_999_999.0)
    assert health.snapshot(0.0, "a", 0).benched_until == 99_999_999.0
    health.bench(0.0, None)
    assert health.state(1e12) is State.BENCHED


# --- the recovery keys in a config --------------------------------------------------------------


def _health_config(**health: object) -> dict:
    return {
        "providers": [{"name": "a", "kind": "scripted"}],
        "policies": {"health": dict(health)},
    }


def test_probe_interval_is_read_from_policies_health() -> None:
    from relayrace import load_config

    assert load_config(_health_config()).policies.health.probe_interval == 4.0
    cfg = load_config(_health_config(probe_interval=2.5, cooldown_base=1))
    assert cfg.policies.health.probe_interval == 2.5
    assert [cfg.policies.health.cooldown(n) for n in (1, 2, 3)] == [1.0, 2.0, 2.5]


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_a_bad_probe_interval_names_its_key(value: object) -> None:
    from relayrace import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"policies\.health\.probe_interval"):
        load_config(_health_config(probe_interval=value))


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "mock"])
@pytest.mark.parametrize("probe", [None, "models", "completion", "off"])
def test_probe_is_read_from_the_provider_table(kind: str, probe: str | None) -> None:
    from relayrace import load_config

    table: dict[str, object] = {"name": "a", "kind": kind}
    if probe is not None:
        table["probe"] = probe
    (provider,) = load_config({"providers": [table]}).providers
    assert provider.client.probe_mode == (probe or "models")  # type: ignore[attr-defined]


def test_a_bad_probe_names_its_key() -> None:
    from relayrace import ConfigError, load_config

    data = {"providers": [{"name": "a", "kind": "openai", "probe": "billed"}]}
    with pytest.raises(ConfigError, match=r"providers\[0\]\.probe: expected one of"):
        load_config(data)


# --- deployments: the LRU cap ---------------------------------------------------------------


class DeploymentCap(RuleBasedStateMachine):
    """``Deployments`` against a tiny model: never more records than the cap (but for manual
    benches, which go over it), and a record that is not healthy is never evicted."""

    CAP = 3
    MODELS = st.sampled_from([f"m{i}" for i in range(7)])

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.deployments = Deployments(HealthPolicy(), cap=self.CAP)
        self.manual: set[str] = set()  # kept over the cap by a manual bench

    def unhealthy(self) -> set[str]:
        return {
            m for m, h in self.deployments if h.state(self.now) is not State.OK or h.manual
        }

    def use(self, model: str) -> Health:
        before = self.unhealthy()
        kept = self.deployments.get(model) is not None
        health = self.deployments.use(model, self.now)
        after = {m for m, _ in self.deployments}
        assert before <= after  # no unhealthy record was evicted
        if kept:
            assert self.deployments.get(model) is health
            assert [m for m, _ in self.deployments][-1] == model  # most recently used
        else:  # a new one: within the cap, or not kept because every record is unhealthy
            assert len(after) <= self.CAP or (model not in after and after == before)
        return health

    @rule(model=MODELS)
    def serve(self, model: str) -> None:
        self.use(model).record_success(self.now, probe=False)

    @rule(model=MODELS)
    def fail(self, model: str) -> None:
        health = self.use(model)
        for _ in range(3):
            health.record_failure(fail(C.PROVIDER_5XX), self.now, probe=False)

    @rule(model=MODELS)
    def bench(self, model: str) -> None:
        if self.deployments.get(model) is None and len(self.deployments) >= self.CAP:
            self.manual.add(model)
        self.deployments.use(model, self.now, keep=True).bench(self.now, 30.0)
        assert self.deployments.get(model) is not None

    @rule(dt=st.sampled_from([1.0, 5.0, 40.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def over_the_cap_only_by_benches(self) -> None:
        # Over the cap only by manual benches (the oldest of which may have ended since).
        assert len(self.deployments) <= self.CAP + len(self.manual)


TestDeploymentCap = DeploymentCap.TestCase
TestDeploymentCap.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
