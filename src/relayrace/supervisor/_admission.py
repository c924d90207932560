"""Rate-limit-aware admission: a deployment at its limit is skipped instead of earning a 429.

Each actor (deployment) has a ``DeploymentLimits``: the ``rpm`` / ``tpm`` configured for its
provider, counted over a sliding minute of the attempts sent to it, and what the provider's own
headers last said (``RateLimits``: requests and tokens remaining, and when each is whole again),
spent down locally by each attempt sent until the next response says again. An attempt is
admitted with an estimate of its tokens (the prompt's characters / 4 + ``max_tokens``), which
is replaced by the real usage when the attempt ends.

``Admission.check`` says which limit an attempt would pass (the rule, and when it is whole
again); ``_decide.skip_at_rate_limit`` makes the decision of it. Nothing here waits or does I/O.

With a shared state backend (``Admission.share``) the ``rpm`` / ``tpm`` are the fleet's: an
attempt is also checked against the fleet's count of the current wall-clock minute as this
process's mirror has it (the others' as last synced, plus this process's own since), and counted
there (sent to Redis in the background). What the provider's headers say is published, and
a newer observation from another instance replaces this process's own (``FleetLimits``).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable

import attrs

from .._config import ProviderConfig
from .._decide import estimated_tokens
from .._ratelimit import RateLimits
from .._values import Request, Rule, Usage
from ..actors import ProviderActor
from ..state import Deployment, LearnedLimits, StateBackend

#: the window of ``rpm`` and ``tpm``, in seconds
WINDOW = 60.0
#: how long a remaining count the provider reported holds when it gave no reset
_DEFAULT_RESET = 60.0


@attrs.frozen
class LimitHit:
    """An attempt would pass a limit: which (``rule``), and when it is whole again."""

    rule: Rule
    reset_at: float


def admission_tokens(request: Request) -> int:
    """The tokens an attempt is admitted with: the prompt's estimate plus ``max_tokens``."""
    params = request.params
    most = params.get("max_tokens", params.get("max_completion_tokens"))
    extra = most if isinstance(most, int) and not isinstance(most, bool) else 0
    return estimated_tokens(request) + extra


class Ticket:
    """One admitted attempt, as counted in its deployment's window (``tokens``, until the real
    usage replaces the estimate)."""

    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: int):
        self.at = at
        self.tokens = tokens


