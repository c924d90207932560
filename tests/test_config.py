"""Config from a dict: every mistake names its key and what was expected."""

from __future__ import annotations

import copy

import pytest

import relayrace
from relayrace import (
    AllBenched,
    Category,
    Config,
    ConfigError,
    FailoverAction,
    MidStream,
    ProviderConfig,
    Route,
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
            "budgets": {"first_token": 2.5},
            "script": [{"do": "fail", "category": "rate_limit", "retry_after": 1}],
        },
        {"name": "b", "kind": "scripted", "terminus": True, "script": [{"do": "answer"}]},
    ],
    "routes": [{"model": "chat", "chain": ["a", "b"], "strategy": "round_robin"}],
    "policies": {
        "retry": {"max_attempts": 3, "deny": {"statuses": [429]}},
        "failover": {"actions": {"timeout": "stop"}, "total_budget": 60},
        "health": {"failure_threshold": 5, "when_all_benched": "terminus"},
        "stream": {"mid_stream": "restart"},
        "hard_stop": {"keywords": ["Billing"]},
    },
}


def test_a_good_config_reads_every_section() -> None:
    cfg = Config.from_dict(GOOD)
    a, b = cfg.providers
    assert (a.name, a.priority, a.max_concurrency, a.budgets.first_token) == ("a", 1, 4, 2.5)
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
        (["policies", "colour"], {}, "policies.colour: expected no such key here"),
        (["seed"], -1, "seed: expected an integer ≥ 0"),
    ],
)
def test_every_mistake_names_its_key(path, value, message) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(broken(path, value))
    assert message in str(info.value)


def test_duplicate_provider_names_are_refused() -> None:
    data = broken(["providers", 1, "name"], "a")
    with pytest.raises(ConfigError, match="providers"):
        Config.from_dict(data)


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
    ]:
        assert name in relayrace.__all__, name
        assert getattr(relayrace, name) is not None
    assert issubclass(relayrace.ConfigError, relayrace.RelayraceError)
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
    cfg = Config.from_toml(path)
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
        Config.from_toml(path)
    with pytest.raises(ConfigError, match="missing.toml: expected a readable TOML file"):
        Config.from_toml(tmp_path / "missing.toml")


def test_toml_mistakes_name_the_key(tmp_path) -> None:
    path = tmp_path / "relayrace.toml"
    path.write_text(GOOD_TOML.replace("max_attempts = 1", 'max_attempts = "one"'))
    with pytest.raises(ConfigError, match=r"policies\.retry\.max_attempts: expected an integer"):
        Config.from_toml(path)
