"""The ``latency`` strategy: the pure power-of-two picker on fake estimates, the estimates it
learns, its config, and traffic moving to the fast provider through a real supervisor."""

from __future__ import annotations

import collections
import random

import pytest

from relayrace import Action, Attempt, Config, ConfigError, Outcome, Route, Usage, load_config
from relayrace import open_supervisor as open_sup
from relayrace.supervisor import Estimate, LatencyBook, power_of_two
from relayrace.testing import Answer

from .support import request, scripted_provider

FAST = Estimate(0.1, 100.0, 10)
SLOW = Estimate(0.3, 33.0, 10)


def _pick(estimates, *, exploration=0.0, seed=0, prompt=0, output=256):
    return power_of_two(
        estimates,
        prompt_tokens=prompt,
        output_tokens=output,
        exploration=exploration,
        rng=random.Random(seed),
    )


@pytest.mark.parametrize("draw", range(50))
@pytest.mark.parametrize("order", [(FAST, SLOW), (SLOW, FAST)])
def test_two_candidates_without_exploration_always_pick_the_faster(draw, order):
    choice = _pick(list(order), seed=draw)
    assert order[choice.chosen] is FAST
    assert not choice.explored
    assert {choice.best, choice.other} == {0, 1}


def test_an_unmeasured_candidate_is_tried_first_and_ties_keep_priority_order():
    for seed in range(20):
        assert _pick([FAST, None], seed=seed).chosen == 1
        assert _pick([FAST, FAST], seed=seed).chosen == 0


def test_the_best_of_the_two_drawn_wins_among_many():
    estimates = [Estimate(0.1 * (k + 1), None, 5) for k in range(5)]
    for seed in range(200):
        choice = _pick(estimates, seed=seed)
        assert choice.chosen == min(choice.best, choice.other)  # lower score = lower index here
        assert choice.best != choice.other


def test_exploration_takes_another_candidate_at_about_its_share():
    picks = collections.Counter(
        _pick([FAST, SLOW], exploration=0.05, seed=seed).chosen for seed in range(4000)
    )
    assert 0.035 < picks[1] / 4000 < 0.065
    explored = [_pick([FAST, SLOW], exploration=1.0, seed=s) for s in range(50)]
    assert all(c.explored and c.chosen == 1 and c.best == 0 for c in explored)


def test_the_score_weighs_prompt_size_and_output_speed():
    quick_start = Estimate(0.1, 10.0, 5)  # starts fast, writes slowly
    quick_write = Estimate(0.5, 1000.0, 5)
    assert _pick([quick_start, quick_write], output=256).chosen == 1
    assert _pick([quick_start, quick_write], output=1).chosen == 0
    # A long prompt scales both times to first token alike: the order holds.
    assert _pick([FAST, SLOW], prompt=100_000).chosen == 0


def _attempt(started, first, ended, tokens):
    return Attempt(
        actor="a",
        number=1,
        outcome=Outcome.OK,
        failure=None,
        started_at=started,
        ended_at=ended,
        first_delta_at=first,
        deltas=3,
        usage=Usage(prompt_tokens=1, completion_tokens=tokens),
    )


def test_the_book_decays_normalises_and_keeps_a_bounded_percentile():
    book = LatencyBook()
    key = ("a", "m")
    assert book.estimate(key) is None and book.percentile(key, 95) is None
    book.observe(key, _attempt(0.0, 1.0, 2.0, 11), prompt_tokens=1000)
    first = book.estimate(key)
    assert first is not None
    assert first.ttft == pytest.approx(0.5)  # 1 s over two prompt units
    assert first.tps == pytest.approx(10.0)
    for _ in range(40):
        book.observe(key, _attempt(0.0, 0.1, 0.2, 11), prompt_tokens=0)
    later = book.estimate(key)
    assert later is not None and later.ttft == pytest.approx(0.1 + 0.4 / 2**5)  # 5 half-lives
    assert later.samples == 41
    assert book.percentile(key, 95) == pytest.approx(0.1)
    for k in range(100):
        book.observe(key, _attempt(0.0, k / 100, 1.0, 0), prompt_tokens=0)
    assert book.percentile(key, 50) == pytest.approx(0.67)  # only the last 64 kept
    # An attempt without output teaches nothing.
    book.observe(("b", "m"), _attempt(0.0, None, 1.0, 0), prompt_tokens=0)
    assert book.estimate(("b", "m")) is None


def test_config_reads_the_strategy_and_exploration():
    data = {
        "providers": [{"name": "a", "kind": "scripted"}, {"name": "b", "kind": "scripted"}],
        "routes": [{"model": "m", "chain": ["a", "b"], "strategy": "latency", "exploration": 0.1}],
    }
    route = load_config(data).routes[0]
    assert (route.strategy, route.exploration) == ("latency", 0.1)
    data["routes"][0]["exploration"] = 2
    with pytest.raises(ConfigError, match=r"routes\[0\]\.exploration"):
        load_config(data)
    assert Route(model="m", chain=["a"]).exploration == 0.05


async def test_traffic_moves_to_the_fast_provider_and_exploration_keeps_probing(autojump_clock):
    slow = scripted_provider("slow", Answer(chunks=3, first_delay=0.3, delay=0.03))
    fast = scripted_provider("fast", Answer(chunks=3, first_delay=0.1, delay=0.01))
    cfg = Config(
        providers=[slow, fast],
        routes=[Route(model="m", chain=["slow", "fast"], strategy="latency", exploration=0.1)],
        seed=3,
    )
    served: collections.Counter[str] = collections.Counter()
    async with open_sup(cfg) as sup:
        for i in range(400):
            reply = await sup.complete(request())
            served[reply.provider] += 1
            picks = [d for d in reply.decisions if d.action is Action.PICK]
            assert len(picks) == 1
            assert str(picks[0].rule) == "config:route.strategy=latency"
            assert picks[0].actor == reply.provider
            if i > 10:
                assert "fast (ttft" in picks[0].reason and "slow (ttft" in picks[0].reason
    # Each was measured; then the fast one took all but the exploration share (10 %).
    assert 0.06 < served["slow"] / 400 < 0.14
    assert served["fast"] > 340
