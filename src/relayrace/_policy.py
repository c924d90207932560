"""The policies of DESIGN.md as frozen values, with their defaults.

Everything here is configuration: what to match and what to do. The pure functions that apply
these policies to a failure live in ``_decide.py`` (routing decisions) and
``actors/_health.py`` (health transitions).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, cast

import attrs

from ._failure import Category, Failure

C = Category


def _codes(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


def _statuses(values: Iterable[int]) -> frozenset[int]:
    return frozenset(values)


def _keywords(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(k.lower() for k in values)


def _categories(values: Iterable[Category | str]) -> frozenset[Category]:
    return frozenset(v if isinstance(v, Category) else Category(v) for v in values)


class Configurable:
    """A policy value that can say, field by field, whether it holds its class default (read
    from the attrs field definition): the ``source`` of a decision's ``Rule``."""

    __slots__ = ()

    def is_default(self, name: str) -> bool:
        """Whether field ``name`` holds the default its class declares.

        Raises:
            KeyError: the class has no such field.
        """
        default: Any = attrs.fields_dict(cast(Any, type(self)))[name].default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory(self) if default.takes_self else default.factory()
        return bool(getattr(self, name) == default)

    def source(self, name: str) -> str:
        """``"default"`` if field ``name`` holds its class default, else ``"config"``."""
        return "default" if self.is_default(name) else "config"


@attrs.frozen(kw_only=True)
class Match:
    """Matches a failure by category, code, HTTP status or a keyword in its message.

    A failure matches when any one of the lists matches (an empty ``Match`` matches nothing).
    """

    categories: frozenset[Category] = attrs.field(factory=frozenset, converter=_categories)
    codes: frozenset[str] = attrs.field(factory=frozenset, converter=_codes)
    statuses: frozenset[int] = attrs.field(factory=frozenset, converter=_statuses)
    keywords: tuple[str, ...] = attrs.field(factory=tuple, converter=_keywords)

    def __bool__(self) -> bool:
        return bool(self.categories or self.codes or self.statuses or self.keywords)

    def match(self, failure: Failure) -> tuple[str, str] | None:
        """Return ``(rule, value)`` naming what matched, or ``None``."""
        if failure.category in self.categories:
            return "categories", failure.category.value
        if failure.code is not None and failure.code in self.codes:
            return "codes", failure.code
        if failure.status is not None and failure.status in self.statuses:
            return "statuses", str(failure.status)
        if self.keywords and failure.message:
            lowered = failure.message.lower()
            for keyword in self.keywords:
                if keyword in lowered:
                    return "keywords", keyword
        return None


# Categories retried on the same actor unless configured otherwise.
DEFAULT_RETRYABLE = frozenset({C.RATE_LIMIT, C.PROVIDER_5XX, C.NETWORK, C.UNKNOWN})


@attrs.frozen(kw_only=True)
class RetryPolicy(Configurable):
    """Retrying the same actor.

    Attributes:
        enabled: retry at all.
        max_attempts: tries per actor within one request, the first included.
        allow: failures that may be retried (on top of the default retryable categories:
            rate_limit, provider_5xx, network, unknown).
        deny: failures never retried; deny beats allow.
        backoff_base / backoff_cap: full-jitter exponential backoff, seconds.
        max_wait: a wait (Retry-After or backoff) longer than this fails over instead.
    """

    enabled: bool = True
    max_attempts: int = 2
    allow: Match = Match()
    deny: Match = Match()
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    max_wait: float = 10.0


class FailoverAction(enum.Enum):
    NEXT = "next"
    STOP = "stop"


DEFAULT_FAILOVER_ACTIONS: dict[Category, FailoverAction] = {
    category: FailoverAction.NEXT for category in Category
} | {
    C.CONTENT_POLICY: FailoverAction.STOP,
    C.BAD_REQUEST: FailoverAction.STOP,
    C.CANCELLED: FailoverAction.STOP,
}


@attrs.frozen(kw_only=True)
class FailoverPolicy(Configurable):
    """Moving on to the next actor.

    Attributes:
        enabled: fail over at all.
        actions: what to do per category (overrides the defaults: ``content_policy`` and
            ``bad_request`` stop, everything else moves to the next actor).
        allow: failures that fail over even where ``actions`` says stop.
        deny: failures that never fail over; deny beats allow.
        max_providers: the most actors one request may try (0 = all in the route).
        total_budget: seconds for the whole request, every retry and failover included.
    """

    enabled: bool = True
    actions: dict[Category, FailoverAction] = attrs.field(factory=dict)
    allow: Match = Match()
    deny: Match = Match()
    max_providers: int = 0
    total_budget: float = 600.0

    def action_for(self, category: Category) -> tuple[FailoverAction, str]:
        """The action for a category and where it came from (``config`` or ``default``)."""
        if category in self.actions:
            return self.actions[category], "config"
        return DEFAULT_FAILOVER_ACTIONS[category], "default"


