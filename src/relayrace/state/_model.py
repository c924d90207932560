"""The values of the shared state and the pure rules that merge them.

A ``Deployment`` is a provider × upstream model (``model=None``: the provider-wide record that
account-level failures bench). Every rule here takes ``now`` (wall-clock seconds) and does no
I/O; the Lua scripts in ``_scripts`` apply the same rules inside Redis.
"""

from __future__ import annotations

import enum
import functools

import attrs

#: Separates provider and model in a deployment's field name (never in either name).
SEPARATOR = "\x1f"


@attrs.frozen
class Deployment:
    """A provider × upstream model; ``model=None`` is the provider as a whole."""

    provider: str
    model: str | None = None

    # Routing reads the mirror by these on every pick: computed once.
    @functools.cached_property
    def field(self) -> str:
        """The deployment's name inside the shared state (a hash field, part of a key)."""
        return f"{self.provider}{SEPARATOR}{self.model or ''}"

    @functools.cached_property
    def provider_field(self) -> str:
        """The field of the provider-wide record that covers this deployment."""
        return f"{self.provider}{SEPARATOR}"

    @classmethod
    def from_field(cls, field: str) -> Deployment:
        provider, _, model = field.partition(SEPARATOR)
        return cls(provider, model or None)

    @property
    def provider_wide(self) -> Deployment:
        return Deployment(self.provider)


@attrs.frozen(kw_only=True)
class BenchRecord:
    """A bench: an absolute wall-clock deadline, why, and whether an operator set it.

    A manual bench lasts until an explicit unbench whatever its deadline says.
    """

    until: float
    reason: str
    manual: bool = False

    def active(self, now: float) -> bool:
        return self.manual or self.until > now


def merge_bench(old: BenchRecord | None, new: BenchRecord, now: float) -> BenchRecord:
    """The bench that results from ``new`` arriving where ``old`` is recorded.

    Merging never shortens a bench (the later deadline wins) and never lifts a manual bench;
    the reason is the manual one's if exactly one is manual, else the later deadline's.
    """
    if old is None or not old.active(now):
        return new
    if old.manual != new.manual:
        winner = old if old.manual else new
    else:
        winner = old if old.until > new.until else new
    return BenchRecord(
        until=max(old.until, new.until), reason=winner.reason, manual=old.manual or new.manual
    )


@attrs.frozen(kw_only=True)
class ProbeLease:
    """One instance's right to probe a benched deployment, until ``until`` (wall clock)."""

    holder: str
    until: float

    def active(self, now: float) -> bool:
        return self.until > now


@attrs.frozen(kw_only=True)
class LearnedLimits:
    """What a provider said about its limits (``x-ratelimit-remaining-*`` and reset headers),
    as numbers; ``None`` where it said nothing. ``reset_at`` is absolute wall-clock time."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_at: float | None = None
    observed_at: float = 0.0


@attrs.frozen(kw_only=True)
class Usage:
    """Requests and tokens admitted to a deployment in one wall-clock minute, fleet-wide as
    far as this process knows."""

    minute: int
    requests: int = 0
    tokens: int = 0


@attrs.frozen(kw_only=True)
class Pin:
    """A cache-affinity pin: requests with this key prefer ``deployment`` until ``until``."""

    deployment: Deployment
    until: float

    def active(self, now: float) -> bool:
        return self.until > now


class StateEventKind(enum.Enum):
    DEGRADED = "state_degraded"
    RESTORED = "state_restored"
    #: a bench another instance made (``field``: its deployment) reached this one's mirror
    FLEET_BENCHED = "fleet_benched"
    #: a bench another instance lifted (an unbench, or its probe's recovery)
    FLEET_UNBENCHED = "fleet_unbenched"


@attrs.frozen(kw_only=True)
class StateEvent:
    """Told to the backend's ``on_event`` hook when the shared store goes away or comes back,
    and when another instance's bench (or its lifting) reaches this one.

    ``reason`` names what happened (an exception's class, ``timeout``; a bench's reason), never
    a URL or a secret. ``field`` is the deployment of a fleet bench (``Deployment.from_field``).
    """

    kind: StateEventKind
    reason: str
    at: float
    field: str | None = None


@attrs.frozen(kw_only=True)
class StateStatistics:
    """A snapshot of a backend's health (see ``statistics()``): writes waiting, dropped (queue
    full), reconnections, records re-published after Redis lost them, messages ignored on the
    channel (not relayrace's), and the instances sharing the state (this one included, as of
    the last full read)."""

    backend: str
    connected: bool
    degraded: bool
    queued: int = 0
    dropped: int = 0
    reconnects: int = 0
    republished: int = 0
    ignored: int = 0
    instances: int = 1


def minute_of(now: float) -> int:
    return int(now // 60)
