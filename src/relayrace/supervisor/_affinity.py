"""Prompt-cache affinity: requests with the same key prefer the deployment that served the key
last, so that the provider's prompt cache keeps hitting.

A route's ``affinity`` names the key: ``user`` (the request's ``user`` param, else
``metadata["user"]``), ``header:NAME`` (``metadata["headers"][NAME]``, which the HTTP server
fills from the request's ``x-session-id`` and ``x-relayrace-*`` headers, and a Python caller
sets), or ``prefix`` (a hash of the system prompt and the first user message, their first
``PREFIX_CHARS`` characters). A request without a key is routed as usual.

The pin is soft: the pinned actor is put first when it may take the request; when it is
benched, at its rate limit or has a full inbox, the pin yields (a decision says so), routing
goes on in its usual order, and whoever serves is pinned next. Pins live in a bounded LRU map,
each for the route's ``affinity_ttl`` seconds from its last use.

With a shared state backend (``AffinityMap.share``) pins are the fleet's: a pin made (or
renewed) here is published (the backend's ``pin``, in the background), and a key this process
has no pin for, or a later one, is taken from the mirror. A renewal of the same pin is published
only once a quarter of the TTL has passed since the last one, so another instance may see a pin
end up to ``affinity_ttl / 4`` before this one would.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from .._config import Route
from .._decide import affinity_break, affinity_pin
from .._values import Decision, Request
from ..actors import ProviderActor
from ..state import Deployment, StateBackend

#: characters of the system prompt and of the first user message that make a ``prefix`` key
PREFIX_CHARS = 2048
#: pins kept at most (the least recently used goes first)
MAX_PINS = 10_000


def affinity_key(route: Route, request: Request) -> str | None:
    """The request's affinity key under ``route``'s ``affinity``; ``None``: none (or off)."""
    affinity = route.affinity
    if affinity is None:
        return None
    if affinity == "user":
        user = request.params.get("user", request.metadata.get("user"))
        return user if isinstance(user, str) and user else None
    if affinity == "prefix":
        return _prefix_key(request)
    name = affinity.partition(":")[2].strip().lower()
    headers = request.metadata.get("headers")
    if not isinstance(headers, Mapping):
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if str(k).lower() == name), None)
    return value if isinstance(value, str) and value else None


def _prefix_key(request: Request) -> str | None:
    system = user = None
    for message in request.messages:
        role = message.get("role")
        if system is None and role in ("system", "developer"):
            system = _text(message.get("content"))
        elif role == "user":
            user = _text(message.get("content"))
            break
    if system is None and user is None:
        return None
    digest = hashlib.sha256()
    for part in (system or "", user or ""):
        digest.update(part[:PREFIX_CHARS].encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


class AffinityMap:
    """The pins of one supervisor: (route, key) → the actor that served the key last, until
    its TTL runs out; at most ``size`` of them, the least recently used dropped first."""

    __slots__ = ("_pins", "_size", "_state")

    def __init__(self, size: int = MAX_PINS):
        self._pins: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._size = size
        self._state: StateBackend | None = None

    def __len__(self) -> int:
        return len(self._pins)

    def share(self, state: StateBackend | None) -> None:
        """Share the pins with the fleet through ``state`` (``None``: this process's own)."""
        self._state = state

    def pinned(self, route: str, key: str, now: float) -> str | None:
        """The actor ``key`` is pinned to on ``route``, if the pin is still alive."""
        pin = self._pins.get((route, key))
        if self._state is not None and self._state.mirror.pins:
            pin = self._fleet_pin(route, key, pin, now)
        if pin is None:
            return None
        if pin[1] <= now:
            del self._pins[(route, key)]
            return None
        return pin[0]

    def _fleet_pin(
        self, route: str, key: str, pin: tuple[str, float] | None, now: float
    ) -> tuple[str, float] | None:
        """The fleet's pin of ``key`` when it is later than this process's own (``pin``)."""
        assert self._state is not None
        shared = self._state.mirror.pins.get(_shared_key(route, key))
        if shared is None:
            return pin
        until = now + (shared.until - self._state.now())
        if until <= now or (pin is not None and until <= pin[1]):
            return pin
        pin = self._pins[(route, key)] = (shared.deployment.provider, until)
        self._pins.move_to_end((route, key))
        while len(self._pins) > self._size:
            self._pins.popitem(last=False)
        return pin

    def record(self, route: Route, key: str, actor: ProviderActor, now: float) -> None:
        """``actor`` served ``key``: pin it (again), for the route's TTL. The terminus, a last
        resort, is never pinned."""
        if actor.terminus:
            return
        pins = self._pins
        ttl = route.affinity_ttl
        if self._state is not None:
            old = pins.get((route.model, key))
            if old is None or old[0] != actor.name or old[1] < now + 0.75 * ttl:
                deployment = Deployment(actor.name, actor.model)
                self._state.pin(_shared_key(route.model, key), deployment, ttl=ttl)
        pins[(route.model, key)] = (actor.name, now + ttl)
        pins.move_to_end((route.model, key))
        while len(pins) > self._size:
            pins.popitem(last=False)

    def prefer(
        self,
        route: Route,
        key: str,
        order: list[ProviderActor],
        chain: Sequence[ProviderActor],
        now: float,
        *,
        limited: Callable[[ProviderActor], bool],
    ) -> tuple[list[ProviderActor], Decision | None]:
        """Put the key's pinned actor first in ``order`` (the plan), or say why the pin yields.

        Args:
            route: the route (its ``affinity``).
            key: the request's affinity key.
            order: the actors the routing planned to try, in order.
            chain: every actor of the route (to tell a benched pinned actor from a gone one).
            now: the current time.
            limited: whether an actor is at its rate limit for this request.
        """
        name = self.pinned(route.model, key, now)
        if name is None:
            return order, None
        affinity = route.affinity
        assert affinity is not None
        actor = next((a for a in order if a.name == name), None)
        if actor is None:
            if any(a.name == name for a in chain):
                return order, affinity_break(name, affinity, "benched or unavailable")
            return order, None  # no longer on the route
        if limited(actor):
            return order, affinity_break(name, affinity, "at its rate limit")
        if actor.in_flight >= actor.max_concurrency and actor.queued >= actor.inbox_size:
            return order, affinity_break(name, affinity, "its inbox is full")
        if order[0] is not actor:
            order = [actor, *(a for a in order if a is not actor)]
        return order, affinity_pin(name, affinity)


def _shared_key(route: str, key: str) -> str:
    """A pin's key in the shared state: the route's name and the affinity key."""
    return f"{route}\x1f{key}"
