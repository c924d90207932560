"""Reading configuration: plain data / TOML into a ``Config``, the registry of client kinds,
and the gateway's file (the supervisor's config plus the ``[server]`` table).

One reading finds every mistake in the file: each is a ``ConfigError`` naming the key's path
and what was expected (a misspelt key gets its nearest known key), the environment variables
that are not set are reported together as one, and several mistakes are raised at the end as
one ``ConfigErrors``.

The ``[server]`` table::

    [server]
    http_host = "127.0.0.1"
    http_port = 8000            # 0: pick a free port
    ws_port = 8765
    ws_enabled = true           # false: no websocket endpoint (http_enabled likewise)
    tokens_env = ["RELAYRACE_TOKEN"]   # names of environment variables holding bearer tokens
    max_frame_bytes = 1048576
    max_in_flight_per_connection = 64
    max_connections = 1024
    send_queue_frames = 32
    max_body_bytes = 1048576
    shutdown_grace = 10.0
    metrics_host = "127.0.0.1"  # the Prometheus /metrics listener (unauthenticated)
    metrics_port = 9464         # default: no metrics listener
    admin_tokens_env = ["RELAYRACE_ADMIN_TOKEN"]   # the /admin/ API's tokens; none: no admin API
    log_format = "json"         # the access log: json or text
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._client import CAPABILITY_FLAGS, Capabilities
from ._config import (
    STRATEGIES,
    Budgets,
    Config,
    Hedge,
    ProviderConfig,
    Route,
    name_problems,
    route_problems,
)
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
from ._server_table import server_settings
from ._table import Problems, Table, nearest
from .state import parse_state_config

if TYPE_CHECKING:
    from .server._settings import ServerSettings

#: Builds a provider client from what is left of its table, given the pool size and connect
#: timeout that the provider's ``max_concurrency`` and ``budgets.connect`` give it:
#: ``factory(table, *, max_connections=..., connect_timeout=...)``.
ClientFactory = Callable[..., Any]

#: Where ``relayrace mock-provider`` listens by default.
MOCK_BASE_URL = "http://127.0.0.1:8900/v1"

# The clients are imported when a file asks for their kind: ``import relayrace`` stays light
# (the test double and the HTTP stack load only when used).


def _scripted_factory(table: Table, **_sizing: Any) -> Any:
    from .testing._scripted import ScriptedClient

    return ScriptedClient.from_table(table)


def _openai_factory(table: Table, **sizing: Any) -> Any:
    from .actors import OpenAIClient

    return OpenAIClient.from_table(table, **sizing)


def _mock_factory(table: Table, **sizing: Any) -> Any:
    # The mock provider speaks OpenAI's format on /v1: an OpenAI client with the mock's URL.
    from .actors import OpenAIClient

    return OpenAIClient.from_table(table, base_url=MOCK_BASE_URL, **sizing)


def _anthropic_factory(table: Table, **sizing: Any) -> Any:
    from .actors import AnthropicClient

    return AnthropicClient.from_table(table, **sizing)


def _gemini_factory(table: Table, **sizing: Any) -> Any:
    from .actors import GeminiClient

    return GeminiClient.from_table(table, **sizing)


#: The client kinds a file may name, by ``kind``.
CLIENT_FACTORIES: Mapping[str, ClientFactory] = {
    "scripted": _scripted_factory,
    "openai": _openai_factory,
    "anthropic": _anthropic_factory,
    "gemini": _gemini_factory,
    "mock": _mock_factory,
}


@attrs.frozen(kw_only=True)
class GatewayConfig:
    """What ``relayrace serve`` runs: the supervisor's config and the servers' settings."""

    config: Config
    server: ServerSettings


# --- the public readers ---------------------------------------------------------------------------


def load_config(
    data: Mapping[str, Any],
    *,
    clients: Mapping[str, ClientFactory] | None = None,
    env: bool = True,
) -> Config:
    """Build a config from plain data (as read from TOML or JSON).

    Args:
        data: ``{"providers": [...], "routes": [...], "policies": {...}, "seed": ...}``.
        clients: extra client factories by ``kind``, on top of the built-in ones.
        env: ``False``: do not read environment variables (``api_key_env`` names are still
            checked for shape; the clients get no key). For checking a file, not for serving.

    Raises:
        ConfigError: one mistake, naming the key's path and what was expected;
            ``ConfigErrors`` (a ``ConfigError``) with every mistake when there are several.
    """
    _refuse_paths(data, "read_config")
    problems = Problems(read_env=env)
    config = _config(data, {**CLIENT_FACTORIES, **(clients or {})}, problems)
    problems.raise_if_any()
    assert config is not None  # no problems: it was built
    return config


def read_config(
    path: str | os.PathLike[str],
    *,
    clients: Mapping[str, ClientFactory] | None = None,
    env: bool = True,
) -> Config:
    """Read a TOML config file (its ``[server]`` table, if any, is the gateway's business and
    is not read here); as ``load_config``.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML, or has mistakes (all of them,
            as ``ConfigErrors``, when there are several).
    """
    data = read_toml(path)
    data.pop("server", None)
    return load_config(data, clients=clients, env=env)


def load_gateway(
    data: Mapping[str, Any],
    *,
    clients: Mapping[str, ClientFactory] | None = None,
    env: bool = True,
) -> GatewayConfig:
    """The gateway's config from plain data: the supervisor's config and ``[server]``.

    ``env=False`` reads no environment variable (so ``server.tokens_env`` gives no tokens).

    Raises:
        ConfigError: as ``load_config``, for the ``server`` table too.
    """
    _refuse_paths(data, "read_gateway")
    data = dict(data)
    problems = Problems(read_env=env)
    server = _unit(problems, server_settings, data.pop("server", {}), problems)
    config = _config(data, {**CLIENT_FACTORIES, **(clients or {})}, problems)
    problems.raise_if_any()
    assert config is not None and server is not None  # no problems: both were built
    return GatewayConfig(config=config, server=server)


def read_gateway(
    path: str | os.PathLike[str],
    *,
    clients: Mapping[str, ClientFactory] | None = None,
    env: bool = True,
) -> GatewayConfig:
    """Read a gateway config file (what ``relayrace serve`` and ``check`` read).

    Raises:
        ConfigError: as ``load_gateway``; or the file cannot be read or is not valid TOML.
    """
    return load_gateway(read_toml(path), clients=clients, env=env)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file into plain data.

    Raises:
        ConfigError: the file cannot be read or is not valid TOML (with the line and column).
    """
    try:
        with open(path, "rb") as file:
            text = file.read().decode()
    except OSError as exc:
        raise ConfigError(
            os.fspath(path), f"a readable TOML file ({exc.strerror or exc})", show_got=False
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(os.fspath(path), f"UTF-8 text ({exc.reason})", show_got=False) from None
    return parse_toml(text, os.fspath(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text read from ``source`` (a file name, ``<stdin>``) into plain data.

    Raises:
        ConfigError: the text is not valid TOML (naming ``source``, the line and column).
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"valid TOML: {exc}", show_got=False) from None


def _refuse_paths(data: Any, reader: str) -> None:
    if isinstance(data, (str, bytes, os.PathLike)):
        raise TypeError(f"expected plain data (a mapping); for a file, use relayrace.{reader}")


def _unit(problems: Problems, read: Callable[..., Any], *args: Any) -> Any:
    """Read one unit (a provider, a route, a policy table): its mistake, if it cannot go on,
    is recorded, and ``None`` stands in for it."""
    try:
        return read(*args)
    except ConfigError as exc:
        problems.add(exc)
        return None


# --- the supervisor's config ----------------------------------------------------------------------


def _config(
    data: Mapping[str, Any], factories: Mapping[str, ClientFactory], problems: Problems
) -> Config | None:
    root = Table(data, "", problems)
    given = _unit(problems, root.items, "providers")
    providers_data = given or []
    names: list[str | None] = []
    providers: list[ProviderConfig | None] = []
    for i, item in enumerate(providers_data):
        name, provider = _unit(problems, _provider, item, i, factories, problems) or (None, None)
        names.append(name)
        providers.append(provider)
    routes = [
        _unit(problems, _route, r, i, problems) for i, r in enumerate(root.items("routes", []))
    ]
    policies = _unit(problems, _policies, root.table("policies"))
    seed = root.integer("seed", None, minimum=0)
    state = _unit(problems, parse_state_config, root.table("state"))
    root.done()
    unread = [p for p in (*providers, *routes, policies, state) if p is None]
    if problems.errors or unread:
        # The file's own mistakes first; then what can still be checked across them.
        if given == []:
            problems.add(ConfigError("providers", "at least one provider", show_got=False))
        problems.errors += name_problems(names)
        problems.errors += route_problems(routes, {name for name in names if name})
        return None
    try:
        return Config(
            providers=[p for p in providers if p is not None],
            routes=[r for r in routes if r is not None],
            policies=policies,
            seed=seed,
            state=state,
        )
    except ConfigError as exc:
        problems.add(exc)
        return None


def _provider(
    data: Any, index: int, factories: Mapping[str, ClientFactory], problems: Problems
) -> tuple[str | None, ProviderConfig | None]:
    table = Table(data, f"providers[{index}]", problems)
    name = _unit(problems, table.text, "name")
    kind = _unit(problems, table.choice, "kind", sorted(factories))
    model = table.text("model", None)
    priority = table.integer("priority", 0, minimum=-1_000_000)
    weight = table.number("weight", 1.0, positive=True)
    max_concurrency = table.integer("max_concurrency", 64, minimum=1)
    inbox_size = table.integer("inbox_size", 256, minimum=0)
    rpm = table.integer("rpm", None, minimum=1)
    tpm = table.integer("tpm", None, minimum=1)
    exempt = table.flag("exempt", False)
    terminus = table.flag("terminus", False)
    accepts_continuation = table.flag("accepts_continuation", None)
    budgets = _unit(problems, _budgets, table.table("budgets")) or Budgets()
    capabilities_data = table.raw("capabilities", None)
    if kind is None:
        return name, None  # what is left belongs to a client nobody knows: not checked
    # What is left belongs to the client factory (base_url, api_key_env, script, ...).
    try:
        client = factories[kind](
            table, max_connections=max_concurrency, connect_timeout=budgets.connect
        )
    except ConfigError as exc:  # a client stops at its first mistake: the rest is unchecked
        problems.add(exc)
        return name, None
    except ValueError as exc:  # a client's own argument check
        expected = f"options its client accepts ({exc})"
        problems.add(ConfigError(table.path, expected, show_got=False))
        return name, None
    table.done()
    capabilities = None
    if capabilities_data is not None:
        capabilities = _unit(
            problems,
            _capabilities,
            capabilities_data,
            f"{table.path}.capabilities",
            problems,
            client,
        )
    if name is None:
        return None, None
    return name, ProviderConfig(
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
        capabilities=capabilities,
        rpm=rpm,
        tpm=tpm,
    )


def _route(data: Any, index: int, problems: Problems) -> Route:
    table = Table(data, f"routes[{index}]", problems)
    route = Route(
        model=table.text("model"),
        chain=table.strings("chain"),
        strategy=table.choice("strategy", STRATEGIES, "priority"),
        affinity=table.text("affinity", None),
        affinity_ttl=table.number("affinity_ttl", 300.0, positive=True),
        exploration=table.number("exploration", 0.05, maximum=1.0),
        hedge=_hedge(table) if table.has("hedge") else None,
    )
    table.done()
    return route


def _hedge(route: Table) -> Hedge | None:
    """``hedge = { after = "p95" | seconds, max = 1, fallback = 1.0 }``."""
    table = route.table("hedge")
    after = table.raw("after", "p95")
    try:
        Hedge(after=after)
    except ConfigError:
        after = table.mistake(
            table.at("after"), 'a percentile ("p50".."p99") or positive seconds', after, fallback=None
        )
    most = table.integer("max", 1, minimum=1)
    if most != 1:
        most = table.mistake(table.at("max"), "1 (one hedge per request)", most, fallback=None)
    fallback = table.number("fallback", 1.0, positive=True)
    table.done()
    if after is None or most is None:
        return None
    return Hedge(after=after, max=most, fallback=fallback)


def _capabilities(data: Any, path: str, problems: Problems, client: Any) -> Capabilities:
    """``[providers.capabilities]``: each key overrides the client kind's default."""
    table = Table(data, path, problems)
    default = getattr(client, "default_capabilities", None)
    if not isinstance(default, Capabilities):
        default = Capabilities()
    values: dict[str, Any] = {}
    for name in CAPABILITY_FLAGS:
        value = table.flag(name, None)
        if value is not None:
            values[name] = value
    limit = table.integer("max_context_tokens", None, minimum=1)
    if limit is not None:
        values["max_context_tokens"] = limit
    table.done()
    return attrs.evolve(default, **values, configured=frozenset(values))


def _budgets(table: Table) -> Budgets:
    d = Budgets()
    budgets = Budgets(
        connect=table.number("connect", d.connect, positive=True),
        first_token=table.number("first_token", d.first_token, positive=True),
        idle=table.number("idle", d.idle, positive=True),
        attempt=table.number("attempt", d.attempt, positive=True),
        queue=table.number("queue", d.queue, positive=True),
    )
    table.done()
    return budgets


CATEGORY_NAMES = [c.value for c in Category]


def _categories(table: Table, key: str) -> list[Category]:
    categories = []
    for i, name in enumerate(table.strings(key)):
        if name in CATEGORY_NAMES:
            categories.append(Category(name))
        else:
            expected = f"a category ({', '.join(CATEGORY_NAMES)})"
            hint = nearest(name, CATEGORY_NAMES)
            table.mistake(f"{table.at(key)}[{i}]", expected, name, fallback=None, hint=hint)
    return categories


def _match(table: Table) -> Match:
    categories = _categories(table, "categories")
    codes = table.strings("codes")
    statuses = []
    for i, status in enumerate(table.items("statuses", [])):
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            table.mistake(
                f"{table.at('statuses')}[{i}]", "an HTTP status (100-599)", status, fallback=None
            )
        else:
            statuses.append(status)
    keywords = table.strings("keywords")
    table.done()
    return Match(categories=categories, codes=codes, statuses=statuses, keywords=keywords)


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
            action = actions_table.choice(category, ["next", "stop"], None)
            if action is not None:
                actions[Category(category)] = FailoverAction(action)
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
        probe_interval=h.number("probe_interval", dh.probe_interval, positive=True),
        probe_timeout=h.number("probe_timeout", dh.probe_timeout, positive=True),
        restart_cool_off=h.number("restart_cool_off", dh.restart_cool_off, positive=True),
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
        ),
        keep_text=s.integer("keep_text", StreamPolicy().keep_text, minimum=0),
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
