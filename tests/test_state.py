"""The state engine without Redis: the merge rules, the mirror, the local backend, the retry
window and the ``[state]`` table."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import relayrace.state
from relayrace import ConfigError, ConfigErrors, RetryBudgetPolicy
from relayrace._table import Problems, Table
from relayrace.state import (
    BenchRecord,
    Deployment,
    LearnedLimits,
    LocalState,
    Mirror,
    RetryWindow,
    StateBackend,
    StateConfig,
    merge_bench,
    open_state,
    parse_state_config,
)

GPT = Deployment("openai", "gpt-4o")
NOW = 1_000_000.0

benches = st.builds(
    BenchRecord,
    until=st.floats(NOW - 100, NOW + 1000),
    reason=st.sampled_from(["5xx", "timeout", "operator"]),
    manual=st.booleans(),
)


@given(st.lists(benches, min_size=1, max_size=8))
def test_merging_never_shortens_nor_lifts_a_manual_bench(records: list[BenchRecord]) -> None:
    merged: BenchRecord | None = None
    for record in records:
        merged = merge_bench(merged, record, NOW)
    assert merged is not None
    active = [r for r in records if r.active(NOW)]
    if active:
        assert merged.until >= max(r.until for r in active)
        assert merged.manual == any(r.manual for r in active)


@given(benches, benches)
def test_merging_is_order_independent_for_active_benches(a: BenchRecord, b: BenchRecord) -> None:
    if a.active(NOW) and b.active(NOW):
        one, two = merge_bench(a, b, NOW), merge_bench(b, a, NOW)
        assert (one.until, one.manual) == (two.until, two.manual)


def test_an_expired_bench_is_replaced_not_merged() -> None:
    old = BenchRecord(until=NOW - 1, reason="old")
    new = BenchRecord(until=NOW + 5, reason="new")
    assert merge_bench(old, new, NOW) == new


def test_a_provider_wide_bench_covers_its_deployments() -> None:
    mirror = Mirror()
    mirror.merge_bench(GPT.provider_wide.field, BenchRecord(until=NOW + 30, reason="auth"), NOW)
    mirror.merge_bench(GPT.field, BenchRecord(until=NOW + 10, reason="5xx"), NOW)
    assert mirror.bench(GPT, NOW) == BenchRecord(until=NOW + 30, reason="auth")
    assert mirror.bench(Deployment("openai", "o3"), NOW) == BenchRecord(
        until=NOW + 30, reason="auth"
    )
    assert mirror.bench(Deployment("anthropic", "claude"), NOW) is None
    assert mirror.bench(GPT, NOW + 31) is None


def test_deployment_fields_round_trip() -> None:
    assert Deployment.from_field(GPT.field) == GPT
    assert Deployment.from_field(GPT.provider_wide.field) == Deployment("openai")
    assert Deployment.from_field(Deployment("p", "meta/llama:3").field) == Deployment(
        "p", "meta/llama:3"
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_the_local_backend_benches_and_unbenches() -> None:
    clock = Clock()
    state = LocalState(wall_clock=clock)
    assert isinstance(state, StateBackend)
    state.bench(GPT, until=NOW + 60, reason="5xx")
    assert state.bench(GPT, until=NOW + 5, reason="short").until == NOW + 60
    assert state.unbench(GPT)
    assert state.mirror.bench(GPT, NOW) is None
    state.bench(GPT, until=NOW + 1, reason="operator", manual=True)
    assert not state.unbench(GPT)
    clock.now += 3600
    assert state.mirror.bench(GPT, clock.now) is not None  # manual: until an explicit unbench
    assert state.unbench(GPT, manual=True)
    assert state.mirror.bench(GPT, clock.now) is None


def test_failure_counts_reset_on_success() -> None:
    state = LocalState(wall_clock=Clock())
    assert [state.record_failure(GPT) for _ in range(3)] == [1, 2, 3]
    state.record_success(GPT)
    assert state.mirror.failure_count(GPT) == 0


async def test_the_local_probe_lease_is_exclusive_and_expires() -> None:
    clock = Clock()
    one = LocalState(wall_clock=clock, instance="one")
    assert await one.acquire_probe(GPT, ttl=5)
    assert one.mirror.probe(GPT, clock.now) is not None
    one.release_probe(GPT)
    assert one.mirror.probe(GPT, clock.now) is None


def test_the_retry_window_holds_ratio_times_requests_plus_floor() -> None:
    window = RetryWindow(RetryBudgetPolicy(ratio=0.5, floor=2, window=10.0))
    for _ in range(10):
        window.record_request(NOW)
    assert sum(window.try_spend(NOW) for _ in range(20)) == 7
    # The window slides: after it has passed, only the floor is left.
    assert sum(window.try_spend(NOW + 11) for _ in range(20)) == 2
    # Two instances keeping windows of their own for one budget: each has half the floor.
    assert sum(window.try_spend(NOW + 22, share=2) for _ in range(20)) == 1


def test_admission_counts_rpm_tpm_and_learned_limits() -> None:
    clock = Clock()
    state = LocalState(wall_clock=clock)
    assert state.admit(GPT, tokens=600, rpm=2, tpm=1000)
    assert not state.admit(GPT, tokens=600, rpm=2, tpm=1000)  # tpm
    assert state.admit(GPT, tokens=100, rpm=2, tpm=1000)
    assert not state.admit(GPT, tokens=1, rpm=2)  # rpm
    state.reconcile(GPT, estimated=100, actual=40)
    assert state.mirror.usage_of(GPT, clock.now).tokens == 640
    clock.now += 60  # a new minute
    assert state.admit(GPT, tokens=1, rpm=2)
    state.learn_limits(
        GPT, LearnedLimits(remaining_tokens=50, reset_at=clock.now + 10, observed_at=clock.now)
    )
    assert not state.admit(GPT, tokens=100)
    assert state.admit(GPT, tokens=10)
    clock.now += 11  # the provider's window reset
    assert state.admit(GPT, tokens=100)


def test_pins_expire() -> None:
    clock = Clock()
    state = LocalState(wall_clock=clock)
    state.pin("user-7", GPT, ttl=30)
    assert state.mirror.pin("user-7", clock.now) == GPT
    assert state.mirror.pin("user-7", clock.now + 31) is None


async def test_open_state_gives_the_local_backend_by_default() -> None:
    async with open_state(StateConfig()) as state:
        assert isinstance(state, LocalState)
        assert state.statistics().backend == "local"


def test_the_state_table_is_read_with_defaults() -> None:
    assert parse_state_config(Table({}, "state")) == StateConfig()
    assert StateConfig().is_default
    config = parse_state_config(
        Table(
            {
                "backend": "redis",
                "url": "rediss://:hunter2@cache:6380/1",
                "prefix": "gw",
                "sync_interval": 0.5,
            },
            "state",
        )
    )
    assert (config.backend, config.prefix, config.sync_interval) == ("redis", "gw", 0.5)
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"backend": "memcached"}, "state.backend"),
        ({"backend": "redis"}, "state.url"),
        ({"backend": "redis", "url": "http://:hunter2@cache"}, "state.url"),
        ({"sync_interval": 0}, "state.sync_interval"),
        ({"queue_size": 0}, "state.queue_size"),
        ({"backoff_min": 2.0, "backoff_max": 1.0}, "state.backoff_max"),
        ({"prefx": "gw"}, "state.prefx"),
    ],
)
def test_every_mistake_in_the_state_table_names_its_key(data: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_state_config(Table(data, "state"))
    assert caught.value.path == path
    assert "hunter2" not in str(caught.value)


def test_a_collector_gets_every_mistake_at_once() -> None:
    problems = Problems()
    config = parse_state_config(
        Table({"backend": "memcached", "sync_interval": -1, "x": 1}, "state", problems)
    )
    assert config == StateConfig()
    with pytest.raises(ConfigErrors) as caught:
        problems.raise_if_any()
    assert [p.path for p in caught.value.problems] == [
        "state.backend",
        "state.sync_interval",
        "state.x",
    ]


def test_the_config_value_validates_itself() -> None:
    with pytest.raises(ConfigError):
        StateConfig(backend="redis")
    with pytest.raises(ConfigError):
        StateConfig(backend="redis", url="memcached://x")


def test_importing_relayrace_does_not_import_coredis() -> None:
    code = "import sys, relayrace, relayrace.state; assert 'coredis' not in sys.modules, 'coredis'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_state_package_exports() -> None:
    assert relayrace.state.__all__ == sorted(relayrace.state.__all__)
    for name in relayrace.state.__all__:
        assert getattr(relayrace.state, name) is not None, name
    with pytest.raises(AttributeError):
        relayrace.state.nothing  # noqa: B018
