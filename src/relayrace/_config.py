"""Configuration values: providers, routes and policies, frozen and validated.

Built in code, or read from plain data / TOML by ``relayrace.load_config`` and
``relayrace.read_config`` (``_loader``). Every mistake is a ``ConfigError`` naming the key's
path (``providers[1].max_concurrency``) and what was expected; a config with several mistakes
raises ``ConfigErrors`` with all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import attrs

from ._client import Capabilities, ProviderClient
from ._errors import ConfigError, raise_config_errors
from ._policy import Policies
from .state import StateConfig

STRATEGIES = ("priority", "round_robin", "weighted", "least_busy", "latency")

#: What a route's ``affinity`` may key on (``header:NAME`` names a header of the request).
AFFINITIES = ("user", "prefix")


def _positive(path: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{path}.{attribute.name}", "a positive number", value)

    return check


@attrs.frozen(kw_only=True)
class Budgets:
    """Time budgets of one attempt, in seconds; each is a trio cancel scope.

    Attributes:
        connect: opening the connection (given to the HTTP client).
        first_token: from sending the request to the first delta (for a non-streamed call:
            to the response headers, which arrive once the answer is generated).
        idle: the longest gap between two deltas.
        attempt: the whole attempt.
        queue: the longest a job waits in the actor's inbox for a free slot; past it the job
            leaves the inbox and fails over as ``local_capacity`` (code ``queue_timeout``), no
            penalty to the provider. Its wait counts against the request's budget as usual.
    """

    connect: float = attrs.field(default=5.0, validator=_positive("budgets"))
    first_token: float = attrs.field(default=30.0, validator=_positive("budgets"))
    idle: float = attrs.field(default=30.0, validator=_positive("budgets"))
    attempt: float = attrs.field(default=300.0, validator=_positive("budgets"))
    queue: float = attrs.field(default=10.0, validator=_positive("budgets"))


@attrs.frozen(kw_only=True)
class ProviderConfig:
    """One provider actor.

    Attributes:
        name: unique name; replies and errors say which provider served by this name.
        client: the provider client (``relayrace.testing.ScriptedClient``, ``OpenAIClient``…).
        model: the upstream model to ask for; ``None`` passes the request's model through.
        priority: lower is tried first (ties keep the route's chain order).
        weight: share of traffic under the ``weighted`` strategy.
        max_concurrency: attempts this actor runs at once.
        inbox_size: attempts queued beyond that before new ones are refused (``local_capacity``).
        exempt: never benched.
        terminus: always tried, last, whatever its health.
        accepts_continuation: may be asked to continue a partial answer (``continue`` mode);
            ``None`` takes the client's own declaration.
        budgets: the attempt's time budgets.
        capabilities: what the provider can serve; ``None`` takes the client kind's
            defaults (``default_capabilities``; everything for other clients).
        rpm / tpm: requests / tokens a minute this deployment may be sent (``None``: no
            limit of ours; limits the provider reports in its headers apply regardless).
    """

    name: str
    client: ProviderClient
    model: str | None = None
    priority: int = 0
    weight: float = 1.0
    max_concurrency: int = 64
    inbox_size: int = 256
    exempt: bool = False
    terminus: bool = False
    accepts_continuation: bool | None = None
    budgets: Budgets = Budgets()
    capabilities: Capabilities | None = None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def effective_capabilities(self) -> Capabilities:
        """The capabilities routing uses: the configured ones, else the client's defaults."""
        if self.capabilities is not None:
            return self.capabilities
        default = getattr(self.client, "default_capabilities", None)
        return default if isinstance(default, Capabilities) else Capabilities()

    @property
    def continues(self) -> bool:
        if self.accepts_continuation is not None:
            return self.accepts_continuation
        return bool(getattr(self.client, "accepts_continuation", False))


def _names(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _providers(items: Iterable[ProviderConfig]) -> tuple[ProviderConfig, ...]:
    return tuple(items)


def _routes(items: Iterable[Route]) -> tuple[Route, ...]:
    return tuple(items)


def _hedge_after(_instance: Any, _attribute: Any, value: Any) -> None:
    if isinstance(value, str):
        if value[:1] == "p" and value[1:].isdigit() and 0 < int(value[1:]) < 100:
            return
    elif not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0:
        return
    raise ConfigError("hedge.after", 'a percentile ("p50".."p99") or positive seconds', value)


@attrs.frozen(kw_only=True)
class Hedge:
    """Hedging of a route's first attempt before its first token.

    Attributes:
        after: the delay: ``"pNN"``, that percentile of the first actor's own time to first
            token (its recent samples), or a fixed number of seconds.
        max: hedges per request (1: one extra attempt at most).
        fallback: the delay of a percentile while the actor has too few samples.
    """

    after: str | float = attrs.field(default="p95", validator=_hedge_after)
    max: int = attrs.field(default=1)
    fallback: float = attrs.field(default=1.0, validator=_positive("hedge"))

    @max.validator
    def _max(self, _attribute: Any, value: Any) -> None:
        if value != 1 or isinstance(value, bool):
            raise ConfigError("hedge.max", "1 (one hedge per request)", value)


@attrs.frozen(kw_only=True)
class Route:
    """A model name callers ask for, and the providers that serve it.

    ``model = "*"`` catches names no other route lists (the name is passed through upstream to
    providers that have no ``model`` of their own).

    ``affinity`` (``user``, ``header:NAME``, ``prefix``; ``None``: off) pins requests with the
    same key softly to the deployment that served the key last, for ``affinity_ttl`` seconds.
    """

    model: str
    chain: tuple[str, ...] = attrs.field(converter=_names)
    strategy: str = "priority"
    affinity: str | None = None
    affinity_ttl: float = 300.0
    #: the ``latency`` strategy's share of picks that explore (not the best of the two drawn).
    exploration: float = 0.05
    #: hedge the first attempt before its first token (``None``: never).
    hedge: Hedge | None = None


@attrs.frozen(kw_only=True)
class Config:
    """Everything a supervisor needs.

    Without routes, every model name is served by all providers (a ``*`` route).

    Raises:
        ConfigError: duplicate provider names, a route naming a missing provider, an unknown
            strategy, no providers.
    """

    providers: tuple[ProviderConfig, ...] = attrs.field(converter=_providers)
    routes: tuple[Route, ...] = attrs.field(default=(), converter=_routes)
    policies: Policies = Policies()
    seed: int | None = None
    #: where the state shared between processes lives (``[state]``; see ``relayrace.state``).
    state: StateConfig = StateConfig()

    def __attrs_post_init__(self) -> None:
        _validate(self)


def _validate(config: Config) -> None:
    if not config.providers:
        raise ConfigError("providers", "at least one provider", show_got=False)
    problems = []
    for i, provider in enumerate(config.providers):
        problems += provider_problems(i, provider)
    names = [p.name if isinstance(p, ProviderConfig) else None for p in config.providers]
    problems += name_problems(names)
    problems += route_problems(config.routes, {name for name in names if name})
    raise_config_errors(problems)


def provider_problems(index: int, provider: Any) -> list[ConfigError]:
    """The mistakes in one provider's values (``providers[index]``)."""
    at = f"providers[{index}]"
    if not isinstance(provider, ProviderConfig):
        return [ConfigError(at, "a ProviderConfig", provider)]
    problems = []
    # Checked by shape, not with isinstance: a client written for tests may leave out
    # ``accepts_continuation`` (False) and ``aclose`` (nothing to release).
    if not callable(getattr(provider.client, "call", None)):
        problems.append(
            ConfigError(f"{at}.client", "a provider client with a call() method", provider.client)
        )
    for field in ("max_concurrency", "inbox_size"):
        value = getattr(provider, field)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (1 if field == "max_concurrency" else 0)
        ):
            problems.append(ConfigError(f"{at}.{field}", "a positive integer", value))
    if not provider.weight > 0:
        problems.append(ConfigError(f"{at}.weight", "a positive number", provider.weight))
    for field in ("rpm", "tpm"):
        value = getattr(provider, field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(ConfigError(f"{at}.{field}", "a positive integer", value))
    return problems


def name_problems(names: Sequence[str | None]) -> list[ConfigError]:
    """Empty and duplicate provider names (``None``: a provider whose name is unknown)."""
    problems = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            continue
        if not name:
            problems.append(ConfigError(f"providers[{i}].name", "a non-empty string", name))
        elif name in seen:
            problems.append(
                ConfigError(f"providers[{i}].name", "a name no other provider has", name)
            )
        seen.add(name)
    return problems


def route_problems(routes: Sequence[Route | None], names: Collection[str]) -> list[ConfigError]:
    """The mistakes in the routes, given the providers' names (``None``: an unreadable route)."""
    problems = []
    models: set[str] = set()
    for i, route in enumerate(routes):
        if route is None:
            continue
        if route.model in models:
            problems.append(
                ConfigError(f"routes[{i}].model", "a model name no other route has", route.model)
            )
        models.add(route.model)
        if not route.chain:
            problems.append(
                ConfigError(f"routes[{i}].chain", "at least one provider name", show_got=False)
            )
        for j, name in enumerate(route.chain):
            if name not in names:
                problems.append(
                    ConfigError(
                        f"routes[{i}].chain[{j}]",
                        f"one of the providers ({', '.join(sorted(names))})",
                        name,
                    )
                )
        if len(set(route.chain)) != len(route.chain):
            problems.append(
                ConfigError(f"routes[{i}].chain", "each provider at most once", list(route.chain))
            )
        if route.strategy not in STRATEGIES:
            problems.append(
                ConfigError(
                    f"routes[{i}].strategy", f"one of {', '.join(STRATEGIES)}", route.strategy
                )
            )
        if route.affinity is not None and not valid_affinity(route.affinity):
            problems.append(
                ConfigError(
                    f"routes[{i}].affinity", "user, prefix or header:NAME", route.affinity
                )
            )
        ttl = route.affinity_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            problems.append(ConfigError(f"routes[{i}].affinity_ttl", "a positive number", ttl))
        if not 0.0 <= route.exploration <= 1.0:
            problems.append(
                ConfigError(f"routes[{i}].exploration", "a share from 0 to 1", route.exploration)
            )
    return problems


def valid_affinity(value: object) -> bool:
    """Whether ``value`` is an affinity a route may have (``user``, ``prefix``, ``header:NAME``)."""
    if not isinstance(value, str):
        return False
    kind, sep, name = value.partition(":")
    return value in AFFINITIES or (kind == "header" and bool(sep) and bool(name.strip()))
