"""Configuration: providers, routes and policies, built in code or read from a dict / TOML.

Every mistake raises ``ConfigError`` naming the key's path (``providers[1].max_concurrency``)
and what was expected.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ._errors import ConfigError
from ._failure import Category
from ._policy import (
    AllBenched,
    FailoverAction,
    FailoverPolicy,
    HealthPolicy,
    Match,
    MidStream,
    Policies,
    RetryBudgetPolicy,
    RetryPolicy,
    StreamPolicy,
)
from ._table import Table

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
    """

    connect: float = attrs.field(default=5.0, validator=_positive("budgets"))
    first_token: float = attrs.field(default=30.0, validator=_positive("budgets"))
    idle: float = attrs.field(default=30.0, validator=_positive("budgets"))
    attempt: float = attrs.field(default=300.0, validator=_positive("budgets"))


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
    """

    name: str
    client: Any
    model: str | None = None
    priority: int = 0
    weight: float = 1.0
    max_concurrency: int = 64
    inbox_size: int = 256
    exempt: bool = False
    terminus: bool = False
    accepts_continuation: bool | None = None
    budgets: Budgets = Budgets()

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

    def __attrs_post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, clients: Mapping[str, ClientFactory] | None = None
    ) -> Config:
        """Build a config from plain data (as read from TOML or JSON).

        Args:
            data: ``{"providers": [...], "routes": [...], "policies": {...}}``.
            clients: extra client factories by ``kind``, on top of the built-in ones.

        Raises:
            ConfigError: naming the key's path and what was expected.
        """
        return _parse(data, {**CLIENT_FACTORIES, **(clients or {})})

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], *, clients: Mapping[str, ClientFactory] | None = None
    ) -> Config:
        """Read a TOML config file (its ``[server]`` table, if any, is the gateway's business
        and is not read here).

        Raises:
            ConfigError: the file cannot be read, is not valid TOML, or has a mistake (naming
                the key's path and what was expected).
        """
        data = read_toml(path)
        data.pop("server", None)
        return cls.from_dict(data, clients=clients)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file into plain data.

    Raises:
        ConfigError: the file cannot be read or is not valid TOML (with the line and column).
    """
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            os.fspath(path), f"a readable TOML file ({exc.strerror or exc})", show_got=False
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(os.fspath(path), f"valid TOML: {exc}", show_got=False) from None


def _validate(config: Config) -> None:
    if not config.providers:
        raise ConfigError("providers", "at least one provider", show_got=False)
    seen: set[str] = set()
    for i, provider in enumerate(config.providers):
        if not isinstance(provider, ProviderConfig):
            raise ConfigError(f"providers[{i}]", "a ProviderConfig", provider)
        if not provider.name:
            raise ConfigError(f"providers[{i}].name", "a non-empty string", provider.name)
        if provider.name in seen:
            raise ConfigError(f"providers[{i}].name", "a name no other provider has", provider.name)
        seen.add(provider.name)
        if not callable(getattr(provider.client, "call", None)):
            raise ConfigError(
                f"providers[{i}].client", "a provider client with a call() method", provider.client
            )
        for field in ("max_concurrency", "inbox_size"):
            value = getattr(provider, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if field == "max_concurrency" else 0)
            ):
                raise ConfigError(f"providers[{i}].{field}", "a positive integer", value)
        if not provider.weight > 0:
            raise ConfigError(f"providers[{i}].weight", "a positive number", provider.weight)
    models: set[str] = set()
    for i, route in enumerate(config.routes):
        if route.model in models:
            raise ConfigError(f"routes[{i}].model", "a model name no other route has", route.model)
        models.add(route.model)
        if not route.chain:
            raise ConfigError(f"routes[{i}].chain", "at least one provider name", show_got=False)
        for j, name in enumerate(route.chain):
            if name not in seen:
                raise ConfigError(
                    f"routes[{i}].chain[{j}]",
                    f"one of the providers ({', '.join(sorted(seen))})",
                    name,
                )
        if len(set(route.chain)) != len(route.chain):
            raise ConfigError(f"routes[{i}].chain", "each provider at most once", list(route.chain))
        if route.strategy not in STRATEGIES:
            raise ConfigError(
                f"routes[{i}].strategy", f"one of {', '.join(STRATEGIES)}", route.strategy
            )


