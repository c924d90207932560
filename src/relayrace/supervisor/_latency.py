"""Latency estimates per deployment and the ``latency`` strategy's picker.

``LatencyBook`` keeps, per deployment (actor × upstream model), decaying estimates (EWMA with a
half-life in requests) of the time to first token, normalised by the prompt's size, and of the
output tokens per second, plus a small bounded reservoir of raw times to first token for the
hedge's percentile. ``power_of_two`` is pure: given the candidates' estimates and a random source, it
chooses by power-of-two-choices with a share of exploration.
"""

from __future__ import annotations

import collections
import functools
import math
import random
from collections.abc import Callable, Sequence

import attrs

from .._config import Route
from .._decide import estimated_tokens, latency_pick
from .._values import Attempt, Decision, Request
from ..actors import ProviderActor

#: the half-life of the estimates, in samples
HALF_LIFE = 8
#: the time-to-first-token samples kept for percentiles, per deployment
RESERVOIR = 64
#: the samples a percentile needs before it replaces the fixed fallback
MIN_SAMPLES = 8
#: prompt tokens that count as one unit in the normalisation of the time to first token
PROMPT_UNIT = 1000
#: the shortest answer that teaches a speed (tokens, seconds from first token to end): the
#: speed of a few tokens sent in one burst is noise, and would outweigh the time to first token
MIN_TOKENS, MIN_SPAN = 8, 0.05
#: the output assumed when a request sets no ``max_tokens`` (to weigh tokens per second)
OUTPUT_GUESS = 256

Key = tuple[str, str]


@attrs.frozen
class Estimate:
    """A deployment's estimates: ``ttft`` in seconds per prompt unit (``1 + tokens/1000``),
    ``tps`` output tokens per second (``None``: not measured yet), from ``samples`` attempts."""

    ttft: float
    tps: float | None
    samples: int

    def score(self, prompt_tokens: int, output_tokens: int) -> float:
        """The expected seconds to the end of an answer of ``output_tokens``."""
        score = self.ttft * (1 + prompt_tokens / PROMPT_UNIT)
        if self.tps:
            score += output_tokens / self.tps
        return score

    def describe(self) -> str:
        tps = "?" if self.tps is None else f"{self.tps:.0f}"
        return f"ttft {self.ttft * 1000:.0f}ms/unit, {tps} tok/s, n={self.samples}"


class _Track:
    __slots__ = ("ttft", "tps", "samples", "reservoir")

    def __init__(self) -> None:
        self.ttft: float | None = None
        self.tps: float | None = None
        self.samples = 0
        self.reservoir: collections.deque[float] = collections.deque(maxlen=RESERVOIR)


def _ewma(old: float | None, new: float) -> float:
    if old is None:
        return new
    alpha = 1 - 0.5 ** (1 / HALF_LIFE)
    return old + alpha * (new - old)


class LatencyBook:
    """The estimates of every deployment one supervisor has used."""

    __slots__ = ("_tracks",)

    def __init__(self) -> None:
        self._tracks: dict[Key, _Track] = {}

    def observe(self, key: Key, attempt: Attempt, prompt_tokens: int) -> None:
        """Learn from one ended attempt (those that produced no output teach nothing)."""
        first = attempt.first_delta_at
        if first is None:
            return
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track()
        ttft = max(0.0, first - attempt.started_at)
        track.reservoir.append(ttft)
        track.ttft = _ewma(track.ttft, ttft / (1 + prompt_tokens / PROMPT_UNIT))
        track.samples += 1
        usage = attempt.usage
        spent = attempt.ended_at - first
        if usage is not None and usage.completion_tokens > MIN_TOKENS and spent >= MIN_SPAN:
            track.tps = _ewma(track.tps, (usage.completion_tokens - 1) / spent)

    def learn(self, actor: ProviderActor, request: Request, attempt: Attempt) -> None:
        """``observe`` an attempt of ``request`` on ``actor``."""
        self.observe(deployment(actor, request), attempt, estimated_tokens(request))

    def estimate(self, key: Key) -> Estimate | None:
        track = self._tracks.get(key)
        if track is None or track.ttft is None:
            return None
        return Estimate(track.ttft, track.tps, track.samples)

    def percentile(self, key: Key, q: float) -> float | None:
        """The ``q``-th percentile (0-100) of the recent times to first token; ``None`` with
        fewer than ``MIN_SAMPLES``."""
        track = self._tracks.get(key)
        if track is None or len(track.reservoir) < MIN_SAMPLES:
            return None
        ordered = sorted(track.reservoir)
        return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@attrs.frozen
