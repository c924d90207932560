"""What a reload compares and reports: whether a provider's actor can be kept for its new
config (``same_provider``), and what changed (``Reloaded``)."""

from __future__ import annotations

import attrs

from .._config import ProviderConfig


@attrs.frozen(kw_only=True)
class Reloaded:
    """What ``Supervisor.reload`` changed, by provider name.

    Attributes:
        added: providers that are new; their actors started.
        removed: providers that are gone; their actors drain (attempts in flight finish),
            then stop and their clients close.
        replaced: providers whose settings changed: a new actor (fresh health) took over and
            the old one drains as a removed one does.
        kept: unchanged providers; their actors keep their health and connections.
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in attrs.asdict(self).items()}


def same_provider(old: ProviderConfig, new: ProviderConfig) -> bool:
    """Whether a reload may keep ``old``'s actor for ``new``: every setting equal, and the
    clients the same, or HTTP clients of one type with equal public settings
    (``_CLIENT_SETTINGS``: where they point, their options).

    A client's secrets and headers are private and are not compared: a changed API key value
    alone (under the same variable name) takes effect at a restart.
    """
    if attrs.evolve(old, client=None) != attrs.evolve(new, client=None):  # type: ignore[arg-type]
        return False
    a, b = old.client, new.client
    if a is b:
        return True
    if type(a) is not type(b) or not hasattr(a, "base_url"):
        return False
    return all(getattr(a, k, None) == getattr(b, k, None) for k in _CLIENT_SETTINGS)


#: The public settings of an HTTP provider client a reload compares.
_CLIENT_SETTINGS = (
    "base_url",
    "query",
    "extra_body",
    "accepts_continuation",
    "probe_mode",
    "max_body_bytes",
    "max_sse_line_bytes",
    "max_event_bytes",
)
