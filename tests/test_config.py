"""Config from a dict: every mistake names its key and what was expected."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relayrace
from relayrace import (
    AllBenched,
    Budgets,
    Category,
    Config,
    ConfigError,
    ConfigErrors,
    FailoverAction,
    MidStream,
    ProviderConfig,
    Route,
    load_config,
    read_config,
)
from relayrace.testing import Answer, Fail, ScriptedClient

GOOD = {
    "seed": 7,
    "providers": [
        {
            "name": "a",
            "kind": "scripted",
            "priority": 1,
            "max_concurrency": 4,
            "budgets": {"first_token": 2.5, "queue": 4},
            "script": [{"do": "fail", "category": "rate_limit", "retry_after": 1}],
        },
        {"name": "b", "kind": "scripted", "terminus": True, "script": [{"do": "answer"}]},
    ],
    "routes": [{"model": "chat", "chain": ["a", "b"], "strategy": "round_robin"}],
    "policies": {
        "retry": {"max_attempts": 3, "deny": {"statuses": [429]}},
        "failover": {"actions": {"timeout": "stop"}, "total_budget": 60},
        "health": {"failure_threshold": 5, "when_all_benched": "terminus", "restart_cool_off": 90},
        "stream": {"mid_stream": "restart", "keep_text": 4096},
        "hard_stop": {"keywords": ["Billing"]},
    },
}


def test_a_good_config_reads_every_section() -> None:
    cfg = load_config(GOOD)
    a, b = cfg.providers
    assert (a.name, a.priority, a.max_concurrency, a.budgets.first_token) == ("a", 1, 4, 2.5)
    assert a.budgets.queue == 4.0 and b.budgets.queue == Budgets().queue == 10.0
    assert isinstance(a.client, ScriptedClient)
    assert a.client.script == [Fail(category=Category.RATE_LIMIT, retry_after=1.0)]
    assert b.terminus and b.client.script == [Answer()]
    assert cfg.routes == (Route(model="chat", chain=("a", "b"), strategy="round_robin"),)
    p = cfg.policies
    assert p.retry.max_attempts == 3 and p.retry.deny.statuses == frozenset({429})
    assert p.failover.actions[Category.TIMEOUT] is FailoverAction.STOP
    assert p.failover.total_budget == 60.0
    assert p.health.failure_threshold == 5
    assert p.health.when_all_benched is AllBenched.TERMINUS
    assert p.stream.mid_stream is MidStream.RESTART
    assert p.stream.keep_text == 4096 and p.health.restart_cool_off == 90.0
    assert p.hard_stop.keywords == ("billing",)
    assert cfg.seed == 7


def broken(path: list, value: object) -> dict:
    data = copy.deepcopy(GOOD)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["providers"], KeyError, "providers: expected a value (this key is required)"),
        (["providers"], "a", "providers: expected a list, got str 'a'"),
        (["providers", 0, "name"], KeyError, "providers[0].name: expected a value"),
        (["providers", 0, "name"], "", "providers[0].name: expected a non-empty string"),
        (["providers", 0, "kind"], "nope", "providers[0].kind: expected one of"),
        (["providers", 0, "priority"], "high", "providers[0].priority: expected an integer"),
        (["providers", 0, "max_concurrency"], 0, "providers[0].max_concurrency: expected an integer ≥ 1"),
        (["providers", 0, "weight"], -1, "providers[0].weight: expected a positive number"),
        (["providers", 0, "exempt"], "yes", "providers[0].exempt: expected true or false"),
        (["providers", 0, "budgets", "first_token"], 0, "providers[0].budgets.first_token"),
        (["providers", 0, "budgets", "ttft"], 1, "providers[0].budgets.ttft: expected no such key"),
        (["providers", 0, "colour"], "red", "providers[0].colour: expected no such key here"),
        (["providers", 0, "script", 0, "category"], "oops", "providers[0].script[0].category"),
        (["routes", 0, "chain", 1], "ghost", "routes[0].chain"),
        (["routes", 0, "strategy"], "fastest", "routes[0].strategy: expected one of"),
        (["policies", "retry", "max_attempts"], 0, "policies.retry.max_attempts"),
        (["policies", "retry", "deny", "categories"], ["nope"], "policies.retry.deny.categories[0]"),
        (["policies", "failover", "actions", "timeout"], "maybe", "policies.failover.actions.timeout"),
        (["policies", "failover", "actions", "teapot"], "next", "policies.failover.actions.teapot"),
        (["policies", "health", "max_benched_share"], 2, "policies.health.max_benched_share"),
        (["policies", "stream", "mid_stream"], "resume", "policies.stream.mid_stream"),
        (["policies", "stream", "keep_text"], -1, "policies.stream.keep_text: expected an integer ≥ 0"),
        (["policies", "health", "restart_cool_off"], 0, "policies.health.restart_cool_off"),
        (["providers", 0, "budgets", "queue"], 0, "providers[0].budgets.queue"),
        (["policies", "colour"], {}, "policies.colour: expected no such key here"),
        (["seed"], -1, "seed: expected an integer ≥ 0"),
    ],
)
def test_every_mistake_names_its_key(path, value, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(broken(path, value))
    assert message in str(info.value)


def test_duplicate_provider_names_are_refused() -> None:
    data = broken(["providers", 1, "name"], "a")
    with pytest.raises(ConfigError, match="providers"):
        load_config(data)


def test_config_in_code_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="routes"):
        Config(
            providers=[ProviderConfig(name="a", client=ScriptedClient())],
            routes=[Route(model="m", chain=["a", "b"])],
        )
    with pytest.raises(ConfigError):
        Config(providers=[])


def test_the_public_api_is_exported() -> None:
    for name in [
        "Request",
        "Reply",
        "Delta",
        "open_supervisor",
        "Supervisor",
        "RelayraceError",
        "BadRequest",
        "RequestFailed",
        "ConfigError",
        "Category",
        "Failure",
        "classify",
        "Config",
        "ProviderConfig",
        "Route",
        "Policies",
        "HealthSnapshot",
        "ConfigErrors",
        "load_config",
        "read_config",
        "load_gateway",
        "read_gateway",
        "GatewayConfig",
    ]:
        assert name in relayrace.__all__, name
        assert getattr(relayrace, name) is not None
    assert issubclass(relayrace.ConfigError, relayrace.RelayraceError)
    assert issubclass(relayrace.ConfigErrors, relayrace.ConfigError)
    assert relayrace.__all__ == sorted(relayrace.__all__)
    assert issubclass(relayrace.BadRequest, relayrace.RelayraceError)
    assert issubclass(relayrace.RequestFailed, relayrace.RelayraceError)


GOOD_TOML = """
seed = 3