# --- reading plain data -------------------------------------------------------------------------

#: Builds a provider client from what is left of its table, with the pool size and connect
#: timeout that the provider's ``max_concurrency`` and ``budgets.connect`` give it.
ClientFactory = Callable[..., Any]


def _scripted_factory(table: Table, **_sizing: Any) -> Any:
    from .testing._scripted import ScriptedClient

    return ScriptedClient.from_table(table)


def _openai_factory(table: Table, **sizing: Any) -> Any:
    from .actors._openai import OpenAIClient

    return OpenAIClient.from_table(table, **sizing)


#: Where ``relayrace mock-provider`` listens by default.
MOCK_BASE_URL = "http://127.0.0.1:8900/v1"


def _mock_factory(table: Table, **sizing: Any) -> Any:
    # The mock provider speaks OpenAI's format on /v1: an OpenAI client with the mock's URL.
    from .actors._openai import OpenAIClient

    return OpenAIClient.from_table(table, base_url=MOCK_BASE_URL, **sizing)


def _anthropic_factory(table: Table, **sizing: Any) -> Any:
    from .actors._anthropic import AnthropicClient

    return AnthropicClient.from_table(table, **sizing)


def _gemini_factory(table: Table, **sizing: Any) -> Any:
    from .actors._gemini import GeminiClient

    return GeminiClient.from_table(table, **sizing)


CLIENT_FACTORIES: dict[str, ClientFactory] = {
    "scripted": _scripted_factory,
    "openai": _openai_factory,
    "anthropic": _anthropic_factory,
    "gemini": _gemini_factory,
    "mock": _mock_factory,
}

CATEGORY_NAMES = [c.value for c in Category]


def _categories(table: Table, key: str) -> list[Category]:
    names = table.strings(key)
    for i, name in enumerate(names):
        if name not in CATEGORY_NAMES:
            raise ConfigError(
                f"{table._at(key)}[{i}]", f"a category ({', '.join(CATEGORY_NAMES)})", name
            )
    return [Category(n) for n in names]


def _match(table: Table) -> Match:
    categories = _categories(table, "categories")
    codes = table.strings("codes")
    statuses = table.items("statuses", [])
    for i, status in enumerate(statuses):
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ConfigError(f"{table._at('statuses')}[{i}]", "an HTTP status (100-599)", status)
    keywords = table.strings("keywords")
    table.done()
    return Match(categories=categories, codes=codes, statuses=statuses, keywords=keywords)


def _budgets(table: Table) -> Budgets:
    d = Budgets()
    budgets = Budgets(
        connect=table.number("connect", d.connect, positive=True),
        first_token=table.number("first_token", d.first_token, positive=True),
        idle=table.number("idle", d.idle, positive=True),
        attempt=table.number("attempt", d.attempt, positive=True),
    )
    table.done()
    return budgets


PROVIDER_KEYS = (
    "name",
    "kind",
    "model",
    "priority",
    "weight",
    "max_concurrency",
    "inbox_size",
    "exempt",
    "terminus",
    "accepts_continuation",
    "budgets",
)


def _provider(table: Table, factories: Mapping[str, ClientFactory]) -> ProviderConfig:
    name = table.text("name")
    kind = table.choice("kind", sorted(factories))
    model = table.text("model", None)
    priority = table.integer("priority", 0, minimum=-1_000_000)
    weight = table.number("weight", 1.0, positive=True)
    max_concurrency = table.integer("max_concurrency", 64, minimum=1)
    inbox_size = table.integer("inbox_size", 256, minimum=0)
    exempt = table.flag("exempt", False)
    terminus = table.flag("terminus", False)
    accepts_continuation = table.flag("accepts_continuation", None)
    budgets = _budgets(table.table("budgets"))
    # What is left belongs to the client factory (base_url, api_key_env, script, ...).
    client = factories[kind](
        table, max_connections=max_concurrency, connect_timeout=budgets.connect
    )
    table.done()
    return ProviderConfig(
        name=name,
        client=client,
        model=model,
        priority=priority,
        weight=weight,
        max_concurrency=max_concurrency,
        inbox_size=inbox_size,
        exempt=exempt,
        terminus=terminus,
        accepts_continuation=accepts_continuation,
        budgets=budgets,
    )


