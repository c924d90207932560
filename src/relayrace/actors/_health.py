"""The health state machine of one provider actor.

Pure and synchronous: every method that depends on time takes ``now`` (trio's clock, which never
goes backwards) as an argument, and nothing here does I/O. The actor task is the only caller.

States::

    OK ──(threshold / immediate / rate-limit / overload bench)──▶ BENCHED
    BENCHED ──(the automatic bench ends)──▶ PROBING        (half-open: the next job is THE probe)
    PROBING ──(success)──▶ OK
    PROBING ──(the probe fails)──▶ BENCHED                 (next exponent, whatever the threshold)
    PROBING ──(an active probe reached the provider)──▶ PROBING   (the next job decides)

The probe is a job (passive) or the actor's own cheap request (active, ``begin_attempt`` from
its timer): either way one at a time. The n-th bench in a row lasts ``policy.cooldown(n)``:
the base, then doubling, but never more than ``probe_interval`` once a probe has failed, so a
provider that stays down is probed once per interval and is back within one interval of its
recovery.
    any ──(manual bench)──▶ BENCHED                         (until it ends or unbench())

A manual bench is kept apart from the automatic one: automatic logic never shortens or lifts it.
When it ends the state is whatever the automatic part says (OK, BENCHED or PROBING).

A bench for a provider-sent wait (``Retry-After``, a rate-limit reset) lasts at most the
policy's ``cooldown_cap``; ``long_bench`` (auth, quota) and manual benches are ours and are not
capped by it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .._failure import Category, Failure
from .._policy import NO_PENALTY, HealthPolicy


class State(enum.Enum):
    """The health of an actor as routing sees it."""

    OK = "ok"
    BENCHED = "benched"
    PROBING = "probing"
    #: the actor crashed more often than the restart intensity allows: routing skips it until
    #: the supervisor restarts it afresh at ``HealthSnapshot.gave_up_until``. Set by the actor,
    #: never by ``Health``.
    GAVE_UP = "gave_up"


@attrs.frozen(kw_only=True)
class HealthSnapshot:
    """The health of one actor at one moment (what ``sup.health()`` returns per actor).

    Attributes:
        name: the actor's name.
        state: its state at the moment of the snapshot.
        benched_until: when the current bench ends (``math.inf``: until unbench), or ``None``
            when not benched.
        consecutive_failures: counted failures since the last success.
        manual: a manual bench is active.
        in_flight: attempts running on the actor.
        probe_in_flight: the half-open probe is running.
        bench_count: automatic benches in a row since the last success (the cooldown exponent).
        exempt: the actor is never benched.
        gave_up_until: when an actor that gave up (state ``gave_up``) is restarted afresh;
            ``None`` otherwise.
        deployments: the health of each deployment (upstream model) the actor has served,
            by model; the fields above are the worst of these and the provider-wide record.
        bench_reason: why it is benched, where known (the fleet's record: a failure category,
            ``manual``, ``drained``).
        benched_by: ``"fleet"``: the bench is another instance's, shared (``None``: this
            process's own, or none).
    """

    name: str
    state: State
    benched_until: float | None
    consecutive_failures: int
    manual: bool
    in_flight: int
    probe_in_flight: bool
    bench_count: int
    exempt: bool
    gave_up_until: float | None = None
    deployments: Mapping[str, DeploymentSnapshot] = attrs.field(factory=dict)
    #: the state of the provider-wide record alone (account-level benches, manual benches of
    #: the whole provider, ``gave_up``), where ``state`` is the worst of every record.
    provider_state: State = State.OK
    bench_reason: str | None = None
    benched_by: str | None = None

    @property
    def serving(self) -> bool:
        """Whether the provider takes requests for some deployment now: the provider as a
        whole is neither benched nor given up, and not every deployment it keeps is benched."""
        if self.provider_state in (State.BENCHED, State.GAVE_UP):
            return False
        deployments = self.deployments.values()
        return not deployments or any(d.state is not State.BENCHED for d in deployments)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict.

        ``state`` becomes its value; an endless bench (``benched_until == math.inf``, a manual
        bench until unbench) becomes ``None``, as JSON has no infinity: read it with ``state``
        and ``manual``. ``deployments`` maps each model to its own such dict.
        """
        until = self.benched_until
        return {
            "name": self.name,
            "state": self.state.value,
            "benched_until": None if until is None or math.isinf(until) else until,
            "consecutive_failures": self.consecutive_failures,
            "manual": self.manual,
            "in_flight": self.in_flight,
            "probe_in_flight": self.probe_in_flight,
            "bench_count": self.bench_count,
            "exempt": self.exempt,
            "gave_up_until": self.gave_up_until,
            "provider_state": self.provider_state.value,
            "serving": self.serving,
            "bench_reason": self.bench_reason,
            "benched_by": self.benched_by,
            "deployments": {model: d.to_dict() for model, d in self.deployments.items()},
        }


