"""``SharedHealth``: one actor's window on the state shared between relayrace processes
(``relayrace.state``): the benches, probe leases and consecutive-failure counts of its
deployments.

Local health (``Health``) runs on trio's clock; the shared records carry absolute wall-clock
deadlines. The conversion happens here and only here: a trio deadline becomes
``wall_now + (deadline - trio_now)``.

Reads are the mirror's (synchronous, no I/O); writes go to the backend, which applies them to
the mirror at once and sends them on in the background. The one await is ``acquire_probe``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..state import Deployment, StateBackend
from ._health import Health

#: How long a manual bench "until unbench" is written for (the shared record needs a finite
#: deadline; a manual bench lasts until an explicit unbench whatever its deadline says).
ENDLESS = 10 * 365 * 86400.0


class Unshared:
    """This process alone (``[state] backend = "local"``): nothing is shared, every hook does
    nothing, and the actor's own records are the whole story."""

    __slots__ = ()

    def held_elsewhere(self, model: str | None) -> bool:
        return False

    def manually_benched(self, model: str | None) -> bool:
        return False

    def next_change(self, model: str | None, change: float) -> float:
        return change

    def bench(self, model: str | None, until: float, reason: str, *, manual: bool) -> None:
        pass

    def unbench(self, model: str | None, *, manual: bool) -> None:
        pass

    def counter(self, model: str | None, threshold: int) -> Callable[[], int] | None:
        return None

    def record_success(self, model: str | None, *, recovered: bool) -> None:
        pass

    async def leased(
        self, probe: Callable[..., Awaitable[None]], client: Any, model: str, health: Health
    ) -> None:
        await probe(client, model, health)


#: The actors' default: nothing shared.
UNSHARED = Unshared()


class SharedHealth(Unshared):
    """The shared benches, probe leases and failure counts of one provider's deployments.

    Args:
        state: the backend (not ``LocalState``: the actor's own records are the local state).
        provider: the provider's name.
    """

    __slots__ = ("_deployments", "_mirror", "_state", "instance", "provider")

    def __init__(self, state: StateBackend, provider: str):
        self._state = state
        self._mirror = state.mirror
        self.provider = provider
        #: this process's name in probe leases.
        self.instance: str = getattr(state, "instance", "local")
        self._deployments: dict[str | None, Deployment] = {}

    def deployment(self, model: str | None) -> Deployment:
        """The shared record's key: ``model``'s deployment (``None``: provider-wide)."""
        found = self._deployments.get(model)
        if found is None:
            if len(self._deployments) > 1024:
                self._deployments.clear()
            found = self._deployments[model] = Deployment(self.provider, model)
        return found

    def wall(self, deadline: float) -> float:
        """A deadline on trio's clock as wall-clock seconds."""
        if math.isinf(deadline):
            return self._state.now() + ENDLESS
        return self._state.now() + (deadline - trio.current_time())

    # --- reads (routing) ----------------------------------------------------------------------

    def held_elsewhere(self, model: str | None) -> bool:
        """Whether the shared state keeps ``model``'s deployment (``None``: the provider) out of
        use: a bench (its own or the provider's), or another instance probing it."""
        mirror = self._mirror
        if not mirror.benches and not mirror.probes:
            return False
        now = self._state.now()
        deployment = self.deployment(model)
        if mirror.bench(deployment, now) is not None:
            return True
        if not mirror.probes:
            return False
        for d in (deployment, deployment.provider_wide):
            lease = mirror.probe(d, now)
            if lease is not None and lease.holder != self.instance:
                return True
        return False

    def manually_benched(self, model: str | None) -> bool:
        if not self._mirror.benches:
            return False
        record = self._mirror.bench(self.deployment(model), self._state.now())
        return record is not None and record.manual

    def next_change(self, model: str | None, change: float) -> float:
        """``change`` (the actor's own records'), or the end of a longer shared bench."""
        if not self._mirror.benches:
            return change
        now = self._state.now()
        record = self._mirror.bench(self.deployment(model), now)
        if record is None:
            return change
        if record.manual:
            return math.inf
        until = trio.current_time() + (record.until - now)
        return until if math.isinf(change) or until > change else change

    # --- writes -------------------------------------------------------------------------------

    def bench(self, model: str | None, until: float, reason: str, *, manual: bool) -> None:
        """Share a bench of ``model``'s deployment that ends at ``until`` (trio's clock)."""
        deployment = self.deployment(model)
        self._state.bench(deployment, until=self.wall(until), reason=reason, manual=manual)

    def unbench(self, model: str | None, *, manual: bool) -> None:
        """Lift the shared bench of ``model``'s deployment (a manual one only with ``manual``)
        and its failure count; ``model=None`` with ``manual``: every bench of the provider."""
        fields = [self.deployment(model).field]
        if model is None and manual:
            prefix = self.deployment(None).field
            fields += [f for f in self._mirror.benches if f.startswith(prefix) and f != prefix]
        for field in fields:
            deployment = Deployment.from_field(field)
            self._state.unbench(deployment, manual=manual)
            if self._mirror.failures.get(field):
                self._state.record_success(deployment)

    def counter(self, model: str | None, threshold: int) -> Callable[[], int] | None:
        """Counts a failure fleet-wide and returns the fleet's count as far as known
        (``threshold``: the count this actor benches at; past it, failures decide nothing)."""
        deployment = self.deployment(model)
        return lambda: self._state.record_failure(deployment, threshold=threshold)

    def record_success(self, model: str | None, *, recovered: bool) -> None:
        """A success: the shared failure count resets (written only when there is one), and a
        recovery (the end of a probing period) lifts the shared automatic bench."""
        if recovered:
            self.unbench(model, manual=False)
            return
        deployment = self.deployment(model)
        if self._mirror.failures.get(deployment.field):
            self._state.record_success(deployment)

    async def leased(
        self, probe: Callable[..., Awaitable[None]], client: Any, model: str, health: Health
    ) -> None:
        """Run the active probe of ``model`` if this instance takes its lease; otherwise the
        probe ends undecided (``health`` stays half-open) and routing waits for the holder's
        verdict: the lease in the mirror keeps requests away until it is released."""
        policy = health.policy
        deployment = self.deployment(model)
        if not await self._state.acquire_probe(deployment, ttl=policy.probe_timeout + 1.0):
            health.record_reachable(probe=True)
            return
        try:
            await probe(client, model, health)
        finally:
            self._state.release_probe(deployment)
