"""One request's failover loop (``Run``).

A run asks the routing for an order, makes attempts on the actors in that order (in the
requesting task: ``complete``'s caller, or a stream's task) and carries out what ``_decide.py``
decides after each failure. It records its own attempts and decisions, and writes the
supervisor-wide counters, the requests in flight and the retry budget in the supervisor's
``Ledger``, never the supervisor itself.

Memory: a non-streamed request collects its answer (``parts``) for the reply. A stream counts
the characters it passed on (``released``: what a ``restart`` skips) and keeps their text
(``parts``) only up to ``StreamPolicy.keep_text``, for the reply and a ``continue``'s prefill;
past it the text is dropped (``parts`` is ``None``), the reply says so (``text_kept``) and a
broken stream is not continued.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

from .._config import Route
from .._decide import (
    Situation,
    budget_spent,
    continues_partial,
    decide,
    no_provider_left,
    skip_for_continuation,
)
from .._embedding import EmbedRequest, no_vectors
from .._errors import RequestFailed
from .._events import EventKind, Subscribers
from .._failure import Category, Failure
from .._values import (
    Action,
    Attempt,
    Decision,
    Delta,
    Outcome,
    Reply,
    Request,
    ToolCall,
    ToolCallDelta,
    tool_calls_of,
)
from ..actors import ClientCall, Emit, EmitNowait, Job, ProviderActor
from ._answer import caught_up, choices_of
from ._hedge import EmitTools, Leg, hedge_first
from ._latency import ordering
from ._ledger import CallerLeft, Ledger, supervisor_closed
from ._observer import RequestInfo
from ._routing import capability_skips, plan_route


class Run:
    """One request's failover loop."""

    # (several to a line: one per line would push the module past 600 lines)
    __slots__ = (
        "ledger", "events", "request", "route", "chain", "streaming", "emit",
        "emit_nowait", "_scope", "_stopped", "_left", "request_id", "attempts",
        "decisions", "parts", "released", "keep", "seq", "deadline", "surface",
        "observed", "tools", "_job", "_diverged", "_again", "_lacking", "_held",
        "tools_actor", "embed", "embeddings", "steer",
    )

    def __init__(
        self,
        ledger: Ledger,
        events: Subscribers,
        request: Request,
        route: tuple[Route, list[ProviderActor]],
        *,
        streaming: bool,
        surface: str = "python",
        embed: EmbedRequest | None = None,
    ):
        self.ledger = ledger
        self.events = events
        self.request = request
        self.route, self.chain = route
        self.streaming = streaming
        self.embed = embed  # the kind of call: embeddings (``request``: a stand-in), or chat
        self.embeddings: tuple[tuple[float, ...], ...] = ()  # the vectors of its answer
        #: the actors that lack a capability the request needs, and which (skipped)
        self._lacking = capability_skips(request, self.route.model, self.chain, embed=bool(embed))
        # Set by RequestStream for streams.
        self.emit: Callable[[Delta], Awaitable[None]] | None = None
        self.emit_nowait: Callable[[Delta], bool] | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        self._left = False  # a stream's caller left its block (``leave``)
        self.request_id = ledger.next_id()
        self.attempts: list[Attempt] = []
        self.decisions: list[Decision] = []
        #: the text the caller will get (complete) or holds (streams, up to ``keep``); ``None``:
        #: a stream's text grew past ``keep`` and was dropped.
        self.parts: list[str] | None = []
        self.released = 0  # characters a stream passed on
        self.keep = ledger.policies.stream.keep_text
        self.seq = 0
        self.surface = surface  # where the request came from, for the observers
        self.observed: RequestInfo | None = None  # set while observers watch the request
        #: the tool-call fragments the caller will get (complete) or holds (streams).
        self.tools: list[ToolCallDelta] = []
        self._job: Job | None = None
        #: a restarted attempt's own answer for each held tool call: [name, arguments]
        self._again: dict[int, list[str]] = {}
        #: the tool calls the caller held when this attempt (a restart) started
        self._held: tuple[ToolCall, ...] = ()
        self.tools_actor = ""  # the actor whose tool calls a stream passes on
        #: a restarted attempt's answer differed from what the caller holds.
        self._diverged = False
        self.steer = ledger.steering(self.route, request)  # affinity pin, rate-limit admission

    async def execute(self) -> Reply:
        ledger = self.ledger
        now = trio.current_time()
        if ledger.closed:
            raise self._failed(supervisor_closed(refused=True))
        ledger.admit(self, now)
        self.observed = ledger.request_started(self, now)
        policy = ledger.policies.failover
        self.deadline = now + policy.total_budget
        try:
            with trio.CancelScope(deadline=self.deadline) as scope:
                self._scope = scope
                if self._left:
                    scope.cancel()
                result = await self._loop()
            if scope.cancelled_caught and self._stopped:
                raise self._failed(supervisor_closed())
            if scope.cancelled_caught and self._left:
                raise CallerLeft
            if scope.cancelled_caught:
                failure = Failure(
                    category=Category.TIMEOUT,
                    code="request_budget",
                    message=f"the request's budget of {policy.total_budget:g}s ran out",
                )
                self.decisions.append(budget_spent(policy, Category.TIMEOUT.value))
                ledger.decided(self, self.decisions[-1])
                raise self._failed(failure)
            if isinstance(result, Failure):
                raise self._failed(result)
            ledger.completed += 1
            ledger.request_ended(self, result)
            self.events.publish(
                EventKind.COMPLETED, request_id=self.request_id, actor=result.provider
            )
            return result
        except RequestFailed as exc:
            ledger.failed += 1
            ledger.request_ended(self, exc)
            self.events.publish(EventKind.FAILED, request_id=self.request_id, failure=exc.failure)
            raise
        finally:
            ledger.release(self)

    def shut_down(self) -> None:
        """End the request at once: the supervisor is shutting down."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    def leave(self) -> None:
        """End the request at once: a stream's caller went away (``execute`` raises
        ``CallerLeft``). The request's own scope does it: a stream needs no second one."""
        self._left = True
        if self._scope is not None:
            self._scope.cancel()

    def failed_by_shutdown(self) -> RequestFailed:
        """The error of a request whose task the supervisor's shutdown cancelled."""
        return RequestFailed(
            supervisor_closed(), self.attempts, self.decisions, request_id=self.request_id
        )

    @property
    def holds_output(self) -> bool:
        """The caller holds part of the answer (a stream past its first delta)."""
        return bool(self.released) or (self.streaming and bool(self.tools))

    def _failed(self, failure: Failure) -> RequestFailed:
        if self.holds_output and failure.category is not Category.STREAM_ERROR:
            failure = Failure(
                category=Category.STREAM_ERROR,
                code="interrupted",
                message=f"the stream broke after {self.seq} deltas: {failure.category.value}: {failure.message}",
                provider=failure.provider,
                status=failure.status,
            )
        return RequestFailed(failure, self.attempts, self.decisions, request_id=self.request_id)

    async def _loop(self) -> Reply | Failure:
        ledger = self.ledger
        policies = ledger.policies
        now = trio.current_time()
        model = self.route.model
        ledger.turns[model] += 1
        plan = plan_route(
            self.route,
            self.chain,
            now=now,
            turn=ledger.turns[model],
            rng=ledger.rng,
            policy=policies.health,
            model=self.request.model,
            latency=ordering(ledger.latency, self.request, self.route, ledger.rng),
        )
        order, lacking = self.steer.order(plan, self.chain, self._lacking, now)
        self.decisions.extend(plan.decisions)
        ledger.decided(self, *plan.decisions)
        # Actors planned whatever their health (the terminus; every actor benched): their jobs
        # run even if the actor is benched when they start, and so do retries, which the policy
        # chose for this actor knowing its failure. A first attempt on an actor that was planned
        # as healthy and has been benched since is refused by the actor (code ``benched``).
        forced = {
            a for a in plan.actors if a.terminus or not a.available(now, self.request.model)
        }
        last_failure: Failure | None = plan.failure
        midstream_failure: Failure | None = None
        tried = 0
        max_providers = policies.failover.max_providers
        hedged: ProviderActor | bool = False  # the actor a hedge tried beside the first
        for actor in order:
            if actor is hedged:
                continue
            if lacking and actor.name in lacking:
                self.decisions.append(lacking[actor.name])
                continue
            released = self.released
            # (Guarded: a call less per actor on the hot path, where nothing was released.)
            continuation = bool(released) and continues_partial(released, policies.stream)
            if continuation:
                skip = skip_for_continuation(
                    actor.name, continues=actor.continues, continuation=continuation
                )
                if skip is not None:
                    self.decisions.append(skip)
                    ledger.decided(self, skip)
                    continue
            if max_providers and tried >= max_providers:
                break
            tried += 1
            tries = 0
            while True:
                tries += 1
                if tried == tries == 1 and self.route.hedge and not released and not self.embed:
                    actor, outcome, spent = await self._hedged(actor, order, forced)
                    hedged = spent and actor
                else:
                    outcome = await self._attempt(
                        actor, tries, released, continuation, forced=actor in forced or tries > 1
                    )
                if isinstance(outcome, Reply):
                    return outcome
                if ledger.shut_down:
                    # The attempt was ended by the shutdown (``actor_stopped``, or refused by an
                    # actor that is gone): not the provider's failure, and nothing to fail over
                    # to. Say so, as a stream does, instead of retrying or failing over.
                    return supervisor_closed()
                failure = outcome
                last_failure = failure
                if self.holds_output and midstream_failure is None:
                    # The first failure after the caller got part of the answer is the one that
                    # broke its stream; later ones (a refused continuation...) must not hide it.
                    midstream_failure = failure
                now = trio.current_time()
                situation = Situation(
                    actor=actor.name,
                    tries_on_actor=tries,
                    actors_tried=tried,
                    remaining=self.deadline - now,
                    released=self.holds_output,
                    text_kept=self.parts is not None,
                    continuation=continuation,
                    tool_calls=self.streaming and bool(self.tools),
                    retry_allowed=True,
                )
                decision = decide(failure, situation, policies, ledger.rng)
                if decision.action is Action.RETRY and not ledger.budget.try_spend(now):
                    decision = decide(
                        failure, attrs.evolve(situation, retry_allowed=False), policies, ledger.rng
                    )
                self.decisions.append(decision)
                ledger.decided(self, decision)
                self.events.publish(
                    _EVENT_OF_ACTION.get(decision.action, EventKind.STOPPED),
                    request_id=self.request_id,
                    actor=actor.name,
                    failure=failure,
                    decision=decision,
                )
                if decision.action is Action.RETRY:
                    ledger.retries += 1
                    await trio.sleep(decision.wait)
                    continue
                if decision.action is Action.STOP:
                    if failure.code == "restart_diverged":
                        return failure  # the restart's own error, not the break before it
                    return midstream_failure or failure
                ledger.failovers += 1
                break
        if last_failure is None:
            last_failure = self.steer.failure() or Failure(
                category=Category.UNKNOWN, code="no_provider", message="no provider to try"
            )
        last_failure = midstream_failure or last_failure
        self.decisions.append(no_provider_left(model, last_failure))
        ledger.decided(self, self.decisions[-1])
        return last_failure

    async def _attempt(
        self,
        actor: ProviderActor,
        number: int,
        released: int,
        continuation: bool,
        *,
        forced: bool = False,
        leg: Leg | None = None,
    ) -> Reply | Failure:
        """Run one attempt on ``actor`` and record it (``leg``: one of two hedged attempts)."""
        parts = self.parts
        parts_before = 0 if parts is None else len(parts)
        tools_before = len(self.tools)
        prefill = "".join(parts) if continuation and parts is not None else None
        skip = 0 if continuation else released
        emit, emit_nowait = self._emitter(actor.name, skip=skip)
        take_tools: EmitTools = self._take_tools
        if leg is not None:
            emit, emit_nowait, take_tools = leg.gate(emit, emit_nowait, take_tools)
        # A restart (the caller holds output, no continuation) must give back what it holds.
        held = (
            tool_calls_of(self.tools) if self.tools and self.streaming and not continuation else ()
        )
        self._held = held
        self.tools_actor = actor.name
        if held:
            self._again = {}
        call = ClientCall(
            request=self.request,
            model=actor.model,
            stream=self.streaming,
            prefill=prefill,
            actor=actor.name,
            embed=self.embed,
        )
        job = Job(
            call=call,
            emit=emit,
            emit_nowait=emit_nowait,
            request_id=self.request_id,
            forced=forced,
            emit_tools=take_tools,
        )
        self._job = job
        self._diverged = False
        started = trio.current_time()
        ticket = self.steer.admit(actor, started)
        self.events.publish(EventKind.ATTEMPT_STARTED, request_id=self.request_id, actor=actor.name)
        try:
            await actor.run_job(job)
        except BaseException:
            # The caller went away, the request's budget ran out or the supervisor shuts down:
            # the attempt was stopped where it stood.
            self.attempts.append(
                job.record(actor.name, number, started, Outcome.CANCELLED, continuation=continuation)
            )
            self.ledger.attempt_ended(self, self.attempts[-1])
            raise
        finally:
            # The run and its job refer to each other only while the job runs: a cycle left
            # behind would be freed by the cyclic collector, not at once (~4 µs a request).
            self._job = None
        outcome = job.outcome
        assert outcome is not None
        self.attempts.append(job.record(actor.name, number, started, outcome, continuation=continuation))
        self.ledger.attempt_ended(self, self.attempts[-1])
        if job.first_delta_at is not None and self.embed is None:
            self.ledger.latency.learn(actor, self.request, self.attempts[-1])
        if outcome is Outcome.OK and held and not caught_up(self._again, held):
            # The restarted answer ended without a tool call the caller already holds.
            self._diverged = True
            outcome = Outcome.FAILED
        vectorless: Failure | None = None
        if outcome is Outcome.OK and self.embed is not None:
            assert job.completion is not None
            self.embeddings = job.completion.embeddings or ()
            if job.completion.embeddings is None:  # a client that answered it like a chat call
                outcome, vectorless = Outcome.FAILED, no_vectors(actor.name)
        self.steer.ended(actor, ticket, job, served=outcome is Outcome.OK)
        if outcome is Outcome.OK:
            completion = job.completion
            assert completion is not None
            parts = self.parts
            return Reply(
                text="" if parts is None else "".join(parts),
                provider=actor.name,
                model=completion.model,
                usage=completion.usage,
                attempts=tuple(self.attempts),
                decisions=tuple(self.decisions),
                was_terminus=actor.terminus,
                finish_reason=completion.finish_reason,
                request_id=self.request_id,
                text_kept=parts is not None,
                tool_calls=tool_calls_of(self.tools) if self.tools else (),
                refusal=completion.refusal,
                logprobs=completion.logprobs,
                choices=choices_of(completion, self.parts, self.tools),
            )
        if not self.streaming and (leg is None or leg.won):
            # Nothing reached the caller: forget the partial answer.
            if parts is not None:
                del parts[parts_before:]
            del self.tools[tools_before:]
        if self._diverged:
            failure: Failure | None = Failure(
                category=Category.STREAM_ERROR,
                code="restart_diverged",
                message="the restarted answer differs from what the caller holds",
                provider=actor.name,
            )
        else:
            failure = job.failure or vectorless
        # No failure: the attempt was cancelled by the actor's own shutdown.
        failure = failure or Failure(
            category=Category.CANCELLED,
            code="cancelled",
            message="the attempt was cancelled",
            provider=actor.name,
        )
        self.events.publish(
            EventKind.ATTEMPT_FAILED, request_id=self.request_id, actor=actor.name, failure=failure
        )
        return failure

    async def _hedged(
        self, first: ProviderActor, plan: list[ProviderActor], forced: set[ProviderActor]
    ) -> tuple[ProviderActor, Reply | Failure, bool]:
        """The first attempt, hedged (``Route.hedge``) on the next actor that may serve."""
        rest = (a for a in plan[plan.index(first) + 1 :] if a.name not in self._lacking)
        return await hedge_first(
            self,
            first,
            None if self.ledger.policies.failover.max_providers == 1 else next(rest, None),
            lambda actor, leg: self._attempt(actor, 1, 0, False, forced=actor in forced, leg=leg),
        )

    def _emitter(self, actor: str, *, skip: int) -> tuple[Emit, EmitNowait]:
        """What the actor's sink calls with each piece of the answer: an async send and a
        non-waiting one that does nothing (returns False) when the caller is not ready."""
        parts = self.parts
        if not self.streaming:
            assert parts is not None

            def collect_nowait(text: str) -> bool:
                parts.append(text)
                return True

            async def collect(text: str) -> None:
                parts.append(text)

            return collect, collect_nowait
        send, send_nowait = self.emit, self.emit_nowait
        assert send is not None and send_nowait is not None
        keep = self.keep

        def passed_on(text: str) -> None:
            # Count what the caller now holds; keep its text only up to ``keep``.
            self.seq += 1
            self.released = released = self.released + len(text)
            kept = self.parts
            if kept is not None:
                if released <= keep:
                    kept.append(text)
                else:
                    self.parts = None

        if not skip:

            def forward_all_nowait(text: str) -> bool:
                if not send_nowait(Delta(self.seq, text, actor)):
                    return False
                # ``passed_on``, inlined: this is the streaming hot path.
                self.seq += 1
                self.released = released = self.released + len(text)
                kept = self.parts
                if kept is not None:
                    if released <= keep:
                        kept.append(text)
                    else:
                        self.parts = None
                return True

            async def forward_all(text: str) -> None:
                await send(Delta(self.seq, text, actor))
                passed_on(text)

            return forward_all, forward_all_nowait
        to_skip = [skip]
        # What the caller holds, to check the restarted answer against (when it was kept).
        holds = "".join(self.parts) if self.parts is not None else None

        def trim(text: str) -> tuple[str, int]:
            # Restarting after a broken stream: release output only past what the caller has.
            left = to_skip[0]
            if not left:
                return text, 0
            if holds is not None:
                at = skip - left
                overlap = min(len(text), left)
                if text[:overlap] != holds[at : at + overlap]:
                    self._diverge()
                    return "", left
            if len(text) <= left:
                return "", left - len(text)
            return text[left:], 0

        def forward_nowait(text: str) -> bool:
            out, left = trim(text)
            if out:
                if not send_nowait(Delta(self.seq, out, actor)):
                    return False
                passed_on(out)
            to_skip[0] = left
            return True

        async def forward(text: str) -> None:
            out, to_skip[0] = trim(text)
            if out:
                await send(Delta(self.seq, out, actor))
                passed_on(out)

        return forward, forward_nowait

    async def _take_tools(self, fragments: tuple[ToolCallDelta, ...]) -> None:
        """What the actor's sink calls with tool-call fragments: collected for ``complete``;
        sent as deltas for a stream, past what the caller holds (``_held``) after a restart,
        which must give those calls back unchanged (else it diverged, and the attempt ends)."""
        if not self.streaming:
            self.tools.extend(fragments)
            return
        held = self._held
        out: list[ToolCallDelta] = []
        for fragment in fragments:
            index = fragment.index
            if index >= len(held):
                out.append(fragment)
                continue
            have = held[index]
            mine = self._again.setdefault(index, ["", ""])
            if fragment.name is not None:
                mine[0] = fragment.name
            before = len(mine[1])
            mine[1] += fragment.arguments
            args = mine[1]
            if (mine[0] and mine[0] != have.name) or not (
                have.arguments.startswith(args) or args.startswith(have.arguments)
            ):
                self._diverge()
                await trio.lowlevel.checkpoint()
                return
            if len(args) > len(have.arguments):
                start = max(before, len(have.arguments))
                out.append(ToolCallDelta(index, arguments=args[start:]))
        if out:
            send = self.emit
            assert send is not None
            await send(Delta(self.seq, "", self.tools_actor, tuple(out)))
            self.seq += 1
            self.tools.extend(out)

    def _diverge(self) -> None:
        self._diverged = True
        if self._job is not None:
            self._job.interrupt("restart_diverged")


_EVENT_OF_ACTION = {Action.RETRY: EventKind.RETRYING, Action.FAILOVER: EventKind.FAILOVER}