@attrs.frozen(kw_only=True)
class DeploymentSnapshot:
    """The health of one deployment (a provider's upstream model) at one moment.

    Attributes:
        model: the upstream model.
        state: ``ok``, ``benched`` or ``probing`` (the deployment's own record: a provider-wide
            bench shows on the provider's snapshot, not here).
        benched_until / consecutive_failures / manual / probe_in_flight / bench_count: as in
            ``HealthSnapshot``, for this deployment alone.
    """

    model: str
    state: State
    benched_until: float | None
    consecutive_failures: int
    manual: bool
    probe_in_flight: bool
    bench_count: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (an endless bench's ``benched_until`` is ``None``)."""
        until = self.benched_until
        return {
            "model": self.model,
            "state": self.state.value,
            "benched_until": None if until is None or math.isinf(until) else until,
            "consecutive_failures": self.consecutive_failures,
            "manual": self.manual,
            "probe_in_flight": self.probe_in_flight,
            "bench_count": self.bench_count,
        }


@attrs.define
class Health:
    """The health of one actor: counters, automatic and manual benches, the half-open probe.

    Args:
        policy: thresholds and bench durations.
        exempt: never bench this actor (failures are still counted).
        active_probes: the actor probes by itself (``begin_active_probe``) when a bench for
            failures ends; until it has, no job is routed here or becomes the probe, so that
            no caller pays for checking a provider that may still be down.

    ``now`` must never decrease from one call to the next: a bench whose end has been observed
    is settled into the half-open state.
    """

    policy: HealthPolicy
    exempt: bool = False
    active_probes: bool = False
    _consecutive_failures: int = attrs.field(default=0, init=False)
    # Automatic benches in a row without a success: n in base * 2 ** (n - 1).
    _streak: int = attrs.field(default=0, init=False)
    # End of the automatic bench, while it has not been observed to end.
    _auto_until: float | None = attrs.field(default=None, init=False)
    # An automatic bench ended and no success came since: the half-open state.
    _half_open: bool = attrs.field(default=False, init=False)
    # End of the manual bench (math.inf: until unbench), while not observed to end.
    _manual_until: float | None = attrs.field(default=None, init=False)
    _probe_in_flight: bool = attrs.field(default=False, init=False)
    # The automatic bench came from failures of ours (the threshold, a failed probe), not from
    # a wait the provider sent or an immediate bench, and its active probe has not begun.
    _failing: bool = attrs.field(default=False, init=False)

    @property
    def consecutive_failures(self) -> int:
        """Counted failures since the last success."""
        return self._consecutive_failures

    @property
    def bench_count(self) -> int:
        """Automatic benches in a row since the last success."""
        return self._streak

    @property
    def probe_in_flight(self) -> bool:
        """The half-open probe is running."""
        return self._probe_in_flight

    @property
    def manual(self) -> bool:
        """A manual bench is set (it may have ended since the last call with a ``now``)."""
        return self._manual_until is not None

    def _settle(self, now: float) -> None:
        # Benches that have ended are folded away, so that next_change() only reports what is
        # still to come.
        if self._auto_until is not None and self._auto_until <= now:
            self._auto_until = None
            self._half_open = True
        if self._manual_until is not None and self._manual_until <= now:
            self._manual_until = None

    def _auto_state(self, now: float) -> State:
        self._settle(now)
        if self._auto_until is not None:
            return State.BENCHED
        return State.PROBING if self._half_open else State.OK

    def state(self, now: float) -> State:
        """The state at ``now``."""
        auto = self._auto_state(now)
        return State.BENCHED if self._manual_until is not None else auto

    def _awaiting_active_probe(self) -> bool:
        return self.active_probes and self._failing

    def available(self, now: float) -> bool:
        """May a new request be routed here: OK, or PROBING with no probe in flight (and, with
        active probes, once the actor's own probe has had its turn)."""
        state = self.state(now)
        return state is State.OK or (
            state is State.PROBING
            and not self._probe_in_flight
            and not self._awaiting_active_probe()
        )

    def next_change(self) -> float:
        """The time ``state()`` will next change on its own (the end of the bench), or ``math.inf``.

        A time in the past means a bench has ended and no method has been called with a later
        ``now`` since: call ``state(now)`` and this moves on to the next change.
        """
        if self._manual_until is None:
            return math.inf if self._auto_until is None else self._auto_until
        if self._auto_until is None:
            return self._manual_until
        return max(self._manual_until, self._auto_until)

    def begin_attempt(self, now: float) -> bool:
        """Record that a job starts.

        Returns:
            ``True`` if this attempt is the half-open probe (it is then marked in flight).
        """
        if (
            self.state(now) is State.PROBING
            and not self._probe_in_flight
            and not self._awaiting_active_probe()
        ):
            self._probe_in_flight = True
            return True
        return False

    def begin_active_probe(self, now: float) -> bool:
        """Like ``begin_attempt``, for the actor's own probe: only after a bench for failures
        (the threshold, a failed probe), not one for a wait the provider sent (``Retry-After``)
        or an immediate bench (auth, quota), which a cheap request would not settle.

        Returns:
            ``True`` if the caller is now the half-open probe (marked in flight).
        """
        if self._failing and self.state(now) is State.PROBING and not self._probe_in_flight:
            self._failing = False
            self._probe_in_flight = True
            return True
        return False

    def active_probe_due(self, now: float) -> bool:
        """A bench for failures has ended and the actor's own probe has not begun."""
        return (
            self._failing and not self._probe_in_flight and self.state(now) is State.PROBING
        )

    def _end_probe(self, probe: bool) -> bool:
        # A probe flag is honoured only if the probe is still marked: at most one probe at a time.
        if probe and self._probe_in_flight:
            self._probe_in_flight = False
            return True
        return False

    def record_success(self, now: float, *, probe: bool) -> bool:
        """Record a successful attempt: counters and the streak reset.

        A success never lifts an automatic bench that is still running (the attempt began
        before it), nor a manual bench.

        Returns:
            ``True`` if this ended a PROBING period (the actor recovered).
        """
        was_probing = self.state(now) is State.PROBING
        self._end_probe(probe)
        self._consecutive_failures = 0
        self._streak = 0
        self._half_open = False
        self._failing = False
        return was_probing

    def record_failure(
        self,
        failure: Failure,
        now: float,
        *,
        probe: bool,
        may_bench: bool = True,
        counted: Callable[[], int] | None = None,
    ) -> float | None:
        """Record a failed attempt and bench the actor if the policy says so.

        Args:
            failure: the classified failure.
            now: the current time.
            probe: the attempt was the half-open probe (``begin_attempt`` returned ``True``).
            may_bench: ``False`` to count the failure without benching (the supervisor's cap on
                the share of benched actors).
            counted: for a failure that counts towards the threshold, counts it elsewhere too
                and returns the count there (the fleet's, through the shared state); the
                record's count becomes the larger of its own and that.

        Returns:
            The end of the automatic bench if this failure started or extended it, else ``None``.
        """
        self._settle(now)
        is_probe = self._end_probe(probe)
        category = failure.category
        if category in NO_PENALTY:
            return None
        policy = self.policy
        retry_after = failure.retry_after
        if retry_after is not None:
            # A wait the provider sent (Retry-After, a rate-limit reset) is the provider's word,
            # not ours: `Retry-After: 99999999` or a year-9999 date must not bench it for years.
            # It is capped like our own cooldowns (a manual bench is not). NaN and <= 0: none.
            retry_after = min(retry_after, policy.cooldown_cap) if retry_after > 0 else None

        own: float | None  # the category's own bench, if it has one
        if category in policy.bench_immediately:
            own = max(policy.long_bench, retry_after or 0.0)
        elif category is Category.RATE_LIMIT and retry_after is not None:
            own = retry_after
        elif category is Category.OVERLOADED:
            own = policy.overload_bench if retry_after is None else retry_after
        else:
            own = None
            self._consecutive_failures += 1
            if counted is not None:
                self._consecutive_failures = max(self._consecutive_failures, counted())

        if self.exempt or not may_bench:
            return None
        active = self._auto_until is not None
        # Failures of attempts that began before the bench do not escalate it.
        escalate = (
            (is_probe and self._half_open)
            or (
                own is None
                and not active
                and self._consecutive_failures >= policy.failure_threshold
            )
        )
        durations = [] if own is None else [own]
        if escalate:
            n = self._streak + 1
            durations.append(policy.cooldown(n))
        if not durations or max(durations) <= 0:
            return None
        until = now + max(durations)
        if self._auto_until is not None:
            if until <= self._auto_until:
                return None
        else:
            self._streak += 1
            self._half_open = False
        self._auto_until = until
        self._failing = escalate
        return until

    def record_reachable(self, *, probe: bool) -> None:
        """Record an active probe that reached the provider without proving the deployment
        serves (its model list answered): the probe ends and the state stays PROBING, so that
        the next job is the probe that decides. No counter changes."""
        self._end_probe(probe)

    def record_cancelled(self, *, probe: bool) -> None:
        """Record an attempt whose caller went away: no penalty; a cancelled probe frees its slot."""
        self._end_probe(probe)

    def bench(self, now: float, seconds: float | None) -> None:
        """Bench the actor by hand, for ``seconds`` or (``None``) until ``unbench()``.

        A manual bench is never shortened by a later, shorter one (call ``unbench()`` first).
        An exempt actor is never benched: this does nothing for it.

        Raises:
            ValueError: ``seconds`` is negative or NaN.
        """
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"bench seconds must be >= 0 or None, got {seconds!r}")
        if self.exempt:
            return
        self._settle(now)
        until = math.inf if seconds is None else now + seconds
        if until <= now:
            return
        if self._manual_until is None or until > self._manual_until:
            self._manual_until = until

    def unbench(self) -> None:
        """Lift every bench (manual and automatic) and reset counters and streak.

        A probe still in flight stays marked until it reports, so that two probes never overlap;
        its outcome then counts as an ordinary attempt's unless the actor is PROBING again.
        """
        self._manual_until = None
        self._auto_until = None
        self._half_open = False
        self._failing = False
        self._consecutive_failures = 0
        self._streak = 0

    def snapshot(self, now: float, name: str, in_flight: int) -> HealthSnapshot:
        """The health at ``now`` as a frozen value.

        Args:
            now: the current time.
            name: the actor's name.
            in_flight: attempts running on the actor.
        """
        state = self.state(now)
        until: float | None = None
        if state is State.BENCHED:
            until = self.next_change()
        return HealthSnapshot(
            name=name,
            state=state,
            benched_until=until,
            consecutive_failures=self._consecutive_failures,
            manual=self._manual_until is not None,
            in_flight=in_flight,
            probe_in_flight=self._probe_in_flight,
            bench_count=self._streak,
            exempt=self.exempt,
            provider_state=state,
        )

    def deployment_snapshot(self, now: float, model: str) -> DeploymentSnapshot:
        """The health at ``now`` of the deployment ``model`` this record tracks."""
        state = self.state(now)
        return DeploymentSnapshot(
            model=model,
            state=state,
            benched_until=self.next_change() if state is State.BENCHED else None,
            consecutive_failures=self._consecutive_failures,
            manual=self._manual_until is not None,
            probe_in_flight=self._probe_in_flight,
            bench_count=self._streak,
        )