class Pick:
    """What ``power_of_two`` chose: ``chosen`` (an index into the candidates), the two drawn
    (``best`` won them), and whether the choice ``explored`` (took another than ``best``)."""

    chosen: int
    best: int
    other: int
    explored: bool


def power_of_two(
    estimates: Sequence[Estimate | None],
    *,
    prompt_tokens: int,
    output_tokens: int,
    exploration: float,
    rng: random.Random,
) -> Pick:
    """Power of two choices over ``estimates`` (at least two, in priority order): draw two,
    take the one with the lower expected time (an unmeasured one counts as 0: it gets
    measured; ties go to priority order); with probability ``exploration`` take another
    candidate instead, at random, so that the slower ones keep being measured."""
    n = len(estimates)
    assert n >= 2
    i, j = sorted(rng.sample(range(n), 2))
    a, b = estimates[i], estimates[j]
    score_a = 0.0 if a is None else a.score(prompt_tokens, output_tokens)
    score_b = 0.0 if b is None else b.score(prompt_tokens, output_tokens)
    best, other = (i, j) if score_a <= score_b else (j, i)
    if rng.random() < exploration:
        chosen = rng.choice([k for k in range(n) if k != best])
        return Pick(chosen, best, other, True)
    return Pick(best, best, other, False)


def order_by_latency(
    healthy: list[ProviderActor],
    book: LatencyBook,
    request: Request,
    route: Route,
    rng: random.Random,
) -> tuple[list[ProviderActor], Decision]:
    """The ``latency`` strategy: the picked actor first, the others in priority order, and
    the pick's decision (with the estimates it used)."""
    keys = [deployment(actor, request) for actor in healthy]
    estimates = [book.estimate(key) for key in keys]
    max_tokens = request.params.get("max_tokens")
    output = max_tokens if isinstance(max_tokens, int) and 0 < max_tokens < OUTPUT_GUESS else OUTPUT_GUESS
    choice = power_of_two(
        estimates,
        prompt_tokens=estimated_tokens(request),
        output_tokens=output,
        exploration=route.exploration,
        rng=rng,
    )

    def named(i: int) -> str:
        estimate = estimates[i]
        return f"{healthy[i].name} ({'unmeasured' if estimate is None else estimate.describe()})"

    decision = latency_pick(
        healthy[choice.chosen].name,
        best=named(choice.best),
        other=named(choice.other),
        explored=choice.explored,
        share=route.exploration,
    )
    first = healthy[choice.chosen]
    return [first, *(a for a in healthy if a is not first)], decision


def ordering(
    book: LatencyBook, request: Request, route: Route, rng: random.Random
) -> Callable[[list[ProviderActor]], tuple[list[ProviderActor], Decision]] | None:
    """``plan_route``'s hook for a ``latency`` route (``None`` for the other strategies)."""
    if route.strategy != "latency":
        return None
    return functools.partial(order_by_latency, book=book, request=request, route=route, rng=rng)


def deployment(actor: ProviderActor, request: Request) -> Key:
    """The deployment an attempt of ``request`` on ``actor`` uses: the actor and the upstream
    model it asks for."""
    return (actor.name, actor.model or request.model)
