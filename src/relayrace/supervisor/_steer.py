"""One request's prompt-cache affinity and rate-limit admission, as its run (``_run``) uses
them: the order the pin makes, the skips at a rate limit, the counting of each attempt and
what its end teaches. The state lives in the ledger (``_admission``, ``_affinity``)."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .._config import Route
from .._decide import rate_limited_locally, skip_at_rate_limit
from .._failure import Failure
from .._values import Decision, Request
from ..actors import Job, ProviderActor
from ._admission import Admission, LimitHit, Ticket, admission_tokens
from ._affinity import AffinityMap, affinity_key
from ._routing import RoutePlan


class Steering:
    """What one request's run asks of the affinity pins and the admission."""

    __slots__ = ("admission", "affinity", "route", "request", "key", "resets", "_tokens")

    def __init__(self, admission: Admission, affinity: AffinityMap, route: Route, request: Request):
        self.admission = admission
        self.affinity = affinity
        self.route = route
        self.request = request
        #: the request's affinity key (``None``: no affinity, or no key)
        self.key = affinity_key(route, request) if route.affinity is not None else None
        #: when each deployment skipped at its rate limit is whole again
        self.resets: list[float] = []
        self._tokens: int | None = None

    def order(
        self,
        plan: RoutePlan,
        chain: Sequence[ProviderActor],
        lacking: dict[str, Decision],
        now: float,
    ) -> tuple[list[ProviderActor], dict[str, Decision]]:
        """The plan's actors with the key's pinned actor first (the decision, the pin used or
        yielding, is added to the plan's), and the skips: ``lacking`` (the capability skips)
        and those at their rate limit (``skips``)."""
        order = plan.actors
        if self.key is not None:
            order, decision = self.affinity.prefer(
                self.route, self.key, order, chain, now, limited=lambda a: bool(self._limited(a))
            )
            if decision is not None:
                plan.decisions.append(decision)
        return order, self.skips(order, lacking)

    def skips(
        self, order: list[ProviderActor], lacking: dict[str, Decision]
    ) -> dict[str, Decision]:
        """``lacking`` (the capability skips) and a skip for each actor of ``order`` at its rate
        limit for this request, checked now."""
        if not self.admission.active:
            return lacking
        skips = dict(lacking)
        for actor in order:
            if actor.name in skips or (hit := self._limited(actor)) is None:
                continue
            self.resets.append(hit.reset_at)
            skips[actor.name] = skip_at_rate_limit(
                actor.name, hit.rule, hit.reset_at - trio.current_time()
            )
        return skips

    def failure(self) -> Failure | None:
        """The request's failure when deployments were skipped at their rate limits and
        nothing else failed: ``rate_limited_locally``, ``retry_after`` the earliest reset."""
        if not self.resets:
            return None
        return rate_limited_locally(min(self.resets) - trio.current_time())

    def admit(self, actor: ProviderActor, now: float) -> Ticket | None:
        """Count an attempt sent to ``actor`` now."""
        if not self.admission.active:
            return None
        return self.admission.admit(actor, self.tokens, now)

    def ended(
        self,
        actor: ProviderActor,
        ticket: Ticket | None,
        job: Job,
        *,
        served: bool,
    ) -> None:
        """An attempt (``job``) ended: reconcile its estimate with its usage, learn the
        provider's headers (a success's, or an error answer's: ``Failure.limits``) and, if it
        ``served`` the request, pin the key to ``actor``."""
        completion = job.completion
        if completion is not None:
            limits = completion.limits
        else:
            limits = None if job.failure is None else job.failure.limits
        if ticket is not None or limits is not None:
            usage = completion.usage if completion is not None else job.usage
            self.admission.end(actor, ticket, usage, limits, trio.current_time())
        if served and self.key is not None:
            self.affinity.record(self.route, self.key, actor, trio.current_time())

    @property
    def tokens(self) -> int:
        """The tokens the request is admitted with (worked out once)."""
        if self._tokens is None:
            self._tokens = admission_tokens(self.request)
        return self._tokens

    def _limited(self, actor: ProviderActor) -> LimitHit | None:
        if not self.admission.active:
            return None
        return self.admission.check(actor, self.tokens, trio.current_time())
