"""The provider actor: owns one provider's inbox, health and cooldown timer, and admits each
job (one attempt) under a concurrency limit.

An attempt runs in the task of the request that made it (``run_job``), holding one of the
actor's slots, inside a cancel scope that the actor can cancel (a crash, a stop). A job that
finds every slot taken waits in the actor's bounded inbox (by priority, then first in, first
out) or, when that is full too, is refused at once (``local_capacity``) and the supervisor
moves on. Running the attempt in the requester's task rather than in a task of the actor's own is what keeps the
supervisor's cost per request close to a bare HTTP call: no task to start, no task switch to
hand the job over or the result back (measured in ``benchmarks/``).

The actor is the only writer of its health: every change goes through its methods, which run
synchronously (no checkpoint inside), so no two attempts can interleave an update. Health is
kept per deployment (``Deployments``: the upstream model an attempt asks for), with one
provider-wide record for failures of the account; a deployment is available when both its own
record and the provider-wide one are. Its own task
runs the cooldown timer and is what the supervisor restarts when a client crashes (raises
anything but ``ProviderError``): a crash interrupts the actor's other attempts and empties its
inbox; those jobs fail over. Time budgets live in one cancel scope around the client's call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import trio

from .._client import Capabilities, Completion, ProviderClient
from .._config import Budgets
from .._decide import capped_wait
from .._errors import ProviderError
from .._events import Event, EventKind
from .._failure import Category, Failure
from .._policy import Match, Policies
from .._values import Outcome
from ._deployments import DEFAULT_MAX_DEPLOYMENTS, Deployments, account_level, worst_state
from ._health import Health, HealthSnapshot, State
from ._inbox import Inbox
from ._job import Job, JobSink, refusal
from ._probe import Probe, run_probe
from ._shared import UNSHARED, Unshared


class ProviderActor:
    """One provider client as an actor.

    Args:
        name: the provider's name.
        client: the provider client.
        model: the upstream model to ask for, or ``None`` to pass the route's name through.
        policies: the supervisor's policies (health, demotion).
        budgets: this provider's time budgets.
        max_concurrency / inbox_size: attempts run at once / jobs waiting for a slot.
        exempt: never benched.
        publish: where events go.
        may_bench: asked before a bench, with the actor's name and the deployment (``None``:
            provider-wide): the supervisor's cap on benched actors.
        max_deployments: the most deployments whose health the actor keeps (``Deployments``).
        shared: the benches, probe leases and failure counts shared with other processes.
    """

    def __init__(
        self,
        *,
        name: str,
        client: ProviderClient,
        model: str | None,
        policies: Policies,
        budgets: Budgets,
        max_concurrency: int,
        inbox_size: int,
        exempt: bool = False,
        terminus: bool = False,
        continues: bool = False,
        capabilities: Capabilities | None = None,
        priority: int = 0,
        weight: float = 1.0,
        publish: Callable[[Event], None] = lambda event: None,
        may_bench: Callable[[str, str | None], bool] = lambda name, model: True,
        max_deployments: int = DEFAULT_MAX_DEPLOYMENTS,
        shared: Unshared = UNSHARED,
    ):
        self.name = name
        self.client = client
        self.model = model
        self.budgets = budgets
        self.max_concurrency = max_concurrency
        self.inbox_size = inbox_size
        self.terminus = terminus
        self.continues = continues
        self.capabilities = capabilities if capabilities is not None else Capabilities()
        self.priority = priority
        self.weight = weight
        probes: Callable[[str], bool] | None = getattr(client, "probes", None)
        self._probe: Probe | None = None  # the client's active probe (``ProbingClient``)
        if probes is not None:
            self._probe = client.probe  # type: ignore[attr-defined]
        #: the health of each deployment, and the provider-wide record (``health``)
        self.deployments = Deployments(
            policies.health,
            exempt=exempt,
            probes=(lambda m: bool(probes(m))) if probes is not None else (lambda m: False),
            cap=max_deployments,
        )
        #: the provider-wide health: account-level failures and provider-wide manual benches
        self.health = self.deployments.provider
        self.demotion = 0
        self.in_flight = 0
        self.alive = True
        #: crashed and waiting to be restarted: routing skips it, and it refuses jobs meanwhile.
        self.restarting = False
        #: when an actor that gave up is restarted afresh (``None``: it has not given up).
        self.gave_up_until: float | None = None
        self._health_policy = policies.health
        self._demote: Match = policies.demote
        self._probe_timeout = policies.health.probe_timeout
        self._publish = publish
        self._may_bench = may_bench
        self._shared = shared
        self._call = client.call
        self._inbox = Inbox()  # by the request's priority (metadata), then first in first out
        self._running: set[Job] = set()
        self._wake_timer = trio.Event()
        self._crash: BaseException | None = None
        self._crashed = trio.Event()

    # --- called by the supervisor -----------------------------------------------------------

    async def run_job(self, job: Job) -> None:
        """Run one attempt in the calling task and fill in its result.

        The job takes a free slot, or waits for one in the inbox, or, when the inbox is full
        (or the actor is gone or restarting), is refused at once with a ``local_capacity``
        failure. Cancelling the calling task cancels the attempt (the job ends ``cancelled``)
        and re-raises.
        """
        if not self.alive or self.restarting:
            if self.alive:
                code, what = "actor_restarting", "is restarting after a crash"
            elif self.gave_up_until is not None:
                code, what = "actor_gave_up", "gave up after repeated crashes"
            else:
                code, what = "actor_gone", "is not running"
            job.finish(
                Outcome.FAILED,
                failure=refusal(self.name, Category.LOCAL_CAPACITY, code, f"{self.name} {what}"),
            )
            return
        if self.in_flight < self.max_concurrency and not self._inbox:
            self.in_flight += 1
        elif len(self._inbox) < self.inbox_size:
            if not await self._wait_for_slot(job):
                return
        else:
            message = f"{self.name}'s inbox is full"
            failure = refusal(self.name, Category.LOCAL_CAPACITY, "inbox_full", message)
            job.finish(Outcome.FAILED, failure=failure)
            return
        try:
            await self._attempt(job)
        finally:
            self._release()

    def deployment(self, model: str | None) -> str | None:
        """The deployment a request for ``model`` uses: the provider's configured model, or
        (a passthrough provider) the request's."""
        return self.model if self.model is not None else model

    def available(self, now: float, model: str | None = None) -> bool:
        """May a request for ``model`` be routed here (``None``: the provider as a whole)."""
        if not self.alive or self.restarting or not self.health.available(now):
            return False
        deployment = self.model if self.model is not None else model
        record = self.deployments.get(deployment)
        if record is not None and not record.available(now):
            return False
        return not self._shared.held_elsewhere(deployment)

    def unavailable_record(self, now: float, model: str | None) -> tuple[str | None, State]:
        """Why ``available(now, model)`` is false: the deployment whose record says so
        (``None``: the provider-wide record) and its state."""
        return self.deployments.unavailable(now, self.deployment(model))

    def benched(self, now: float, model: str | None) -> bool:
        """The provider, or the deployment ``model`` uses, is benched."""
        return self.deployments.benched(now, self.deployment(model))

    def manually_benched(self, now: float, model: str | None) -> bool:
        """A manual bench of the provider, or of the deployment ``model`` uses, is running."""
        deployment = self.deployment(model)
        benched = self.deployments.benched(now, deployment, manual=True)
        return benched or self._shared.manually_benched(deployment)

    def next_change(self, now: float, model: str | None) -> float:
        """When the bench that keeps ``model``'s deployment unavailable ends, or ``math.inf``."""
        deployment = self.deployment(model)
        return self._shared.next_change(deployment, self.deployments.next_change(now, deployment))

    @property
    def queued(self) -> int:
        """Jobs waiting in the inbox for a free slot (the inbox's depth)."""
        return len(self._inbox)

    def snapshot(self, now: float) -> HealthSnapshot:
        """The provider's health: the worst of its provider-wide and deployment records, with
        each deployment's own."""
        snapshot = self.deployments.snapshot(now, self.name, self.in_flight)
        if self.gave_up_until is not None:
            return attrs.evolve(
                snapshot,
                state=State.GAVE_UP,
                provider_state=State.GAVE_UP,
                gave_up_until=self.gave_up_until,
            )
        return snapshot

    def bench(
        self, seconds: float | None, model: str | None = None, *, share: bool = True,
        reason: str = "manual",
    ) -> None:
        """Bench by hand (``reason``: ``manual``, ``drained``) the provider or (``model``) one
        deployment; automatic logic never shortens it. Raises ``ValueError``: ``model`` is not
        the model of a provider configured with one."""
        now = trio.current_time()
        key = self._manual_key(model)
        record = self.health if key is None else self.deployments.use(key, now, keep=True)
        record.bench(now, seconds)
        self._wake_timer.set()
        until = math.inf if seconds is None else now + seconds
        if share and not self.deployments.provider.exempt:  # (``share``: with the fleet)
            self._shared.bench(key, until, reason, manual=True)
        self._emit(EventKind.ACTOR_BENCHED, until=until, detail=reason, model=key)

    def unbench(self, model: str | None = None, *, share: bool = True) -> None:
        """Lift every bench of the provider and its deployments, or (``model``) of one
        deployment, and reset their counters.

        Raises:
            ValueError: ``model`` is not the model of a provider configured with one.
        """
        key = self._manual_key(model)
        if key is None:
            self.health.unbench()
            for _, record in self.deployments:
                record.unbench()
            self.demotion = 0
        else:
            kept = self.deployments.get(key)
            if kept is not None:
                kept.unbench()
        if share:
            self._shared.unbench(key, manual=True)
        self._wake_timer.set()
        self._emit(EventKind.ACTOR_RECOVERED, detail="manual", model=key)

    def _manual_key(self, model: str | None) -> str | None:
        if model is not None and self.model is not None and model != self.model:
            raise ValueError(f"{self.name} serves only model {self.model!r}, not {model!r}")
        return model

    def close(self, reason: str = "supervisor_closed") -> None:
        """Refuse new jobs for good, fail the ones waiting in the inbox and stop the ones
        running (they fail over, unless the supervisor is shutting down)."""
        self.alive = False
        self.fail_queued(reason)
        self.interrupt_running(reason)

    def give_up(self, until: float) -> None:
        """Refuse jobs until ``reopen`` (the supervisor's cool-off ends at ``until``), as
        ``close`` does; ``snapshot`` says ``gave_up`` meanwhile."""
        self.gave_up_until = until
        self.close("actor_gave_up")

    def reopen(self) -> None:
        """Take jobs again after a cool-off (the supervisor restarts the actor's task)."""
        self.gave_up_until = None
        self.alive = True

    def fail_queued(self, reason: str) -> None:
        """Fail the jobs waiting in the inbox (they fail over): the actor crashed or gave up."""
        while self._inbox:
            self._inbox.popleft().finish_interrupted(self.name, reason)

    def interrupt_running(self, reason: str) -> None:
        for job in list(self._running):
            job.interrupt(reason)

    # --- the actor's own task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the cooldown timer until cancelled. Raises what a client raised that was not a
        ``ProviderError`` (a bug): the supervisor restarts the actor; its jobs fail over."""
        self._crash = None
        self._crashed = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cooldown_timer)
                task_status.started()
                await self._crashed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.interrupt_running("actor_stopped")
        assert self._crash is not None
        raise self._crash

    async def _cooldown_timer(self) -> None:
        # Wakes when a bench ends, so that subscribers hear the deployment is being probed, and
        # probes it if its client can (also a bench that ended while the actor restarted).
        while True:
            now = trio.current_time()
            if self._probe is not None:
                due = self._due_probe(now)
                if due is not None:
                    # Shared: only the probe lease's holder probes; the others await its verdict.
                    await self._shared.leased(self._active_probe, self._probe, *due)
                    continue
            self._wake_timer = trio.Event()
            records: list[tuple[str | None, Health]] = [(None, self.health), *self.deployments]
            ends = [(model, record, record.next_change()) for model, record in records]
            with trio.move_on_at(min(end for _, _, end in ends)):
                await self._wake_timer.wait()
            now = trio.current_time()
            for model, record, end in ends:
                if now >= end and record.state(now) is State.PROBING:
                    self._emit(EventKind.ACTOR_PROBING, model=model)

    def _due_probe(self, now: float) -> tuple[str, Health] | None:
        """The deployment whose active probe is due (now marked in flight), if any."""
        for model, record in self.deployments:
            if record.active_probes and record.begin_active_probe(now):
                return model, record
        return None

    async def _active_probe(self, probe: Probe, model: str, health: Health) -> None:
        """Run the half-open probe of deployment ``model`` from the actor's own task
        (``begin_active_probe`` marked it) and record its outcome like a job's."""
        outcome = None
        try:
            outcome = await run_probe(probe, model=model, actor=self.name, policy=self._health_policy)
        except Exception as exc:  # a bug in the client, as in an attempt
            self._crashed_by(exc)
            return
        finally:
            if outcome is None:  # it crashed, or the actor is stopping
                health.record_cancelled(probe=True)
        now = trio.current_time()
        failure = outcome.failure
        if failure is not None:
            self._record_failure(failure, now, model, health, probe=True, wide_probe=False)
        elif outcome.proven:
            if health.record_success(now, probe=True):
                self.demotion = 0
                self._emit(EventKind.ACTOR_RECOVERED, detail="probe", model=model)
                self._shared.record_success(model, recovered=True)
        else:  # reachable, not proven (a model list), or nothing sent: the next job decides
            health.record_reachable(probe=True)

    def _record_failure(
        self,
        failure: Failure,
        now: float,
        model: str,
        health: Health,
        *,
        probe: bool,
        wide_probe: bool,
        detail: str | None = "probe",
    ) -> None:
        """Record a failure of deployment ``model`` (``probe``: it was that deployment's probe;
        ``wide_probe``: the provider-wide one's): an account-level one on the provider-wide
        record, any other on the deployment's; the other record's probe, if any, ends
        undecided."""
        if account_level(failure, model):
            health.record_reachable(probe=probe)
            record, key, probe = self.health, None, wide_probe
        else:
            self.health.record_reachable(probe=wide_probe)
            record, key = health, model
        shared = self._shared
        counted = shared.counter(key, record.policy.failure_threshold)  # the fleet's, if shared
        may_bench = self._may_bench(self.name, key)
        until = record.record_failure(failure, now, probe=probe, may_bench=may_bench, counted=counted)
        if until is not None:
            shared.bench(key, until, failure.category.value, manual=False)
            self._wake_timer.set()
            self._emit(EventKind.ACTOR_BENCHED, until=until, failure=failure, detail=detail, model=key)

    # --- slots --------------------------------------------------------------------------------

    async def _wait_for_slot(self, job: Job) -> bool:
        """Wait in the inbox until a slot is handed over (True) or the job is ended (False):
        by the actor, or by the queue budget, past which it fails over (``queue_timeout``)."""
        job._wake = trio.Event()
        self._inbox.append(job)
        try:
            with trio.move_on_after(self.budgets.queue):
                await job._wake.wait()
            if not job._wake.is_set():
                self._inbox.remove(job)
                job.finish(
                    Outcome.FAILED,
                    failure=refusal(
                        self.name,
                        Category.LOCAL_CAPACITY,
                        "queue_timeout",
                        f"no slot of {self.name} came free within "
                        f"{self.budgets.queue:g}s (queue budget)",
                    ),
                )
                return False
        except BaseException:
            if job._granted:
                self._release()
            elif job in self._inbox:
                self._inbox.remove(job)
            job.finish(Outcome.CANCELLED)
            raise
        if not job._granted:
            return False  # ended while it waited (the actor crashed, gave up or stopped)
        if job.done:
            self._release()
            return False
        return True

    def _release(self) -> None:
        """Free a slot, or hand it straight to the first job waiting in the inbox."""
        while self._inbox:
            job = self._inbox.popleft()
            if job.done:
                continue
            job._granted = True
            assert job._wake is not None
            job._wake.set()
            return
        self.in_flight -= 1

    def _crashed_by(self, exc: BaseException) -> None:
        """A client raised a bug: interrupt the other attempts and let the actor's task raise."""
        if self._crash is None:
            self._crash = exc
        self.interrupt_running("actor_crashed")
        self.fail_queued("actor_restarting")
        self._crashed.set()

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, job: Job) -> None:
        now = trio.current_time()
        job.started_at = now
        wide = self.health
        model = job.call.upstream_model
        health = self.deployments.use(model, now)
        wide_state = wide.state(now)
        state = health.state(now)
        if wide_state is not State.OK:  # (guarded: the provider-wide record is rarely touched)
            state = worst_state(wide_state, state)
        if state is State.PROBING and not (wide.available(now) and health.available(now)):
            # Another job is already the probe; this one must not pile onto a sick provider.
            job.finish(
                Outcome.FAILED,
                failure=refusal(
                    self.name,
                    Category.LOCAL_CAPACITY,
                    "probe_in_flight",
                    f"{self.name} is being probed after a bench",
                ),
            )
            return
        if state is State.BENCHED and not job.forced:
            # Routed while the actor was healthy (or probing), benched since: typically a probe
            # failed while this job waited for its turn. Sending it would make a second attempt
            # on a provider that is benched, so it fails over instead, like the case above.
            job.finish(
                Outcome.FAILED,
                failure=refusal(
                    self.name,
                    Category.LOCAL_CAPACITY,
                    "benched",
                    f"{self.name} was benched after the request was routed to it",
                ),
            )
            return
        wide_probe = wide_state is State.PROBING and wide.begin_attempt(now)
        probe = health.begin_attempt(now)
        job.probe = probe or wide_probe
        budgets = self.budgets
        attempt_budget = budgets.attempt
        budget_name = "attempt"
        if probe and self._probe_timeout < attempt_budget:
            attempt_budget, budget_name = self._probe_timeout, "probe"
        completion: Completion | None = None
        failure: Failure | None = None
        end = now + attempt_budget
        running = self._running
        escaped = True
        try:
            with trio.CancelScope(deadline=min(end, now + budgets.first_token)) as scope:
                job._scope = scope
                running.add(job)
                try:
                    if job.cancel_requested:
                        scope.cancel()
                    completion = await self._call(job.call, JobSink(job, scope, budgets.idle, end))
                except ProviderError as exc:
                    failure = capped_wait(
                        exc.failure
                        if exc.failure.provider == self.name
                        else exc.failure.with_provider(self.name),
                        self._health_policy,
                    )
                except Exception as exc:  # a bug in the client, not a provider failure
                    self._crashed_by(exc)
                    job.interrupt("actor_crashed")
                finally:
                    running.discard(job)
                    job._scope = None
            escaped = False
        finally:
            if escaped:
                # The request's own task is cancelled (the caller went away, its budget ran
                # out, the supervisor shuts down): no one's failure.
                health.record_cancelled(probe=probe)
                wide.record_cancelled(probe=wide_probe)
                job.finish(Outcome.CANCELLED)
        now = trio.current_time()
        if job.interrupted is not None and failure is None and completion is None:
            health.record_cancelled(probe=probe)
            wide.record_cancelled(probe=wide_probe)
            job.finish_interrupted(self.name, job.interrupted)
            return
        if scope.cancelled_caught:
            # Which budget ran out (or the caller went away)?
            if job.cancel_requested:
                health.record_cancelled(probe=probe)
                wide.record_cancelled(probe=wide_probe)
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
            if (
                wide_probe or wide_state is not State.OK or wide.consecutive_failures
            ) and wide.record_success(now, probe=wide_probe):
                self._emit(EventKind.ACTOR_RECOVERED)
                self._shared.record_success(None, recovered=True)
            recovered = health.record_success(now, probe=probe)
            if recovered:
                self._emit(EventKind.ACTOR_RECOVERED, model=model)
            self._shared.record_success(model, recovered=recovered)
            self.demotion = 0
            job.finish(Outcome.OK, completion=completion)
            return
        if failure.category is Category.CANCELLED:
            health.record_cancelled(probe=probe)
            wide.record_cancelled(probe=wide_probe)
        else:
            self._record_failure(
                failure, now, model, health, probe=probe, wide_probe=wide_probe, detail=None
            )
            if self._demote and self._demote.match(failure) is not None:
                self.demotion += 1
        job.finish(Outcome.FAILED, failure=failure)

    def _timeout(self, code: str, message: str) -> Failure:
        return refusal(self.name, Category.TIMEOUT, code, f"{self.name}: {message}")

    def _emit(
        self,
        kind: EventKind,
        *,
        until: float | None = None,
        failure: Failure | None = None,
        detail: str | None = None,
        model: str | None = None,
    ) -> None:
        self._publish(
            Event(
                kind=kind,
                time=trio.current_time(),
                actor=self.name,
                model=model,
                until=until,
                failure=failure,
                detail=detail,
            )
        )

