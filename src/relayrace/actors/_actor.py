"""The provider actor: a long-lived trio task that owns one provider's inbox, health and
cooldown timer, and runs each job (one attempt) in its own nursery under a concurrency limit.

The actor is the only writer of its health. The supervisor hands it jobs with ``submit`` (which
never blocks: a full inbox refuses the job, and the supervisor moves on) and waits for
``job.done``. Time budgets are cancel scopes around the client's call.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import attrs
import trio

from .._config import Budgets
from .._errors import ProviderError
from .._events import Event, EventKind
from .._failure import Category, Failure
from .._policy import Match, Policies
from .._values import Outcome
from ._client import ClientCall, Completion
from ._health import Health, HealthSnapshot, State

Emit = Callable[[str], Awaitable[None]]
#: Send a piece of the answer if that needs no waiting: True if it was taken (or swallowed),
#: False if nothing happened and ``Emit`` must be awaited.
EmitNowait = Callable[[str], bool]


def _never_now(text: str) -> bool:
    return False


@attrs.define(eq=False)
class Job:
    """One attempt, from the supervisor to an actor, and its result.

    ``emit`` sends a piece of the answer towards the caller (it may wait: backpressure).
    The actor fills in the result and sets ``done``; the supervisor calls ``cancel`` if the
    caller goes away or the request runs out of time.
    """

    call: ClientCall
    emit: Emit
    emit_nowait: EmitNowait = _never_now
    request_id: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)
    outcome: Outcome | None = None
    completion: Completion | None = None
    failure: Failure | None = None
    probe: bool = False
    #: routed here whatever the actor's health (a terminus, or every actor benched): run it even
    #: if the actor is benched when the job starts.
    forced: bool = False
    started_at: float | None = None
    first_delta_at: float | None = None
    ended_at: float | None = None
    deltas: int = 0
    #: the provider started answering (its response headers arrived, or a delta).
    progressed: bool = False
    cancel_requested: bool = False
    _scope: trio.CancelScope | None = None

    def cancel(self) -> None:
        """Stop the attempt at once (the caller went away or its budget ran out)."""
        self.cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()

    def finish(
        self,
        outcome: Outcome,
        *,
        completion: Completion | None = None,
        failure: Failure | None = None,
    ) -> None:
        if self.done.is_set():
            return
        self.outcome = outcome
        self.completion = completion
        self.failure = failure
        self.ended_at = trio.current_time()
        self.done.set()

    def finish_interrupted(self, actor: str, reason: str) -> None:
        """End a job that the actor could not finish itself (it crashed or was stopped)."""
        if self.cancel_requested:
            self.finish(Outcome.CANCELLED)
        else:
            self.finish(
                Outcome.FAILED,
                failure=Failure(
                    category=Category.UNKNOWN,
                    code=reason,
                    message=f"actor {actor}: {reason.replace('_', ' ')}",
                    provider=actor,
                ),
            )


class _Sink:
    """The client's sink for one job: forwards deltas and moves the attempt's deadline.

    One cancel scope holds every time budget of an attempt: its deadline is the earlier of the
    attempt's end and the first-token (then idle) deadline, which each delta pushes back.
    """

    __slots__ = ("_job", "_scope", "_idle", "_end")

    def __init__(self, job: Job, scope: trio.CancelScope, idle: float, end: float):
        self._job = job
        self._scope = scope
        self._idle = idle
        self._end = end

    async def delta(self, text: str) -> None:
        if not text:
            return
        job = self._job
        scope = self._scope
        try:
            # The fast path: the caller is waiting for it. The provider's read is the checkpoint.
            if not job.emit_nowait(text):
                # Waiting on a slow caller is not the provider's fault: no idle deadline meanwhile.
                scope.deadline = self._end
                await job.emit(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The caller is gone. Cancel rather than raise, so that the client's error mapping
            # never mistakes this for a provider failure.
            job.cancel()
            await trio.lowlevel.checkpoint()
        now = trio.current_time()
        if job.deltas == 0:
            job.first_delta_at = now
        job.deltas += 1
        scope.deadline = min(self._end, now + self._idle)

    def progress(self) -> None:
        self._job.progressed = True
        self._scope.deadline = min(self._end, trio.current_time() + self._idle)


class ProviderActor:
    """One provider client as an actor.

    Args:
        name: the provider's name.
        client: the provider client.
        model: the upstream model to ask for, or ``None`` to pass the route's name through.
        policies: the supervisor's policies (health, demotion).
        budgets: this provider's time budgets.
        max_concurrency / inbox_size: attempts run at once / queued beyond that.
        exempt: never benched.
        publish: where events go.
        may_bench: asked before a bench (the supervisor's cap on benched actors).
    """

    def __init__(
        self,
        *,
        name: str,
        client: object,
        model: str | None,
        policies: Policies,
        budgets: Budgets,
        max_concurrency: int,
        inbox_size: int,
        exempt: bool = False,
        terminus: bool = False,
        continues: bool = False,
        priority: int = 0,
        weight: float = 1.0,
        publish: Callable[[Event], None] = lambda event: None,
        may_bench: Callable[[str], bool] = lambda name: True,
    ):
        self.name = name
        self.client = client
        self.model = model
        self.budgets = budgets
        self.max_concurrency = max_concurrency
        self.terminus = terminus
        self.continues = continues
        self.priority = priority
        self.weight = weight
        self.health = Health(policies.health, exempt=exempt)
        self.demotion = 0
        self.in_flight = 0
        self.alive = True
        #: crashed and waiting to be restarted: routing skips it meanwhile.
        self.restarting = False
        self._demote: Match = policies.demote
        self._probe_timeout = policies.health.probe_timeout
        self._publish = publish
        self._may_bench = may_bench
        self._inbox_send, self._inbox = trio.open_memory_channel[Job](inbox_size)
        self._slots = trio.Semaphore(max_concurrency)
        self._wake_timer = trio.Event()
        self._running: set[Job] = set()

    # --- called by the supervisor -----------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job without waiting. Returns False if the inbox is full or the actor is gone."""
        try:
            self._inbox_send.send_nowait(job)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def available(self, now: float) -> bool:
        return self.alive and not self.restarting and self.health.available(now)

    def snapshot(self, now: float) -> HealthSnapshot:
        return self.health.snapshot(now, self.name, self.in_flight)

    def bench(self, seconds: float | None) -> None:
        """Bench by hand; automatic logic never shortens it."""
        self.health.bench(trio.current_time(), seconds)
        self._wake_timer.set()
        until = math.inf if seconds is None else trio.current_time() + seconds
        self._emit(EventKind.ACTOR_BENCHED, until=until, detail="manual")

    def unbench(self) -> None:
        self.health.unbench()
        self.demotion = 0
        self._wake_timer.set()
        self._emit(EventKind.ACTOR_RECOVERED, detail="manual")

    def close(self, reason: str = "actor_gave_up") -> None:
        """Refuse new jobs for good and fail the ones still queued (they fail over, unless the
        supervisor is shutting down)."""
        self.alive = False
        self._inbox_send.close()
        self.fail_queued(reason)

    def fail_queued(self, reason: str) -> None:
        """Fail the jobs waiting in the inbox (they fail over): the actor crashed or gave up."""
        while True:
            try:
                job = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            job.finish_interrupted(self.name, reason)

    # --- the actor's own task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve jobs until cancelled. Raises whatever a client raised that was not a
        ``ProviderError`` (a bug): the supervisor restarts the actor; its jobs fail over."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cooldown_timer)
                task_status.started()
                while True:
                    # Take a slot first, so that a busy actor holds no job beyond its inbox.
                    await self._slots.acquire()
                    try:
                        job = await self._inbox.receive()
                    except BaseException:
                        self._slots.release()
                        raise
                    if job.cancel_requested:
                        job.finish(Outcome.CANCELLED)
                        self._slots.release()
                        continue
                    nursery.start_soon(self._run_job, job)
        except trio.EndOfChannel:
            pass
        finally:
            for job in list(self._running):
                job.finish_interrupted(self.name, "actor_stopped")
            self._running.clear()

    async def _cooldown_timer(self) -> None:
        # Wakes when a bench ends, so that subscribers hear the actor is being probed.
        while True:
            self._wake_timer = trio.Event()
            until = self.health.next_change()
            with trio.move_on_at(until):
                await self._wake_timer.wait()
            now = trio.current_time()
            if now >= until and self.health.state(now) is State.PROBING:
                self._emit(EventKind.ACTOR_PROBING)

    async def _run_job(self, job: Job) -> None:
        self._running.add(job)
        self.in_flight += 1
        try:
            await self._attempt(job)
        except BaseException as exc:
            crashed = not isinstance(exc, trio.Cancelled)
            if not job.done.is_set():
                if job.probe:
                    self.health.record_cancelled(probe=True)
                job.finish_interrupted(self.name, "actor_crashed" if crashed else "actor_stopped")
            raise
        finally:
            self.in_flight -= 1
            self._running.discard(job)
            self._slots.release()

    async def _attempt(self, job: Job) -> None:
        now = trio.current_time()
        job.started_at = now
        health = self.health
        state = health.state(now)
        if state is State.PROBING and not health.available(now):
            # Another job is already the probe; this one must not pile onto a sick provider.
            job.finish(
                Outcome.FAILED,
                failure=Failure(
                    category=Category.LOCAL_CAPACITY,
                    code="probe_in_flight",
                    message=f"{self.name} is being probed after a bench",
                    provider=self.name,
                ),
            )
            return
        if state is State.BENCHED and not job.forced:
            # Routed while the actor was healthy (or probing), benched since: typically a probe
            # failed while this job waited for its turn. Sending it would make a second attempt
            # on a provider that is benched, so it fails over instead, like the case above.
            job.finish(
                Outcome.FAILED,
                failure=Failure(
                    category=Category.LOCAL_CAPACITY,
                    code="benched",
                    message=f"{self.name} was benched after the request was routed to it",
                    provider=self.name,
                ),
            )
            return
        probe = job.probe = health.begin_attempt(now)
        budgets = self.budgets
        attempt_budget = budgets.attempt
        budget_name = "attempt"
        if probe and self._probe_timeout < attempt_budget:
            attempt_budget, budget_name = self._probe_timeout, "probe"
        completion: Completion | None = None
        failure: Failure | None = None
        end = now + attempt_budget
        with trio.CancelScope(deadline=min(end, now + budgets.first_token)) as scope:
            job._scope = scope
            if job.cancel_requested:
                scope.cancel()
            try:
                completion = await self.client.call(  # type: ignore[attr-defined]
                    job.call, _Sink(job, scope, budgets.idle, end)
                )
            except ProviderError as exc:
                failure = (
                    exc.failure
                    if exc.failure.provider == self.name
                    else exc.failure.with_provider(self.name)
                )
        job._scope = None
        now = trio.current_time()
        if scope.cancelled_caught:
            # Which budget ran out (or the caller went away)?
            if job.cancel_requested:
                health.record_cancelled(probe=probe)
                job.finish(Outcome.CANCELLED)
                return
            if now >= end:
                failure = self._timeout(
                    f"{budget_name}_timeout",
                    f"the {budget_name} budget of {attempt_budget:g}s ran out",
                )
            elif job.deltas or job.progressed:
                failure = self._timeout("idle_timeout", f"nothing for {budgets.idle:g}s")
            else:
                failure = self._timeout(
                    "first_token_timeout", f"no answer within {budgets.first_token:g}s"
                )
        if failure is None:
            assert completion is not None
            if health.record_success(now, probe=probe):
                self._emit(EventKind.ACTOR_RECOVERED)
            self.demotion = 0
            job.finish(Outcome.OK, completion=completion)
            return
        if failure.category is Category.CANCELLED:
            health.record_cancelled(probe=probe)
        else:
            until = health.record_failure(
                failure, now, probe=probe, may_bench=self._may_bench(self.name)
            )
            if until is not None:
                self._wake_timer.set()
                self._emit(EventKind.ACTOR_BENCHED, until=until, failure=failure)
            if self._demote and self._demote.match(failure) is not None:
                self.demotion += 1
        job.finish(Outcome.FAILED, failure=failure)

    def _timeout(self, code: str, message: str) -> Failure:
        return Failure(
            category=Category.TIMEOUT,
            code=code,
            message=f"{self.name}: {message}",
            provider=self.name,
        )

    def _emit(
        self,
        kind: EventKind,
        *,
        until: float | None = None,
        failure: Failure | None = None,
        detail: str | None = None,
    ) -> None:
        self._publish(
            Event(
                kind=kind,
                time=trio.current_time(),
                actor=self.name,
                until=until,
                failure=failure,
                detail=detail,
            )
        )