class AllBenched(enum.Enum):
    """What to do when every actor of a route is benched."""

    TRY_ANYWAY = "try_anyway"
    TERMINUS = "terminus"
    FAIL = "fail"


@attrs.frozen(kw_only=True)
class HealthPolicy(Configurable):
    """How actors are benched and recover.

    Attributes:
        failure_threshold: consecutive counted failures that bench an actor.
        cooldown_base / cooldown_cap: the n-th bench in a row lasts
            ``min(cap, base * 2 ** (n - 1))`` seconds, and from the second on (a probe failed)
            at most ``probe_interval``.
        probe_interval: the longest bench after a failed probe: while a deployment stays down
            it is probed once per ``probe_interval`` seconds (the doubling stops there), and
            it is probed at most this long after it recovers (4 s: with a request within a
            second of the bench's end, back in use within 5 s). Set it to ``cooldown_cap`` for
            the plain doubling curve.
        bench_immediately: categories that bench at once (with ``long_bench``).
        long_bench: seconds for an immediate bench (auth, quota_exhausted).
        overload_bench: seconds for an ``overloaded`` failure without Retry-After.
        probe_timeout: the budget of the single probe after a bench; a probe that takes longer
            fails and re-benches.
        restart_cool_off: seconds after which an actor that gave up (it crashed more often than
            the supervisor's restart intensity allows) is restarted afresh, its restart count
            reset; until then routing skips it and ``sup.health()`` says ``gave_up``.
        max_benched_share: at most this share of all actors is benched at once (1.0 = no limit).
        when_all_benched: try them anyway, try only the terminus, or fail at once.
    """

    failure_threshold: int = 3
    cooldown_base: float = 5.0
    cooldown_cap: float = 300.0
    bench_immediately: frozenset[Category] = attrs.field(
        factory=lambda: frozenset({C.AUTH, C.QUOTA_EXHAUSTED}), converter=_categories
    )
    long_bench: float = 600.0
    overload_bench: float = 2.0
    probe_interval: float = 4.0
    probe_timeout: float = 10.0
    restart_cool_off: float = 60.0
    max_benched_share: float = 1.0
    when_all_benched: AllBenched = AllBenched.TRY_ANYWAY

    def cooldown(self, n: int) -> float:
        """How long the ``n``-th automatic bench in a row lasts (``n`` >= 1): ``cooldown_base``
        doubling up to ``cooldown_cap``, and from the second bench on (a probe failed) at most
        ``probe_interval``."""
        length = min(self.cooldown_cap, self.cooldown_base * 2 ** (n - 1))
        return length if n <= 1 else min(length, self.probe_interval)


# Failures that never count against a provider's health.
NO_PENALTY = frozenset(
    {
        C.MODEL_NOT_FOUND,
        C.CONTEXT_LENGTH,
        C.CONTENT_POLICY,
        C.BAD_REQUEST,
        C.LOCAL_CAPACITY,
        C.CANCELLED,
    }
)


@attrs.frozen(kw_only=True)
class RetryBudgetPolicy(Configurable):
    """Caps retries across the whole supervisor: within a sliding ``window`` (seconds), retries
    may not exceed ``ratio`` × requests + ``floor``."""

    ratio: float = 0.2
    floor: int = 10
    window: float = 10.0


class MidStream(enum.Enum):
    """What to do when a stream fails after the caller has received part of the answer."""

    ERROR = "error"
    RESTART = "restart"
    CONTINUE = "continue"


#: ``StreamPolicy.keep_text``'s default: 1 MiB of characters.
KEEP_TEXT = 1 << 20


@attrs.frozen(kw_only=True)
class StreamPolicy(Configurable):
    """Streams.

    Attributes:
        mid_stream: what to do when a stream fails after the caller received part of it.
        keep_text: the most characters of a stream's text the supervisor keeps once it has
            passed them on: for ``Reply.text`` and for the prefill of a ``continue``. Past it
            the text is dropped (``Reply.text_kept`` is ``False``, ``Reply.text`` empty) and a
            broken stream is not continued (a decision says so). ``0``: never keep it.
    """

    mid_stream: MidStream = MidStream.ERROR
    keep_text: int = KEEP_TEXT


@attrs.frozen(kw_only=True)
class Policies(Configurable):
    """Every policy, each with its defaults.

    ``hard_stop`` ends a request at once whatever else says; ``demote`` pushes an actor one step
    down the order (until it next succeeds) when a failure matches.
    """

    retry: RetryPolicy = RetryPolicy()
    failover: FailoverPolicy = FailoverPolicy()
    hard_stop: Match = Match()
    demote: Match = Match()
    health: HealthPolicy = HealthPolicy()
    retry_budget: RetryBudgetPolicy = RetryBudgetPolicy()
    stream: StreamPolicy = StreamPolicy()
