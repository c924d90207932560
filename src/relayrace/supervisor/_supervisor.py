"""The supervisor's handle, ``open_supervisor``, and restart supervision: one actor per
provider runs in the supervisor's nursery and is restarted when it crashes.

``complete`` runs the request's failover loop (``_run.Run``), and each attempt, in the caller's
own task; ``stream`` runs it in a task of the supervisor's nursery tied to the caller's
``async with`` block (``_stream.RequestStream``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager

import attrs
import trio

from .._config import Config, ProviderConfig, Route
from .._decide import may_bench
from .._embedding import Embedding, EmbeddingsReply, EmbedRequest
from .._errors import BadRequest
from .._events import Event, EventKind, Subscribers
from .._values import Reply, Request
from ..actors import UNSHARED, HealthSnapshot, ProviderActor, SharedHealth
from ..state import BenchRecord, StateBackend, StateEvent
from ._budget import RetryBudget
from ._ledger import Ledger, SupervisorStatistics
from ._observer import SURFACES, Hooks
from ._reload import Reloaded, same_provider
from ._run import Run
from ._shared import fleet_benches, fleet_health, shared_state, state_event
from ._stream import RequestStream

log = logging.getLogger("relayrace")

#: Restart intensity: at most this many restarts of one actor within ``RESTART_WINDOW`` seconds,
#: after which the actor gives up and its provider is routed around until the health policy's
#: ``restart_cool_off`` has passed; it is then restarted afresh (its restart count reset).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF_BASE = 0.1
RESTART_BACKOFF_CAP = 5.0
_EVENT_BUFFER = 1024
#: How often an actor removed by a reload is looked at until its last attempt has ended.
_DRAIN_POLL = 0.1


class Supervisor:
    """The handle on a running supervisor; get one from ``open_supervisor``."""

    def __init__(
        self,
        config: Config,
        nursery: trio.Nursery,
        observers: Iterable[object] = (),
        state: StateBackend | None = None,
    ):
        self.config = config
        self.shared_state = state  #: the state shared between processes (``None``: local)
        self._nursery = nursery
        self._policies = config.policies
        self._events = Subscribers()
        self._hooks = Hooks(observers)
        self._actors = {p.name: self._make_actor(p, config) for p in config.providers}
        self._routes = _routes(config, self._actors)
        #: the cancel scope of each actor's task (a reload stops removed actors by it).
        self._scopes: dict[ProviderActor, trio.CancelScope] = {}
        #: actors a reload removed that are still finishing their attempts.
        self._retiring: set[ProviderActor] = set()
        self._reload_lock = trio.Lock()
        #: providers drained on this process alone (``drain_provider(fleet=False)``)
        self._drained: set[str] = set()
        self._ledger = Ledger(
            config.policies, random.Random(config.seed), list(self._routes), self._hooks
        )
        self._ledger.admission.configure(config.providers)
        self._ledger.admission.share(state)
        self._ledger.affinity.share(state)
        if state is not None:
            self._ledger.budget = RetryBudget(config.policies.retry_budget, shared=state)

    # --- public API ---------------------------------------------------------------------------

    async def complete(self, request: Request, *, surface: str = "python") -> Reply:
        """Serve a request and return the whole answer.

        ``surface`` (``python``, ``http``, ``websocket``) tells the observers where the request
        came from.

        Raises:
            BadRequest: the request names no route (raised before any provider is called).
            RequestFailed: no provider could answer; carries the deciding failure, the attempts
                and the decisions.
        """
        run = Run(
            self._ledger,
            self._events,
            request,
            self._route_for(request),
            streaming=False,
            surface=_surface(surface),
        )
        return await run.execute()

    async def embed(self, request: EmbedRequest, *, surface: str = "python") -> EmbeddingsReply:
        """Serve an embeddings request: the route's providers that declare ``embeddings`` are
        asked in turn, with the decisions, retries, health and budgets of a ``complete``
        (the others get a ``skip`` decision naming the capability).

        Raises:
            BadRequest: the request names no route, or no provider of its route declares
                ``embeddings`` (field ``model``), before any provider is called.
            RequestFailed: no provider could answer; carries the deciding failure, the attempts
                and the decisions.
        """
        if not isinstance(request, EmbedRequest):
            raise BadRequest(
                "request", f"expected a relayrace.EmbedRequest, got {type(request).__name__}"
            )
        # The observers and the routing see a chat request of the same route (no text: the
        # inputs are the embed request's own).
        stand_in = Request(
            request.model, [{"role": "user", "content": ""}], metadata=request.metadata
        )
        run = Run(
            self._ledger,
            self._events,
            stand_in,
            self._route_for(stand_in),
            streaming=False,
            surface=_surface(surface),
            embed=request,
        )
        reply = await run.execute()
        return EmbeddingsReply(
            embeddings=tuple(Embedding(i, v) for i, v in enumerate(run.embeddings)),
            provider=reply.provider,
            model=reply.model,
            usage=reply.usage,
            attempts=reply.attempts,
            decisions=reply.decisions,
            request_id=reply.request_id,
        )

    def stream(self, request: Request, *, surface: str = "python") -> RequestStream:
        """Serve a request as a stream of deltas::

            async with sup.stream(request) as s:
                async for delta in s:
                    ...
            reply = s.reply

        Iterating raises ``RequestFailed`` if the request fails. Leaving the block early cancels
        the request and its upstream call. ``surface``: as for ``complete``.

        Raises:
            BadRequest: the request names no route (raised before any provider is called).
        """
        run = Run(
            self._ledger,
            self._events,
            request,
            self._route_for(request),
            streaming=True,
            surface=_surface(surface),
        )
        return RequestStream(run, self._nursery)

    def health(self) -> dict[str, HealthSnapshot]:
        """A snapshot of every actor's health, by name: the worst of its provider-wide and
        deployment records, each deployment's own in ``deployments`` (by upstream model). With a
        shared state backend a bench another instance made shows too (``benched_by="fleet"``,
        its ``bench_reason``)."""
        now, state, drained = trio.current_time(), self.shared_state, self._drained
        return {
            name: fleet_health(state, actor.snapshot(now), now, name in drained)
            for name, actor in self._actors.items()
        }

    def bench(
        self, name: str, seconds: float | None = None, *, model: str | None = None, fleet: bool = True
    ) -> None:
        """Bench an actor by hand for ``seconds`` (``None``: until ``unbench``): every
        deployment of it, or only ``model``'s (an upstream model). Automatic logic never
        shortens a manual bench. With a shared state backend the bench is the fleet's (every
        process sharing the state honours it) unless ``fleet=False`` (this process only).

        Raises:
            KeyError: no actor has that name.
            ValueError: ``seconds`` is not positive, or the actor is configured with another
                model than ``model``.
        """
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError("seconds must be a positive number or None")
        self._actors[name].bench(seconds, model, share=fleet)

    def unbench(self, name: str, *, model: str | None = None, fleet: bool = True) -> None:
        """Lift every bench of an actor and its deployments and reset their counters, or
        (``model``) those of one deployment; with a shared state backend, fleet-wide unless
        ``fleet=False`` (a bench the fleet shares then still holds here).

        Raises:
            KeyError: no actor has that name.
            ValueError: the actor is configured with another model than ``model``.
        """
        self._actors[name].unbench(model, share=fleet)
        if model is None:
            self._drained.discard(name)

    def drain_provider(self, name: str, *, model: str | None = None, fleet: bool = True) -> None:
        """Drain a provider (or ``model``'s deployment of it): new requests avoid it, requests
        in flight on it finish; a manual bench with the reason ``drained`` (in events, health
        and metrics) until ``unbench``. Fleet-wide with a shared state backend unless
        ``fleet=False``.

        Raises:
            KeyError: no actor has that name.
            ValueError: the actor is configured with another model than ``model``.
        """
        self._actors[name].bench(None, model, share=fleet, reason="drained")
        if not fleet or self.shared_state is None:
            self._drained.add(name)

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
        async with self._events.subscribe(buffer) as events:
            yield events

    def statistics(self) -> SupervisorStatistics:
        return self._ledger.statistics(self._events.dropped)

    @property
    def routes(self) -> Mapping[str, Route]:
        return {name: route for name, (route, _) in self._routes.items()}

    async def drain(self) -> None:
        """Refuse new requests and wait until every request in flight has ended."""
        await self._ledger.drain()

    def inbox_depths(self) -> dict[str, int]:
        """Jobs waiting in each actor's inbox for a free slot, by name."""
        return {name: actor.queued for name, actor in self._actors.items()}

    def fleet_benches(self, name: str) -> dict[str, BenchRecord] | None:
        """Actor ``name``'s benches the fleet shares, by model (``""``: provider-wide)."""
        return fleet_benches(self.shared_state, name)

    def record_admin(self, action: str, *, actor: str | None = None) -> None:
        """Publish that an operator acted (``bench``, ``unbench``, ``drain``, ``drain_provider``,
        ``reload``, ``reload_refused``): an ``admin_action`` event with ``detail=action``, which
        the subscribers and the observers' ``health_changed`` receive."""
        self._announce(EventKind.ADMIN_ACTION, actor=actor, detail=action)

    async def reload(self, config: Config) -> Reloaded:
        """Swap in ``config``'s providers, routes and policies, atomically between requests.

        Requests in flight finish on the routes and policies they started with; the next
        request sees the new ones. A provider whose settings (and client's public settings,
        and the health and demotion policies) did not change keeps its actor: its health,
        counters and connections. New providers' actors start before the swap; removed ones
        (and replaced ones) drain — their attempts in flight finish — then stop, and their
        clients close. ``config`` is validated as any ``Config`` is when it was made.

        Raises:
            RuntimeError: the supervisor is closed or draining.
        """
        async with self._reload_lock:
            if self._ledger.closed:
                raise RuntimeError("the supervisor is closed or draining")
            old = self.config
            same_policies = (
                old.policies.health == config.policies.health
                and old.policies.demote == config.policies.demote
            )
            previous = {p.name: p for p in old.providers}
            providers: list[ProviderConfig] = []
            actors: dict[str, ProviderActor] = {}
            started: list[ProviderActor] = []
            unused = []
            for p in config.providers:
                before = previous.get(p.name)
                if before is not None and same_policies and same_provider(before, p):
                    providers.append(before)  # the running client, not the new unopened one
                    actors[p.name] = self._actors[p.name]
                    unused.append(p.client)
                    continue
                providers.append(p)
                actors[p.name] = self._make_actor(p, config)
                started.append(actors[p.name])
            for actor in started:
                open_client = getattr(actor.client, "open", None)
                if open_client is not None:
                    open_client()
                await self._nursery.start(self._run_actor, actor)
            # The swap: no checkpoint from here to the end of the block.
            gone = [a for name, a in self._actors.items() if actors.get(name) is not a]
            self.config = attrs.evolve(config, providers=providers)
            self._policies = config.policies
            self._actors = actors
            self._routes = _routes(config, actors)
            ledger = self._ledger
            ledger.policies = config.policies
            ledger.admission.configure(config.providers)
            if old.policies.retry_budget != config.policies.retry_budget:
                ledger.budget = RetryBudget(config.policies.retry_budget, self.shared_state)
            for model in self._routes:
                ledger.turns.setdefault(model, 0)
            for actor in gone:
                self._retiring.add(actor)
                self._nursery.start_soon(self._retire, actor)
            for hook in self._hooks.supervisor_started:
                hook(self)
        for client in unused:
            aclose = getattr(client, "aclose", None)
            if aclose is not None:
                await aclose()
        names = {a.name for a in started}
        return Reloaded(
            added=tuple(n for n in names if n not in previous),
            removed=tuple(n for n in previous if n not in actors),
            replaced=tuple(n for n in names if n in previous),
            kept=tuple(n for n in actors if n not in names),
        )

    # --- internals --------------------------------------------------------------------------

    def _make_actor(self, p: ProviderConfig, config: Config) -> ProviderActor:
        return ProviderActor(
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
            capabilities=p.effective_capabilities,
            priority=p.priority,
            weight=p.weight,
            publish=self._actor_event,
            may_bench=self._may_bench,
            shared=UNSHARED if self.shared_state is None else SharedHealth(self.shared_state, p.name),
        )

    async def _run_actor(
        self, actor: ProviderActor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            self._scopes[actor] = scope
            try:
                await self._supervise(actor, task_status=task_status)
            finally:
                del self._scopes[actor]

    async def _retire(self, actor: ProviderActor) -> None:
        """A reload removed ``actor``: let its attempts finish, then stop it and close its
        client."""
        # Polled: an idle event in the actor would cost its hot path a check per release.
        while actor.in_flight or actor.queued:  # noqa: ASYNC110
            await trio.sleep(_DRAIN_POLL)
        actor.close("actor_removed")
        scope = self._scopes.get(actor)
        if scope is not None:
            scope.cancel()
        aclose = getattr(actor.client, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            self._retiring.discard(actor)

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

    def _actor_event(self, event: Event) -> None:
        """An actor's health changed: tell the subscribers and the observers."""
        self._events.deliver(event)
        for hook in self._hooks.health_changed:
            hook(event)

    def _announce(
        self,
        kind: EventKind,
        *,
        actor: str | None,
        until: float | None = None,
        detail: str | None = None,
        model: str | None = None,
    ) -> None:
        """Publish an actor event of the supervisor's own (restarts, give-ups, fleet benches)."""
        if self._hooks.health_changed or self._events.listening:
            self._actor_event(
                Event(
                    kind=kind,
                    time=trio.current_time(),
                    actor=actor,
                    until=until,
                    detail=detail,
                    model=model,
                )
            )

    def _may_bench(self, name: str, model: str | None) -> bool:
        now = trio.current_time()
        benched = sum(
            1 for a in self._actors.values() if a.name != name and a.benched(now, model)
        )
        return may_bench(self._policies.health, benched_others=benched, actors=len(self._actors))

    async def _supervise(
        self, actor: ProviderActor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one actor; restart it with backoff when it crashes; past the intensity limit,
        give up for ``restart_cool_off`` seconds, then restart it afresh."""
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
                    cool_off = self._policies.health.restart_cool_off
                    actor.give_up(now + cool_off)
                    self._announce(
                        EventKind.ACTOR_GAVE_UP,
                        actor=actor.name,
                        until=now + cool_off,
                        detail=repr(_root_cause(exc)),
                    )
                    await trio.sleep(cool_off)
                    restarts = []
                    actor.reopen()
                    self._ledger.restarts += 1
                    self._announce(
                        EventKind.ACTOR_RESTARTED,
                        actor=actor.name,
                        detail=f"after a cool-off of {cool_off:g}s",
                    )
                    continue
                actor.restarting = True
                actor.fail_queued("actor_restarting")
                self._ledger.restarts += 1
                self._announce(
                    EventKind.ACTOR_RESTARTED, actor=actor.name, detail=repr(_root_cause(exc))
                )
                try:
                    await trio.sleep(
                        min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_BASE * 2 ** (len(restarts) - 1))
                    )
                finally:
                    actor.restarting = False


def _routes(
    config: Config, actors: Mapping[str, ProviderActor]
) -> dict[str, tuple[Route, list[ProviderActor]]]:
    routes = {route.model: (route, [actors[n] for n in route.chain]) for route in config.routes}
    if not config.routes:
        routes["*"] = (Route(model="*", chain=tuple(actors)), list(actors.values()))
    return routes


def _surface(surface: str) -> str:
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {', '.join(SURFACES)}, not {surface!r}")
    return surface


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_supervisor(
    config: Config, *, observers: Iterable[object] = (), wall_clock: Callable[[], float] = time.time
) -> AsyncIterator[Supervisor]:
    """Start a supervisor: one actor task per provider, in a nursery this block owns.

    ``observers`` (see ``Observer``; ``relayrace.observe`` has metrics, traces and the access
    log) are called inline as requests start and end, attempts end, decisions are made and
    actors' health changes; each is told the supervisor once its actors run.

    Leaving the block cancels every request still in flight (each ends with ``RequestFailed``)
    and every actor, closes the provider clients, and leaves no task behind. Call
    ``await sup.drain()`` first to let requests in flight finish.

    The shared state's backend (``config.state``) is open for the supervisor's lifetime;
    ``wall_clock`` is its deadlines' time (MockClock tests pass one that follows the clock).
    """
    sup: Supervisor | None = None

    def on_event(event: StateEvent) -> None:  # the store went away / is back; a fleet bench
        if sup is not None:
            kind, deployment = state_event(event)
            actor = model = None
            if deployment is not None:
                actor, model = deployment.provider, deployment.model
            sup._announce(kind, actor=actor, model=model, detail=event.reason)

    async with shared_state(config, on_event, wall_clock) as state:
        async with _supervisor(config, observers, state) as sup:
            yield sup


@asynccontextmanager
async def _supervisor(
    config: Config, observers: Iterable[object], state: StateBackend | None
) -> AsyncIterator[Supervisor]:
    sup: Supervisor | None = None
    try:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(config, nursery, observers, state)
            try:
                # Connection pools and TLS contexts are built now, not on a first request
                # (building one is synchronous and blocks every task for up to ~100 ms).
                for provider in config.providers:
                    open_client = getattr(provider.client, "open", None)
                    if open_client is not None:
                        open_client()
                for actor in sup._actors.values():
                    await nursery.start(sup._run_actor, actor)
                for started in sup._hooks.supervisor_started:
                    started(sup)
                yield sup
            finally:
                sup._ledger.end_all()
                nursery.cancel_scope.cancel()
    finally:
        if sup is not None:
            # ``complete`` runs in its caller's task, outside our nursery, and waits for its job:
            # a job left in the inbox of an actor that is gone (queued behind the concurrency
            # limit, or submitted by a failover during the shutdown) would keep its caller
            # waiting until the request's whole budget ran out. End them now, refuse new ones.
            for actor in [*sup._actors.values(), *sup._retiring]:
                actor.close("supervisor_closed")
        # In a `finally`: when the block (or an actor) raises, the nursery re-raises and the
        # clients must still be closed, or their pooled connections leak.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                # The clients running now: a reload may have replaced the config's.
                live = sup.config.providers if sup is not None else config.providers
                retiring = [a.client for a in sup._retiring] if sup is not None else []
                for client in [*(p.client for p in live), *retiring]:
                    aclose = getattr(client, "aclose", None)
                    if aclose is not None:
                        await aclose()