[[providers]]
name = "a"
kind = "scripted"
priority = 0
script = [{ do = "fail", category = "provider_5xx", status = 503 }]

[[providers]]
name = "b"
kind = "scripted"
budgets = { first_token = 4.0 }

[[routes]]
model = "chat"
chain = ["a", "b"]

[policies.retry]
max_attempts = 1

[server]
http_port = 8080
"""


async def test_a_toml_file_builds_a_working_supervisor(tmp_path, autojump_clock) -> None:
    path = tmp_path / "relayrace.toml"
    path.write_text(GOOD_TOML)
    cfg = read_config(path)
    assert [p.name for p in cfg.providers] == ["a", "b"]
    assert cfg.providers[1].budgets.first_token == 4.0
    async with relayrace.open_supervisor(cfg) as sup:
        reply = await sup.complete(relayrace.Request("chat", [{"role": "user", "content": "x"}]))
    assert reply.provider == "b"
    assert [a.actor for a in reply.attempts] == ["a", "b"]


def test_toml_syntax_errors_and_missing_files_are_config_errors(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[providers]]\nname = "a\n')
    with pytest.raises(ConfigError, match=r"bad.toml: expected valid TOML: .*line 2"):
        read_config(path)
    with pytest.raises(ConfigError, match="missing.toml: expected a readable TOML file"):
        read_config(tmp_path / "missing.toml")


def test_toml_mistakes_name_the_key(tmp_path) -> None:
    path = tmp_path / "relayrace.toml"
    path.write_text(GOOD_TOML.replace("max_attempts = 1", 'max_attempts = "one"'))
    with pytest.raises(ConfigError, match=r"policies\.retry\.max_attempts: expected an integer"):
        read_config(path)


# --- every mistake at once ---------------------------------------------------------------------

#: Independent mistakes in GOOD: (where, value, the path the problem names).
MISTAKES = [
    (["providers", 0, "priority"], "high", "providers[0].priority"),
    (["providers", 0, "max_concurency"], 4, "providers[0].max_concurency"),
    (["providers", 0, "budgets", "ttft"], 1, "providers[0].budgets.ttft"),
    (["providers", 1, "weight"], -1, "providers[1].weight"),
    (["providers", 1, "exempt"], "yes", "providers[1].exempt"),
    (["providers", 1, "script", 0, "chunks"], 0, "providers[1].script[0].chunks"),
    (["routes", 0, "strategy"], "fastest", "routes[0].strategy"),
    (["routes", 0, "chain", 1], "ghost", "routes[0].chain[1]"),
    (["policies", "retry", "max_attempts"], 0, "policies.retry.max_attempts"),
    (["policies", "retry", "deny", "categories"], ["nope"], "policies.retry.deny.categories[0]"),
    (["policies", "failover", "actions", "timeout"], "maybe", "policies.failover.actions.timeout"),
    (["policies", "health", "max_benched_share"], 2, "policies.health.max_benched_share"),
    (["policies", "stream", "mid_stream"], "resume", "policies.stream.mid_stream"),
    (["policies", "colour"], {}, "policies.colour"),
    (["seed"], -1, "seed"),
]


def with_mistakes(chosen: list[int]) -> dict:
    data = copy.deepcopy(GOOD)
    for i in chosen:
        path, value, _ = MISTAKES[i]
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return data


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(range(len(MISTAKES)))))
def test_k_independent_mistakes_report_k_problems(chosen: set[int]) -> None:
    data = with_mistakes(sorted(chosen))
    if not chosen:
        load_config(data)
        return
    with pytest.raises(ConfigError) as info:
        load_config(data)
    problems = info.value.problems
    assert sorted(p.path for p in problems) == sorted(MISTAKES[i][2] for i in chosen)
    assert isinstance(info.value, ConfigErrors) == (len(chosen) > 1)
    assert str(info.value).splitlines() == [str(p) for p in problems]


def test_a_misspelt_key_gets_the_nearest_known_key() -> None:
    data = broken(["providers", 0, "max_concurency"], 4)
    data["policies"]["health"]["failure_treshold"] = data["policies"]["health"].pop(
        "failure_threshold"
    )
    data["providers"][1]["kind"] = "scriptd"
    with pytest.raises(ConfigErrors) as info:
        load_config(data)
    assert [str(p) for p in info.value.problems] == [
        "providers[0].max_concurency: expected no such key here (did you mean 'max_concurrency'?)",
        "providers[1].kind: expected one of anthropic, gemini, mock, openai, scripted, "
        "got str 'scriptd' (did you mean 'scripted'?)",
        "policies.health.failure_treshold: expected no such key here "
        "(did you mean 'failure_threshold'?)",
    ]


def test_a_provider_with_a_bad_kind_still_counts_for_the_routes() -> None:
    # Its name is known: the route naming it is not a second mistake.
    with pytest.raises(ConfigError) as info:
        load_config(broken(["providers", 1, "kind"], "nope"))
    assert [p.path for p in info.value.problems] == ["providers[1].kind"]


def test_unset_environment_variables_are_one_problem_listing_them_all(monkeypatch) -> None:
    for name in ("RR_KEY_A", "RR_KEY_B"):
        monkeypatch.delenv(name, raising=False)
    data = {
        "providers": [
            {"name": "a", "kind": "openai", "api_key_env": "RR_KEY_A"},
            {"name": "b", "kind": "anthropic", "api_key_env": "RR_KEY_B", "priority": "x"},
            {"name": "c", "kind": "gemini", "api_key_env": "RR_KEY_A"},
        ]
    }
    with pytest.raises(ConfigErrors) as info:
        load_config(data)
    assert [str(p) for p in info.value.problems] == [
        "providers[1].priority: expected an integer ≥ -1000000, got str 'x'",
        "environment: expected the variables RR_KEY_A (providers[0].api_key_env, "
        "providers[2].api_key_env), RR_KEY_B (providers[1].api_key_env) to be set",
    ]
    monkeypatch.setenv("RR_KEY_A", "sk-secret-a")
    del data["providers"][1]["priority"]
    with pytest.raises(ConfigError) as one:
        load_config(data)
    assert str(one.value) == (
        "providers[1].api_key_env: expected the environment variable RR_KEY_B to be set"
    )
    assert "sk-secret-a" not in str(one.value)


def test_without_the_environment_only_the_names_are_checked(monkeypatch) -> None:
    monkeypatch.delenv("RR_KEY_A", raising=False)
    data = {"providers": [{"name": "a", "kind": "openai", "api_key_env": "RR_KEY_A"}]}
    assert load_config(data, env=False).providers[0].name == "a"
    data["providers"][0]["api_key_env"] = "sk-pasted-the-key-itself"
    with pytest.raises(ConfigError, match=r"providers\[0\]\.api_key_env: expected the name of an"):
        load_config(data, env=False)


def test_config_in_code_reports_every_mistake() -> None:
    with pytest.raises(ConfigErrors) as info:
        Config(
            providers=[
                ProviderConfig(name="a", client=ScriptedClient(), max_concurrency=0),
                ProviderConfig(name="a", client=object()),
            ],
            routes=[Route(model="m", chain=["a", "ghost"], strategy="fastest")],
        )
    assert [p.path for p in info.value.problems] == [
        "providers[0].max_concurrency",
        "providers[1].client",
        "providers[1].name",
        "routes[0].chain[1]",
        "routes[0].strategy",
    ]


def test_the_readers_refuse_a_path_where_data_belongs(tmp_path) -> None:
    with pytest.raises(TypeError, match="read_config"):
        load_config(str(tmp_path / "relayrace.toml"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read_gateway"):
        relayrace.load_gateway(tmp_path / "relayrace.toml")  # type: ignore[arg-type]


def test_the_gateway_reader_checks_the_server_table_with_the_rest(tmp_path) -> None:
    path = tmp_path / "relayrace.toml"
    path.write_text(
        GOOD_TOML.replace("http_port = 8080", "http_port = 70000\nws_prot = 1")
        .replace("max_attempts = 1", "max_attempts = 0")
    )
    with pytest.raises(ConfigErrors) as info:
        relayrace.read_gateway(path)
    assert [str(p) for p in info.value.problems] == [
        "server.http_port: expected a port from 0 to 65535, got int 70000",
        "server.ws_prot: expected no such key here (did you mean 'ws_port'?)",
        "policies.retry.max_attempts: expected an integer ≥ 1, got int 0",
    ]
    path.write_text(GOOD_TOML)
    gateway = relayrace.read_gateway(path)
    assert gateway.server.http_port == 8080
    assert [p.name for p in gateway.config.providers] == ["a", "b"]


def test_the_server_tables_connection_limits_are_read() -> None:
    gateway = relayrace.load_gateway(
        {
            "providers": [{"name": "a", "kind": "scripted"}],
            "server": {"handshake_timeout": 2.5, "max_sockets": 300},
        }
    )
    assert (gateway.server.handshake_timeout, gateway.server.max_sockets) == (2.5, 300)
    with pytest.raises(ConfigErrors) as info:
        relayrace.load_gateway(
            {
                "providers": [{"name": "a", "kind": "scripted"}],
                "server": {"handshake_timeout": 0, "max_sockets": 0},
            }
        )
    assert [p.path for p in info.value.problems] == [
        "server.handshake_timeout",
        "server.max_sockets",
    ]
