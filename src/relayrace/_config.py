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

STRATEGIES = ("priority", "round_robin", "weighted", "least_busy")


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


@attrs.frozen(kw_only=True)
class Route:
    """A model name callers ask for, and the providers that serve it.

    ``model = "*"`` catches names no other route lists (the name is passed through upstream to
    providers that have no ``model`` of their own).
    """

    model: str
    chain: tuple[str, ...] = attrs.field(converter=_names)
    strategy: str = "priority"


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
    return problems