def _policies(table: Table) -> Policies:
    r = table.table("retry")
    dr = RetryPolicy()
    retry = RetryPolicy(
        enabled=r.flag("enabled", dr.enabled),
        max_attempts=r.integer("max_attempts", dr.max_attempts, minimum=1),
        allow=_match(r.table("allow")),
        deny=_match(r.table("deny")),
        backoff_base=r.number("backoff_base", dr.backoff_base),
        backoff_cap=r.number("backoff_cap", dr.backoff_cap),
        max_wait=r.number("max_wait", dr.max_wait),
    )
    r.done()

    f = table.table("failover")
    df = FailoverPolicy()
    actions_table = f.table("actions")
    actions = {}
    for category in CATEGORY_NAMES:
        if actions_table.has(category):
            actions[Category(category)] = FailoverAction(
                actions_table.choice(category, ["next", "stop"])
            )
    actions_table.done()
    failover = FailoverPolicy(
        enabled=f.flag("enabled", df.enabled),
        actions=actions,
        allow=_match(f.table("allow")),
        deny=_match(f.table("deny")),
        max_providers=f.integer("max_providers", df.max_providers),
        total_budget=f.number("total_budget", df.total_budget, positive=True),
    )
    f.done()

    h = table.table("health")
    dh = HealthPolicy()
    health = HealthPolicy(
        failure_threshold=h.integer("failure_threshold", dh.failure_threshold, minimum=1),
        cooldown_base=h.number("cooldown_base", dh.cooldown_base, positive=True),
        cooldown_cap=h.number("cooldown_cap", dh.cooldown_cap, positive=True),
        bench_immediately=_categories(h, "bench_immediately")
        if h.has("bench_immediately")
        else dh.bench_immediately,
        long_bench=h.number("long_bench", dh.long_bench, positive=True),
        overload_bench=h.number("overload_bench", dh.overload_bench, positive=True),
        probe_timeout=h.number("probe_timeout", dh.probe_timeout, positive=True),
        max_benched_share=h.number(
            "max_benched_share", dh.max_benched_share, positive=True, maximum=1.0
        ),
        when_all_benched=AllBenched(
            h.choice("when_all_benched", [a.value for a in AllBenched], dh.when_all_benched.value)
        ),
    )
    h.done()

    b = table.table("retry_budget")
    db = RetryBudgetPolicy()
    budget = RetryBudgetPolicy(
        ratio=b.number("ratio", db.ratio),
        floor=b.integer("floor", db.floor),
        window=b.number("window", db.window, positive=True),
    )
    b.done()

    s = table.table("stream")
    stream = StreamPolicy(
        mid_stream=MidStream(
            s.choice("mid_stream", [m.value for m in MidStream], MidStream.ERROR.value)
        )
    )
    s.done()

    policies = Policies(
        retry=retry,
        failover=failover,
        hard_stop=_match(table.table("hard_stop")),
        demote=_match(table.table("demote")),
        health=health,
        retry_budget=budget,
        stream=stream,
    )
    table.done()
    return policies


def _parse(data: Mapping[str, Any], factories: Mapping[str, ClientFactory]) -> Config:
    root = Table(data, "")
    providers_data = root.items("providers")
    providers = [
        _provider(Table(p, f"providers[{i}]"), factories) for i, p in enumerate(providers_data)
    ]
    routes = []
    for i, r in enumerate(root.items("routes", [])):
        t = Table(r, f"routes[{i}]")
        routes.append(
            Route(
                model=t.text("model"),
                chain=t.strings("chain"),
                strategy=t.choice("strategy", STRATEGIES, "priority"),
            )
        )
        t.done()
    policies = _policies(root.table("policies"))
    seed = root.integer("seed", None, minimum=0)
    root.done()
    return Config(providers=providers, routes=routes, policies=policies, seed=seed)