class DeploymentLimits:
    """One deployment's limits and what was sent to it in the last minute."""

    __slots__ = (
        "rpm",
        "tpm",
        "_log",
        "remaining_requests",
        "requests_reset_at",
        "remaining_tokens",
        "tokens_reset_at",
        "observed",
    )

    def __init__(self, rpm: int | None = None, tpm: int | None = None):
        self.rpm = rpm
        self.tpm = tpm
        self._log: deque[Ticket] = deque()
        self.remaining_requests: int | None = None
        self.requests_reset_at = 0.0
        self.remaining_tokens: int | None = None
        self.tokens_reset_at = 0.0
        #: the wall-clock time of the provider's headers last taken (``FleetLimits``)
        self.observed = 0.0

    @property
    def active(self) -> bool:
        return (
            self.rpm is not None
            or self.tpm is not None
            or self.remaining_requests is not None
            or self.remaining_tokens is not None
        )

    def check(self, tokens: int, now: float, share: int = 1) -> LimitHit | None:
        """The limit an attempt of ``tokens`` sent now would pass, if any; ``share``: the
        configured ``rpm`` / ``tpm`` are the fleet's and this many instances share them with
        nothing counting them together (the shared state away): each has its part."""
        self._forget(now)
        log = self._log
        rpm, tpm = self.rpm, self.tpm
        if share > 1:
            rpm = None if rpm is None else max(1, rpm // share)
            tpm = None if tpm is None else max(1, tpm // share)
        if rpm is not None and len(log) >= rpm:
            return LimitHit(self._rule("rpm", rpm, share), log[0].at + WINDOW)
        if tpm is not None and log:
            used = sum(t.tokens for t in log)
            if used + tokens > tpm:
                # Whole enough again when the oldest attempts leave the window.
                left, reset_at = used + tokens - tpm, log[-1].at + WINDOW
                for ticket in log:
                    left -= ticket.tokens
                    if left <= 0:
                        reset_at = ticket.at + WINDOW
                        break
                return LimitHit(self._rule("tpm", tpm, share), reset_at)
        if self.remaining_requests is not None and self.remaining_requests <= 0:
            return LimitHit(
                Rule("provider", "headers", "x-ratelimit-remaining-requests", "0"),
                self.requests_reset_at,
            )
        if self.remaining_tokens is not None and self.remaining_tokens < tokens:
            return LimitHit(
                Rule(
                    "provider",
                    "headers",
                    "x-ratelimit-remaining-tokens",
                    str(max(0, self.remaining_tokens)),
                ),
                self.tokens_reset_at,
            )
        return None

    def _rule(self, key: str, limit: int, share: int) -> Rule:
        configured = self.rpm if key == "rpm" else self.tpm
        if share == 1:
            return Rule("config", "providers", key, str(limit))
        return Rule("config", "providers", key, f"{configured}/{share} instances, state away")

    def admit(self, tokens: int, now: float) -> Ticket:
        """Count an attempt of (an estimated) ``tokens`` sent now."""
        ticket = Ticket(now, tokens)
        if self.rpm is not None or self.tpm is not None:
            self._log.append(ticket)
        if self.remaining_requests is not None:
            self.remaining_requests -= 1
        if self.remaining_tokens is not None:
            self.remaining_tokens -= tokens
        return ticket

    def settle(self, ticket: Ticket, usage: Usage | None) -> None:
        """Replace an attempt's estimate with the tokens it really used (when reported)."""
        if usage is not None:
            ticket.tokens = usage.prompt_tokens + usage.completion_tokens

    def learn(self, limits: RateLimits, now: float) -> None:
        """Take what the provider's headers said (it knows better than our count)."""
        if limits.remaining_requests is not None:
            self.remaining_requests = limits.remaining_requests
            self.requests_reset_at = now + (
                _DEFAULT_RESET if limits.reset_requests is None else limits.reset_requests
            )
        if limits.remaining_tokens is not None:
            self.remaining_tokens = limits.remaining_tokens
            self.tokens_reset_at = now + (
                _DEFAULT_RESET if limits.reset_tokens is None else limits.reset_tokens
            )

    def _forget(self, now: float) -> None:
        log = self._log
        while log and log[0].at + WINDOW <= now:
            log.popleft()
        if self.remaining_requests is not None and now >= self.requests_reset_at:
            self.remaining_requests = None
        if self.remaining_tokens is not None and now >= self.tokens_reset_at:
            self.remaining_tokens = None


class Admission:
    """The limits of every deployment of one supervisor, by actor: an actor a reload keeps
    keeps its count; a new or replaced one starts afresh with its provider's ``rpm`` / ``tpm``."""

    __slots__ = ("_any", "_configured", "_limits", "fleet")

    def __init__(self) -> None:
        self._configured: dict[str, tuple[int | None, int | None]] = {}
        self._limits: weakref.WeakKeyDictionary[ProviderActor, DeploymentLimits] = (
            weakref.WeakKeyDictionary()
        )
        #: some deployment has a limit, configured or learned here
        self._any = False
        #: the fleet's counts and learned limits (``None``: this process alone)
        self.fleet: FleetLimits | None = None

    def share(self, state: StateBackend | None) -> None:
        """Count ``rpm`` / ``tpm`` fleet-wide and share learned limits through ``state``."""
        self.fleet = None if state is None else FleetLimits(state)

    def configure(self, providers: Iterable[ProviderConfig]) -> None:
        """Take the providers' configured limits (at start and at each reload)."""
        self._configured = {p.name: (p.rpm, p.tpm) for p in providers}
        self._any = self._any or any(
            rpm is not None or tpm is not None for rpm, tpm in self._configured.values()
        )

    @property
    def active(self) -> bool:
        """Some deployment has a limit (configured, or learned here or by another instance):
        checks are worth making."""
        return self._any or (self.fleet is not None and self.fleet.learned_any)

    def of(self, actor: ProviderActor) -> DeploymentLimits:
        limits = self._limits.get(actor)
        if limits is None:
            limits = self._limits[actor] = DeploymentLimits(
                *self._configured.get(actor.name, (None, None))
            )
        return limits

    def check(self, actor: ProviderActor, tokens: int, now: float) -> LimitHit | None:
        limits = self.of(actor)
        fleet = self.fleet
        if fleet is None:
            return limits.check(tokens, now) if limits.active else None
        fleet.adopt(actor, limits, now)
        if not limits.active:
            return None
        return limits.check(tokens, now, fleet.share) or fleet.check(actor, limits, tokens, now)

    def learn(self, actor: ProviderActor, limits: RateLimits, now: float) -> None:
        own = self.of(actor)
        own.learn(limits, now)
        self._any = True
        if self.fleet is not None:
            self.fleet.publish(actor, own, limits)

    def admit(self, actor: ProviderActor, tokens: int, now: float) -> Ticket | None:
        """Count an attempt sent to ``actor`` now (``None``: the actor has no limit)."""
        limits = self.of(actor)
        if not limits.active:
            return None
        if self.fleet is not None and (limits.rpm is not None or limits.tpm is not None):
            self.fleet.count(actor, 1, tokens)
        return limits.admit(tokens, now)

    def end(
        self,
        actor: ProviderActor,
        ticket: Ticket | None,
        usage: Usage | None,
        learned: RateLimits | None,
        now: float,
    ) -> None:
        """An attempt ended: reconcile its estimate with its ``usage``, and learn what the
        provider's headers said (``learned``)."""
        if ticket is not None:
            estimated, limits = ticket.tokens, self.of(actor)
            limits.settle(ticket, usage)
            if self.fleet is not None and ticket.tokens != estimated and limits.tpm is not None:
                self.fleet.count(actor, 0, ticket.tokens - estimated)
        if learned is not None:
            self.learn(actor, learned, now)


class FleetLimits:
    """Admission's window on the state the fleet shares (``relayrace.state``): each actor's
    deployment's requests and tokens in the current wall-clock minute, and the limits providers
    last reported to any instance. Reads are the mirror's; writes go on in the background."""

    __slots__ = ("_state", "_mirror", "_deployments")

    def __init__(self, state: StateBackend):
        self._state = state
        self._mirror = state.mirror
        self._deployments: dict[tuple[str, str | None], Deployment] = {}

    @property
    def share(self) -> int:
        """How many instances split the configured limits between them: while the shared
        state is away nothing counts the fleet's admissions together, so each instance takes
        its part (of as many instances as the last full read found); else 1 (the fleet's count
        decides)."""
        mirror = self._mirror
        return mirror.instances if mirror.away else 1

    @property
    def learned_any(self) -> bool:
        """Some instance has shared limits a provider reported."""
        return bool(self._mirror.limits)

    def deployment(self, actor: ProviderActor) -> Deployment:
        key = (actor.name, actor.model)
        found = self._deployments.get(key)
        if found is None:
            if len(self._deployments) > 1024:
                self._deployments.clear()
            found = self._deployments[key] = Deployment(actor.name, actor.model)
        return found

    def check(
        self, actor: ProviderActor, limits: DeploymentLimits, tokens: int, now: float
    ) -> LimitHit | None:
        """The configured limit the fleet's count of this minute would pass, if any (whole
        again when the wall-clock minute ends)."""
        if limits.rpm is None and limits.tpm is None:
            return None
        wall = self._state.now()
        usage = self._mirror.usage_of(self.deployment(actor), wall)
        reset_at = now + WINDOW * (usage.minute + 1) - wall
        if limits.rpm is not None and usage.requests + 1 > limits.rpm:
            return LimitHit(Rule("config", "providers", "rpm", f"{limits.rpm} fleet-wide"), reset_at)
        if limits.tpm is not None and usage.tokens > 0 and usage.tokens + tokens > limits.tpm:
            return LimitHit(Rule("config", "providers", "tpm", f"{limits.tpm} fleet-wide"), reset_at)
        return None

    def count(self, actor: ProviderActor, requests: int, tokens: int) -> None:
        self._state.count(self.deployment(actor), requests=requests, tokens=tokens)

    def publish(self, actor: ProviderActor, own: DeploymentLimits, limits: RateLimits) -> None:
        """Share what the provider's headers said (``learn_limits``; the newer one wins)."""
        resets = [r for r in (limits.reset_requests, limits.reset_tokens) if r is not None]
        wall = self._state.now()
        learned = LearnedLimits(
            remaining_requests=limits.remaining_requests,
            remaining_tokens=limits.remaining_tokens,
            reset_at=wall + (max(resets) if resets else _DEFAULT_RESET),
            observed_at=wall,
        )
        own.observed = wall
        self._state.learn_limits(self.deployment(actor), learned)

    def adopt(self, actor: ProviderActor, own: DeploymentLimits, now: float) -> None:
        """Take the limits another instance learned since this one last did (this process
        spends them down locally from there)."""
        if not self._mirror.limits:
            return
        learned = self._mirror.limits_of(self.deployment(actor))
        if learned is None or learned.observed_at <= own.observed:
            return
        own.observed = learned.observed_at
        wall = self._state.now()
        if learned.reset_at is not None and learned.reset_at <= wall:
            return
        reset_at = now + (_DEFAULT_RESET if learned.reset_at is None else learned.reset_at - wall)
        if learned.remaining_requests is not None:
            own.remaining_requests = int(learned.remaining_requests)
            own.requests_reset_at = reset_at
        if learned.remaining_tokens is not None:
            own.remaining_tokens = int(learned.remaining_tokens)
            own.tokens_reset_at = reset_at
