"""The supervisor: runs one actor per provider in its nursery, restarts crashed actors, and
runs each request's failover loop.

``complete`` runs the loop, and each attempt, in the caller's own task; ``stream`` runs it in a
task of the supervisor's nursery tied to the caller's ``async with`` block, and hands deltas
over a bounded queue (``STREAM_BUFFER`` deltas), so a slow reader slows the provider read.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType

import attrs
import trio

from .._config import Config, Route
from .._decide import Situation, decide
from .._errors import BadRequest, RequestFailed
from .._events import Event, EventKind
from .._failure import Category, Failure
from .._values import Action, Attempt, Decision, Delta, Outcome, Reply, Request, Rule, Scope
from ..actors._actor import Emit, EmitNowait, Job, ProviderActor
from ..actors._client import ClientCall
from ..actors._health import HealthSnapshot, State
from ._budget import RetryBudget
from ._routing import plan_route

log = logging.getLogger("relayrace")

#: Restart intensity: at most this many restarts of one actor within ``RESTART_WINDOW`` seconds,
#: after which the actor gives up and its provider is routed around.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF_BASE = 0.1
RESTART_BACKOFF_CAP = 5.0
_EVENT_BUFFER = 1024
#: How many deltas of a stream may wait for its reader before the provider read waits too.
STREAM_BUFFER = 16


@attrs.frozen(kw_only=True)
class SupervisorStatistics:
    """Counters since the supervisor started."""

    requests: int
    in_flight: int
    completed: int
    failed: int
    retries: int
    failovers: int
    restarts: int
    events_dropped: int


class Supervisor:
    """The handle on a running supervisor; get one from ``open_supervisor``."""

    def __init__(self, config: Config, nursery: trio.Nursery):
        self.config = config
        self._nursery = nursery
        self._policies = config.policies
        self._rng = random.Random(config.seed)
        self._budget = RetryBudget(config.policies.retry_budget)
        self._subscribers: list[trio.MemorySendChannel[Event]] = []
        self._closed = False
        #: set when ``open_supervisor``'s block ends: the actors are being cancelled, so a failed
        #: attempt is the shutdown's doing, and there is no one left to fail over to.
        self._shut_down = False
        self._next_id = 0
        self._in_flight = 0
        #: every request running, so that a shutdown can end them (``complete`` runs outside
        #: the supervisor's nursery, in its caller's task).
        self._runs: set[_Run] = set()
        #: set when the last request in flight ends, once ``drain`` waits for it.
        self._idle: trio.Event | None = None
        self._counts = dict.fromkeys(
            (
                "requests",
                "completed",
                "failed",
                "retries",
                "failovers",
                "restarts",
                "events_dropped",
            ),
            0,
        )
        self._actors: dict[str, ProviderActor] = {}
        for p in config.providers:
            self._actors[p.name] = ProviderActor(
                name=p.name,
                client=p.client,
                model=p.model,
                policies=config.policies,
                budgets=p.budgets,
                max_concurrency=p.max_concurrency,
                inbox_size=p.inbox_size,
                exempt=p.exempt,
                terminus=p.terminus,
                continues=p.continues,
                priority=p.priority,
                weight=p.weight,
                publish=self._publish,
                may_bench=self._may_bench,
            )
        self._routes: dict[str, tuple[Route, list[ProviderActor]]] = {}
        for route in config.routes:
            self._routes[route.model] = (route, [self._actors[n] for n in route.chain])
        if not config.routes:
            everyone = Route(model="*", chain=tuple(self._actors.keys()))
            self._routes["*"] = (everyone, list(self._actors.values()))
        self._turns = dict.fromkeys(self._routes, 0)

    # --- public API ---------------------------------------------------------------------------

    async def complete(self, request: Request) -> Reply:
        """Serve a request and return the whole answer.

        Raises:
            BadRequest: the request names no route (raised before any provider is called).
            RequestFailed: no provider could answer; carries the deciding failure, the attempts
                and the decisions.
        """
        run = _Run(self, request, self._route_for(request), streaming=False)
        return await run.execute()

    def stream(self, request: Request) -> RequestStream:
        """Serve a request as a stream of deltas::

            async with sup.stream(request) as s:
                async for delta in s:
                    ...
            reply = s.reply

        Iterating raises ``RequestFailed`` if the request fails. Leaving the block early cancels
        the request and its upstream call.

        Raises:
            BadRequest: the request names no route (raised before any provider is called).
        """
        return RequestStream(self, request, self._route_for(request))

    def health(self) -> dict[str, HealthSnapshot]:
        """A snapshot of every actor's health, by name."""
        now = trio.current_time()
        return {name: actor.snapshot(now) for name, actor in self._actors.items()}

    def bench(self, name: str, seconds: float | None = None) -> None:
        """Bench an actor by hand for ``seconds`` (``None``: until ``unbench``). Automatic logic
        never shortens a manual bench.

        Raises:
            KeyError: no actor has that name.
        """
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError("seconds must be a positive number or None")
        self._actors[name].bench(seconds)

    def unbench(self, name: str) -> None:
        """Lift every bench of an actor and reset its counters.

        Raises:
            KeyError: no actor has that name.
        """
        self._actors[name].unbench()

    @asynccontextmanager
    async def subscribe(
        self, buffer: int = _EVENT_BUFFER
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        """Receive events while the block runs::

            async with sup.subscribe() as events:
                async for event in events: ...

        A subscriber that falls more than ``buffer`` events behind loses the newest ones (counted
        in ``statistics().events_dropped``) rather than slowing requests down.
        """
        send, receive = trio.open_memory_channel[Event](buffer)
        self._subscribers.append(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.remove(send)
            send.close()

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(in_flight=self._in_flight, **self._counts)

    @property
    def routes(self) -> Mapping[str, Route]:
        return {name: route for name, (route, _) in self._routes.items()}

    async def drain(self) -> None:
        """Refuse new requests and wait until every request in flight has ended."""
        self._closed = True
        if self._in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()

    # --- internals --------------------------------------------------------------------------

    def _route_for(self, request: Request) -> tuple[Route, list[ProviderActor]]:
        if not isinstance(request, Request):
            raise BadRequest(
                "request", f"expected a relayrace.Request, got {type(request).__name__}"
            )
        found = self._routes.get(request.model) or self._routes.get("*")
        if found is None:
            raise BadRequest(
                "model",
                f"no route named {request.model!r} (routes: {', '.join(sorted(self._routes))})",
            )
        return found

    def _publish(self, event: Event) -> None:
        for channel in self._subscribers:
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self._counts["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _may_bench(self, name: str) -> bool:
        share = self._policies.health.max_benched_share
        if share >= 1.0:
            return True
        now = trio.current_time()
        benched = sum(
            1
            for a in self._actors.values()
            if a.name != name and a.health.state(now) is State.BENCHED
        )
        return benched + 1 <= share * len(self._actors)

    async def _supervise(
        self, actor: ProviderActor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one actor; restart it with backoff when it crashes, give up past the intensity
        limit."""
        restarts: list[float] = []
        started = False
        while True:
            try:
                if started:
                    await actor.run()
                else:
                    started = True
                    await actor.run(task_status=task_status)
                return
            except Exception as exc:  # a bug in a client or in the actor, not a provider failure
                now = trio.current_time()
                restarts = [t for t in restarts if t > now - RESTART_WINDOW] + [now]
                log.error("actor %s crashed: %r", actor.name, _root_cause(exc))
                if len(restarts) > MAX_RESTARTS:
                    actor.close()
                    self._publish(
                        Event(
                            kind=EventKind.ACTOR_GAVE_UP,
                            time=now,
                            actor=actor.name,
                            detail=repr(_root_cause(exc)),
                        )
                    )
                    return
                actor.restarting = True
                actor.fail_queued("actor_restarting")
                self._counts["restarts"] += 1
                self._publish(
                    Event(
                        kind=EventKind.ACTOR_RESTARTED,
                        time=now,
                        actor=actor.name,
                        detail=repr(_root_cause(exc)),
                    )
                )
                try:
                    await trio.sleep(
                        min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_BASE * 2 ** (len(restarts) - 1))
                    )
                finally:
                    actor.restarting = False


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_supervisor(config: Config) -> AsyncIterator[Supervisor]:
    """Start a supervisor: one actor task per provider, in a nursery this block owns.

    Leaving the block cancels every request still in flight (each ends with ``RequestFailed``)
    and every actor, closes the provider clients, and leaves no task behind. Call
    ``await sup.drain()`` first to let requests in flight finish.
    """
    sup: Supervisor | None = None
    try:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(config, nursery)
            try:
                for actor in sup._actors.values():
                    await nursery.start(sup._supervise, actor)
                yield sup
            finally:
                sup._closed = True
                sup._shut_down = True
                for run in list(sup._runs):
                    run.shut_down()
                nursery.cancel_scope.cancel()
    finally:
        if sup is not None:
            # ``complete`` runs in its caller's task, outside our nursery, and waits for its job:
            # a job left in the inbox of an actor that is gone (queued behind the concurrency
            # limit, or submitted by a failover during the shutdown) would keep its caller
            # waiting until the request's whole budget ran out. End them now, refuse new ones.
            for actor in sup._actors.values():
                actor.close("supervisor_closed")
        # In a `finally`: when the block (or an actor) raises, the nursery re-raises and the
        # clients must still be closed, or their pooled connections leak.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                for provider in config.providers:
                    aclose = getattr(provider.client, "aclose", None)
                    if aclose is not None:
                        await aclose()


class RequestStream:
    """A streamed request: an async context manager, then an async iterator of ``Delta``s.

    ``reply`` holds the ``Reply`` once the stream has ended.
    """

    __slots__ = ("_sup", "_run", "_deltas", "_scope", "_reply", "_error", "_entered")

    def __init__(self, sup: Supervisor, request: Request, route: tuple[Route, list[ProviderActor]]):
        self._sup = sup
        self._run = _Run(sup, request, route, streaming=True)
        self._deltas = _Deltas()
        self._scope = trio.CancelScope()
        self._reply: Reply | None = None
        self._error: RequestFailed | None = None
        self._entered = False

    @property
    def request_id(self) -> int:
        return self._run.request_id

    @property
    def reply(self) -> Reply:
        """The reply, once the stream has ended.

        Raises:
            RequestFailed: the request failed.
            RuntimeError: the stream has not ended yet.
        """
        if self._error is not None:
            raise self._error
        if self._reply is None:
            raise RuntimeError("the stream has not ended yet")
        return self._reply

    async def __aenter__(self) -> RequestStream:
        if self._entered:
            raise RuntimeError("a RequestStream can be entered once")
        self._entered = True
        self._run.emit = self._deltas.put
        self._run.emit_nowait = self._deltas.put_nowait
        self._sup._nursery.start_soon(self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._scope.cancel()
        self._deltas.leave()

    async def _serve(self) -> None:
        with self._scope:
            try:
                self._reply = await self._run.execute()
            except RequestFailed as exc:
                self._error = exc
            finally:
                self._deltas.close()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        deltas = self._deltas
        if deltas._items:  # the fast path of ``get``, without the call
            await trio.lowlevel.checkpoint_if_cancelled()
            return deltas.get_ready()
        try:
            return await deltas.get()
        except trio.EndOfChannel:
            if self._error is not None:
                raise self._error from None
            if self._reply is None:
                # The supervisor shut down under us.
                raise RequestFailed(
                    Failure(
                        category=Category.LOCAL_CAPACITY,
                        code="supervisor_closed",
                        message="the supervisor shut down",
                    ),
                    self._run.attempts,
                    self._run.decisions,
                    request_id=self._run.request_id,
                ) from None
            raise StopAsyncIteration from None


class _Deltas:
    """The deltas of one stream, from the request's task to its reader.

    Bounded: the producer waits while ``STREAM_BUFFER`` deltas are unread. One producer, one
    reader; cheaper than a memory channel for that case: the reader takes a delta that is
    ready without a schedule point, so the deltas of one provider read cost one task switch
    between them, not one each. ``get`` still raises at once if its task is cancelled.
    """

    __slots__ = ("_items", "_reader", "_writer", "_closed", "_gone")

    def __init__(self) -> None:
        # A list, not a deque: it holds at most STREAM_BUFFER items, and an empty deque
        # weighs 600 bytes, for every stream in flight.
        self._items: list[Delta] = []
        self._reader: trio.lowlevel.Task | None = None
        self._writer: trio.lowlevel.Task | None = None
        self._closed = False  # the producer is done: the reader gets EndOfChannel once empty
        self._gone = False  # the reader left: the producer gets BrokenResourceError

    def put_nowait(self, delta: Delta) -> bool:
        """Queue ``delta`` if there is room (True); False if the producer must wait.

        Raises:
            trio.BrokenResourceError: the reader is gone.
        """
        if self._gone:
            raise trio.BrokenResourceError
        if len(self._items) >= STREAM_BUFFER:
            return False
        self._items.append(delta)
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)
        return True

    async def put(self, delta: Delta) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.put_nowait(delta):
            self._writer = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_writer)

    async def get(self) -> Delta:
        await trio.lowlevel.checkpoint_if_cancelled()
        items = self._items
        while not items:
            if self._closed:
                raise trio.EndOfChannel
            self._reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_reader)
        return self.get_ready()

    def get_ready(self) -> Delta:
        """Take the next delta, which must be there."""
        writer = self._writer
        if writer is not None:
            self._writer = None
            trio.lowlevel.reschedule(writer)
        return self._items.pop(0)

    def close(self) -> None:
        """The producer is done."""
        self._closed = True
        self._wake_reader()

    def leave(self) -> None:
        """The reader is done: drop what it did not read, and stop the producer."""
        self._gone = True
        self._items.clear()
        writer = self._writer
        if writer is not None:
            self._writer = None
            trio.lowlevel.reschedule(writer)

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def _abort_reader(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_writer(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._writer = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Run:
    """One request's failover loop."""

    __slots__ = (
        "sup",
        "request",
        "route",
        "chain",
        "streaming",
        "emit",
        "emit_nowait",
        "_scope",
        "_stopped",
        "request_id",
        "attempts",
        "decisions",
        "parts",
        "seq",
        "deadline",
    )

    def __init__(
        self,
        sup: Supervisor,
        request: Request,
        route: tuple[Route, list[ProviderActor]],
        *,
        streaming: bool,
    ):
        self.sup = sup
        self.request = request
        self.route, self.chain = route
        self.streaming = streaming
        # Set by RequestStream for streams.
        self.emit: Callable[[Delta], Awaitable[None]] | None = None
        self.emit_nowait: Callable[[Delta], bool] | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        sup._next_id += 1
        self.request_id = sup._next_id
        self.attempts: list[Attempt] = []
        self.decisions: list[Decision] = []
        self.parts: list[str] = []  # what the caller holds (streams) or will get (complete)
        self.seq = 0

    async def execute(self) -> Reply:
        sup = self.sup
        now = trio.current_time()
        if sup._closed:
            raise self._failed(
                Failure(
                    category=Category.LOCAL_CAPACITY,
                    code="supervisor_closed",
                    message="the supervisor is shutting down",
                )
            )
        sup._counts["requests"] += 1
        sup._in_flight += 1
        sup._runs.add(self)
        sup._budget.record_request(now)
        budget = sup._policies.failover.total_budget
        self.deadline = now + budget
        try:
            with trio.CancelScope(deadline=self.deadline) as scope:
                self._scope = scope
                result = await self._loop()
            if scope.cancelled_caught and self._stopped:
                raise self._failed(
                    Failure(
                        category=Category.LOCAL_CAPACITY,
                        code="supervisor_closed",
                        message="the supervisor shut down",
                    )
                )
            if scope.cancelled_caught:
                failure = Failure(
                    category=Category.TIMEOUT,
                    code="request_budget",
                    message=f"the request's budget of {budget:g}s ran out",
                )
                self.decisions.append(
                    Decision(
                        scope=Scope.REQUEST,
                        action=Action.STOP,
                        reason="the request's time budget is spent",
                        rule=Rule(
                            "default" if budget == 600.0 else "config",
                            "failover",
                            "total_budget",
                            f"{budget:g}",
                        ),
                        category=Category.TIMEOUT.value,
                    )
                )
                raise self._failed(failure)
            if isinstance(result, Failure):
                raise self._failed(result)
            sup._counts["completed"] += 1
            if sup._subscribers:
                sup._publish(
                    Event(
                        kind=EventKind.COMPLETED,
                        time=trio.current_time(),
                        request_id=self.request_id,
                        actor=result.provider,
                    )
                )
            return result
        except RequestFailed as exc:
            sup._counts["failed"] += 1
            if sup._subscribers:
                sup._publish(
                    Event(
                        kind=EventKind.FAILED,
                        time=trio.current_time(),
                        request_id=self.request_id,
                        failure=exc.failure,
                    )
                )
            raise
        finally:
            sup._in_flight -= 1
            sup._runs.discard(self)
            if sup._in_flight == 0 and sup._idle is not None:
                sup._idle.set()

    def shut_down(self) -> None:
        """End the request at once: the supervisor is shutting down."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    def _failed(self, failure: Failure) -> RequestFailed:
        released = sum(map(len, self.parts)) if self.streaming else 0
        if released and failure.category is not Category.STREAM_ERROR:
            failure = Failure(
                category=Category.STREAM_ERROR,
                code="interrupted",
                message=f"the stream broke after {self.seq} deltas: {failure.category.value}: {failure.message}",
                provider=failure.provider,
                status=failure.status,
            )
        return RequestFailed(failure, self.attempts, self.decisions, request_id=self.request_id)

    async def _loop(self) -> Reply | Failure:
        sup = self.sup
        policies = sup._policies
        now = trio.current_time()
        sup._turns[self.route.model] += 1
        plan = plan_route(
            self.route,
            self.chain,
            now=now,
            turn=sup._turns[self.route.model],
            rng=sup._rng,
            policy=policies.health,
        )
        self.decisions.extend(plan.decisions)
        # Actors planned whatever their health (the terminus; every actor benched): their jobs
        # run even if the actor is benched when they start, and so do retries, which the policy
        # chose for this actor knowing its failure. A first attempt on an actor that was planned
        # as healthy and has been benched since is refused by the actor (code ``benched``).
        forced = {a for a in plan.actors if a.terminus or not a.available(now)}
        last_failure: Failure | None = plan.failure
        midstream_failure: Failure | None = None
        tried = 0
        mode = policies.stream.mid_stream.value
        for actor in plan.actors:
            released = sum(map(len, self.parts)) if self.streaming else 0
            continuation = bool(released) and mode == "continue"
            if continuation and not actor.continues:
                self.decisions.append(
                    Decision(
                        scope=Scope.NEXT_ACTOR,
                        action=Action.SKIP,
                        reason="cannot continue a partial answer",
                        rule=Rule("config", "stream", "accepts_continuation", "false"),
                        actor=actor.name,
                    )
                )
                continue
            max_providers = policies.failover.max_providers
            if max_providers and tried >= max_providers:
                break
            tried += 1
            tries = 0
            while True:
                tries += 1
                outcome = await self._attempt(
                    actor, tries, released, continuation, forced=actor in forced or tries > 1
                )
                if isinstance(outcome, Reply):
                    return outcome
                if sup._shut_down:
                    # The attempt was ended by the shutdown (``actor_stopped``, or refused by an
                    # actor that is gone): not the provider's failure, and nothing to fail over
                    # to. Say so, as a stream does, instead of retrying or failing over.
                    return Failure(
                        category=Category.LOCAL_CAPACITY,
                        code="supervisor_closed",
                        message="the supervisor shut down",
                    )
                failure = outcome
                last_failure = failure
                if self.streaming and self.parts and midstream_failure is None:
                    # The first failure after the caller got part of the answer is the one that
                    # broke its stream; later ones (a refused continuation...) must not hide it.
                    midstream_failure = failure
                now = trio.current_time()
                situation = Situation(
                    actor=actor.name,
                    tries_on_actor=tries,
                    actors_tried=tried,
                    remaining=self.deadline - now,
                    released=bool(sum(map(len, self.parts))) if self.streaming else False,
                    continuation=continuation,
                    retry_allowed=True,
                )
                decision = decide(failure, situation, policies, sup._rng)
                if decision.action is Action.RETRY and not sup._budget.try_spend(now):
                    decision = decide(
                        failure, attrs.evolve(situation, retry_allowed=False), policies, sup._rng
                    )
                self.decisions.append(decision)
                if sup._subscribers:
                    kind = {
                        Action.RETRY: EventKind.RETRYING,
                        Action.FAILOVER: EventKind.FAILOVER,
                    }.get(decision.action, EventKind.STOPPED)
                    sup._publish(
                        Event(
                            kind=kind,
                            time=now,
                            request_id=self.request_id,
                            actor=actor.name,
                            failure=failure,
                            decision=decision,
                        )
                    )
                if decision.action is Action.RETRY:
                    sup._counts["retries"] += 1
                    await trio.sleep(decision.wait)
                    continue
                if decision.action is Action.STOP:
                    return midstream_failure or failure
                sup._counts["failovers"] += 1
                break
        if last_failure is None:
            last_failure = Failure(
                category=Category.UNKNOWN, code="no_provider", message="no provider to try"
            )
        last_failure = midstream_failure or last_failure
        self.decisions.append(
            Decision(
                scope=Scope.REQUEST,
                action=Action.STOP,
                reason="no provider left to try",
                rule=Rule("config", "route", "chain", self.route.model),
                category=last_failure.category.value,
            )
        )
        return last_failure

    async def _attempt(
        self,
        actor: ProviderActor,
        number: int,
        released: int,
        continuation: bool,
        *,
        forced: bool = False,
    ) -> Reply | Failure:
        """Run one attempt on ``actor`` and record it."""
        sup = self.sup
        request = self.request
        parts_before = len(self.parts)
        prefill = "".join(self.parts) if continuation else None
        emit, emit_nowait = self._emitter(actor.name, skip=0 if continuation else released)
        call = ClientCall(
            request=request,
            model=actor.model,
            stream=self.streaming,
            prefill=prefill,
            actor=actor.name,
        )
        job = Job(
            call=call,
            emit=emit,
            emit_nowait=emit_nowait,
            request_id=self.request_id,
            forced=forced,
        )
        started = trio.current_time()
        if sup._subscribers:
            sup._publish(
                Event(
                    kind=EventKind.ATTEMPT_STARTED,
                    time=started,
                    request_id=self.request_id,
                    actor=actor.name,
                )
            )
        try:
            await actor.run_job(job)
        except BaseException:
            # The caller went away, the request's budget ran out or the supervisor shuts down:
            # the attempt was stopped where it stood.
            self.attempts.append(
                self._record(actor, number, job, started, Outcome.CANCELLED, continuation)
            )
            raise
        outcome = job.outcome
        assert outcome is not None
        self.attempts.append(self._record(actor, number, job, started, outcome, continuation))
        if outcome is Outcome.OK:
            completion = job.completion
            assert completion is not None
            return Reply(
                text="".join(self.parts),
                provider=actor.name,
                model=completion.model,
                usage=completion.usage,
                attempts=tuple(self.attempts),
                decisions=tuple(self.decisions),
                was_terminus=actor.terminus,
                finish_reason=completion.finish_reason,
                request_id=self.request_id,
            )
        if not self.streaming:
            del self.parts[parts_before:]  # nothing reached the caller: forget the partial answer
        # No failure: the attempt was cancelled by the actor's own shutdown.
        failure = job.failure or Failure(
            category=Category.CANCELLED,
            code="cancelled",
            message="the attempt was cancelled",
            provider=actor.name,
        )
        if sup._subscribers:
            sup._publish(
                Event(
                    kind=EventKind.ATTEMPT_FAILED,
                    time=trio.current_time(),
                    request_id=self.request_id,
                    actor=actor.name,
                    failure=failure,
                )
            )
        return failure

    def _emitter(self, actor: str, *, skip: int) -> tuple[Emit, EmitNowait]:
        """What the actor's sink calls with each piece of the answer: an async send and a
        non-waiting one that does nothing (returns False) when the caller is not ready."""
        parts = self.parts
        if not self.streaming:

            def collect_nowait(text: str) -> bool:
                parts.append(text)
                return True

            async def collect(text: str) -> None:
                parts.append(text)

            return collect, collect_nowait
        send, send_nowait = self.emit, self.emit_nowait
        assert send is not None and send_nowait is not None
        if not skip:

            def forward_all_nowait(text: str) -> bool:
                if not send_nowait(Delta(self.seq, text, actor)):
                    return False
                self.seq += 1
                parts.append(text)
                return True

            async def forward_all(text: str) -> None:
                await send(Delta(self.seq, text, actor))
                self.seq += 1
                parts.append(text)

            return forward_all, forward_all_nowait
        to_skip = [skip]

        def trim(text: str) -> tuple[str, int]:
            # Restarting after a broken stream: release output only past what the caller has.
            left = to_skip[0]
            if not left:
                return text, 0
            if len(text) <= left:
                return "", left - len(text)
            return text[left:], 0

        def forward_nowait(text: str) -> bool:
            out, left = trim(text)
            if out:
                if not send_nowait(Delta(self.seq, out, actor)):
                    return False
                self.seq += 1
                parts.append(out)
            to_skip[0] = left
            return True

        async def forward(text: str) -> None:
            out, to_skip[0] = trim(text)
            if out:
                await send(Delta(self.seq, out, actor))
                self.seq += 1
                parts.append(out)

        return forward, forward_nowait

    def _record(
        self,
        actor: ProviderActor,
        number: int,
        job: Job,
        started: float,
        outcome: Outcome,
        continuation: bool,
    ) -> Attempt:
        return Attempt(
            actor=actor.name,
            number=number,
            outcome=outcome,
            failure=job.failure,
            started_at=job.started_at if job.started_at is not None else started,
            ended_at=job.ended_at if job.ended_at is not None else trio.current_time(),
            first_delta_at=job.first_delta_at,
            deltas=job.deltas,
            probe=job.probe,
            continuation=continuation,
        )
