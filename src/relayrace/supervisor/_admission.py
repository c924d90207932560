"""Rate-limit-aware admission: a deployment at its limit is skipped instead of earning a 429.

Each actor (deployment) has a ``DeploymentLimits``: the ``rpm`` / ``tpm`` configured for its
provider, counted over a sliding minute of the attempts sent to it, and what the provider's own
headers last said (``RateLimits``: requests and tokens remaining, and when each is whole again),
spent down locally by each attempt sent until the next response says again. An attempt is
admitted with an estimate of its tokens (the prompt's characters / 4 + ``max_tokens``), which
is replaced by the real usage when the attempt ends.

``Admission.check`` says which limit an attempt would pass (the rule, and when it is whole
again); ``_decide.skip_at_rate_limit`` makes the decision of it. Nothing here waits or does I/O.
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
    )

    def __init__(self, rpm: int | None = None, tpm: int | None = None):
        self.rpm = rpm
        self.tpm = tpm
        self._log: deque[Ticket] = deque()
        self.remaining_requests: int | None = None
        self.requests_reset_at = 0.0
        self.remaining_tokens: int | None = None
        self.tokens_reset_at = 0.0

    @property
    def active(self) -> bool:
        return (
            self.rpm is not None
            or self.tpm is not None
            or self.remaining_requests is not None
            or self.remaining_tokens is not None
        )

    def check(self, tokens: int, now: float) -> LimitHit | None:
        """The limit an attempt of ``tokens`` sent now would pass, if any."""
        self._forget(now)
        log = self._log
        if self.rpm is not None and len(log) >= self.rpm:
            return LimitHit(Rule("config", "providers", "rpm", str(self.rpm)), log[0].at + WINDOW)
        if self.tpm is not None and log:
            used = sum(t.tokens for t in log)
            if used + tokens > self.tpm:
                # Whole enough again when the oldest attempts leave the window.
                left, reset_at = used + tokens - self.tpm, log[-1].at + WINDOW
                for ticket in log:
                    left -= ticket.tokens
                    if left <= 0:
                        reset_at = ticket.at + WINDOW
                        break
                return LimitHit(Rule("config", "providers", "tpm", str(self.tpm)), reset_at)
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

    __slots__ = ("_configured", "_limits", "active")

    def __init__(self) -> None:
        self._configured: dict[str, tuple[int | None, int | None]] = {}
        self._limits: weakref.WeakKeyDictionary[ProviderActor, DeploymentLimits] = (
            weakref.WeakKeyDictionary()
        )
        #: some deployment has a limit (configured or learned): checks are worth making
        self.active = False

    def configure(self, providers: Iterable[ProviderConfig]) -> None:
        """Take the providers' configured limits (at start and at each reload)."""
        self._configured = {p.name: (p.rpm, p.tpm) for p in providers}
        self.active = self.active or any(
            rpm is not None or tpm is not None for rpm, tpm in self._configured.values()
        )

    def of(self, actor: ProviderActor) -> DeploymentLimits:
        limits = self._limits.get(actor)
        if limits is None:
            limits = self._limits[actor] = DeploymentLimits(
                *self._configured.get(actor.name, (None, None))
            )
        return limits

    def check(self, actor: ProviderActor, tokens: int, now: float) -> LimitHit | None:
        limits = self.of(actor)
        return limits.check(tokens, now) if limits.active else None

    def learn(self, actor: ProviderActor, limits: RateLimits, now: float) -> None:
        self.of(actor).learn(limits, now)
        self.active = True

    def admit(self, actor: ProviderActor, tokens: int, now: float) -> Ticket | None:
        """Count an attempt sent to ``actor`` now (``None``: the actor has no limit)."""
        limits = self.of(actor)
        return limits.admit(tokens, now) if limits.active else None

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
            self.of(actor).settle(ticket, usage)
        if learned is not None:
            self.learn(actor, learned, now)
