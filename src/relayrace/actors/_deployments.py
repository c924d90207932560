"""Health per deployment: one provider's health records, keyed by upstream model.

A deployment is a provider and the upstream model it is asked for: the provider's configured
``model``, or, for a provider without one (a passthrough behind a ``*`` route), the model name
of each request. Each deployment has its own ``Health``, so that a model that fails (a 503 for
one model) benches that model only, and the provider keeps serving the others. Failures that
concern the account (``account_level``) go to one provider-wide record instead, and a bench
there stops every deployment of the provider.

The records are created on first use and kept in least-recently-used order, at most ``cap``
of them: a caller who invents model names must not grow an actor's memory without bound. Only
a healthy record (state ``ok``, no manual bench, no probe in flight) is ever evicted, since
forgetting a bench would send traffic back to a failing deployment; when every record is
unhealthy, a new deployment is served on a record that is not kept (``Deployments.use``).

Pure and synchronous like ``Health``: the actor is the only caller.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator

import attrs

from .._failure import Category, Failure
from .._policy import HealthPolicy
from ._health import Health, HealthSnapshot, State

#: The most deployments an actor keeps a health record for (least recently used go first).
DEFAULT_MAX_DEPLOYMENTS = 256

_ACCOUNT = frozenset({Category.AUTH, Category.QUOTA_EXHAUSTED})


def account_level(failure: Failure, model: str | None) -> bool:
    """Whether ``failure`` concerns the provider's account rather than the deployment ``model``.

    ``auth`` and ``quota_exhausted`` always do. A ``rate_limit`` does unless its message names
    the model (OpenAI: "Rate limit reached for gpt-4o in organization …", Anthropic's "… your
    rate limit for claude-…", Gemini's "Quota exceeded for metric …, model: gemini-…"): a
    limit the provider scopes to a model benches that deployment only; any other is taken to
    be the account's. Every other category is the deployment's own.
    """
    category = failure.category
    if category in _ACCOUNT:
        return True
    if category is Category.RATE_LIMIT:
        return not names_model(failure.message, model)
    return False


def names_model(text: str, model: str | None) -> bool:
    """Whether ``text`` names ``model`` as a word of its own (case-insensitive): ``gpt-4o`` is
    named in "limit for gpt-4o." but not in "limit for gpt-4o-mini"."""
    if not model:
        return False
    pattern = r"(?<![\w.\-/:])" + re.escape(model) + r"(?![\w\-/:]|\.\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


class Deployments:
    """The health records of one actor: one provider-wide, one per deployment.

    Args:
        policy: the health policy of every record.
        exempt: the actor is never benched.
        probes: whether the actor can probe a deployment on its own timer (its client's
            ``probes(model)``).
        cap: the most deployment records kept.
    """

    __slots__ = ("_by_model", "_exempt", "_policy", "_probes", "cap", "provider")

    def __init__(
        self,
        policy: HealthPolicy,
        *,
        exempt: bool = False,
        probes: Callable[[str], bool] = lambda model: False,
        cap: int = DEFAULT_MAX_DEPLOYMENTS,
    ):
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self._policy = policy
        self._exempt = exempt
        self._probes = probes
        self.cap = cap
        #: account-level failures and provider-wide manual benches: they bench every deployment.
        self.provider = Health(policy, exempt=exempt)
        self._by_model: OrderedDict[str, Health] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_model)

    def __iter__(self) -> Iterator[tuple[str, Health]]:
        return iter(list(self._by_model.items()))

    def get(self, model: str | None) -> Health | None:
        """The record of ``model`` if one is kept (a look-up: it neither creates nor touches)."""
        return None if model is None else self._by_model.get(model)

    def use(self, model: str, now: float, *, keep: bool = False) -> Health:
        """The record of ``model``, created if need be and marked most recently used.

        At the cap, the least recently used healthy record makes room; if none is healthy, the
        record returned is not kept (its outcome is forgotten) unless ``keep`` (a manual
        bench, which an operator asks for), which goes over the cap instead.
        """
        records = self._by_model
        health = records.get(model)
        if health is not None:
            records.move_to_end(model)
            return health
        health = Health(self._policy, exempt=self._exempt, active_probes=self._probes(model))
        if len(records) >= self.cap:
            # Down to one below the cap (past it only after manual benches), oldest first.
            excess = len(records) - self.cap + 1
            victims = [m for m, h in records.items() if _evictable(h, now)][:excess]
            for victim in victims:
                del records[victim]
            if len(victims) < excess and not keep:
                return health
        records[model] = health
        return health

    def records(self, model: str | None) -> list[tuple[str | None, Health]]:
        """The provider-wide record and, if kept, ``model``'s: ``(model, record)`` pairs
        (``None`` names the provider-wide one)."""
        record = self.get(model)
        wide: list[tuple[str | None, Health]] = [(None, self.provider)]
        return wide if record is None else [*wide, (model, record)]

    def unavailable(self, now: float, model: str | None) -> tuple[str | None, State]:
        """The first record that makes ``model`` unavailable (``None``: the provider-wide
        one) and its state; the provider-wide state if none does."""
        for key, record in self.records(model):
            if not record.available(now):
                return key, record.state(now)
        return None, self.provider.state(now)

    def benched(self, now: float, model: str | None, *, manual: bool = False) -> bool:
        """The provider or ``model``'s deployment is benched (``manual``: by hand)."""
        return any(
            r.state(now) is State.BENCHED and (r.manual or not manual)
            for _, r in self.records(model)
        )

    def next_change(self, now: float, model: str | None) -> float:
        """When the bench that keeps ``model`` unavailable ends (the later of the provider's
        and the deployment's), or the next change of either, or ``math.inf``."""
        records = [r for _, r in self.records(model)]
        ends = [r.next_change() for r in records if r.state(now) is State.BENCHED]
        return max(ends) if ends else min(r.next_change() for r in records)

    def snapshot(self, now: float, name: str, in_flight: int) -> HealthSnapshot:
        """The provider's snapshot: the worst of its records' (by state, then bench end,
        counted failures, benches in a row), with every kept deployment's own."""
        worst = own = self.provider.snapshot(now, name, in_flight)
        deployments = {}
        for model, record in self._by_model.items():
            deployments[model] = record.deployment_snapshot(now, model)
            mine = record.snapshot(now, name, in_flight)
            if _badness(mine) > _badness(worst):
                worst = mine
        return attrs.evolve(worst, deployments=deployments, provider_state=own.state)


#: How bad a state is, to pick the worst of a provider's records.
_RANK = {State.OK: 0, State.PROBING: 1, State.BENCHED: 2, State.GAVE_UP: 3}


def worst_state(*states: State) -> State:
    """The worst of ``states`` (ok < probing < benched < gave up)."""
    return max(states, key=_RANK.__getitem__)


def _badness(snapshot: HealthSnapshot) -> tuple[int, float, int, int]:
    until = snapshot.benched_until
    return (
        _RANK[snapshot.state],
        -math.inf if until is None else until,
        snapshot.consecutive_failures,
        snapshot.bench_count,
    )


def _evictable(health: Health, now: float) -> bool:
    return health.state(now) is State.OK and not health.probe_in_flight and not health.manual
