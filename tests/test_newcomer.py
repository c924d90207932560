"""The first ten minutes: ``relayrace init`` writes a config that checks clean, and every
command's help ends with examples."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relayrace import Budgets, Policies, read_gateway
from relayrace._cli import main
from relayrace._starter import STARTER_KINDS, starter_config
from relayrace.server import ServerSettings

KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}
COMBINATIONS = [
    list(kinds)
    for n in range(1, len(STARTER_KINDS) + 1)
    for kinds in itertools.combinations(STARTER_KINDS, n)
]
RELAYRACE = str(Path(sys.executable).with_name("relayrace"))


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEYS.values():
        monkeypatch.setenv(name, f"sk-test-{name.lower()}")


def _load(text: str, tmp_path: Path):
    path = tmp_path / "relayrace.toml"
    path.write_text(text)
    return read_gateway(path)


@pytest.mark.parametrize("kinds", COMBINATIONS, ids="+".join)
def test_the_starter_config_loads_for_every_combination_of_kinds(
    kinds: list[str], keys: None, tmp_path: Path
) -> None:
    text = starter_config(kinds)
    gateway = _load(text, tmp_path)
    names = [p.name for p in gateway.config.providers]
    assert names == kinds
    assert [p.priority for p in gateway.config.providers] == list(range(len(kinds)))
    [route] = gateway.config.routes
    assert (route.model, list(route.chain)) == ("chat", kinds)
    assert gateway.server == ServerSettings()
    for kind in kinds:
        if kind in KEYS:
            assert f'api_key_env = "{KEYS[kind]}"' in text
            assert KEYS[kind] in text.splitlines()[6]  # "Set before checking or serving: …"
    if "mock" in kinds:  # the mock needs no key
        assert "api_key_env" not in text.split('kind = "mock"')[1].split("\n\n")[0]


def test_a_kind_named_twice_gets_a_second_name(keys: None, tmp_path: Path) -> None:
    gateway = _load(starter_config(["openai", "openai", "mock"]), tmp_path)
    assert [p.name for p in gateway.config.providers] == ["openai", "openai-2", "mock"]


#: Lines the starter shows commented that are advice, not defaults (these have none).
ADVICE = ("tokens_env", "admin_tokens_env", "metrics_port")


def test_every_default_shown_commented_is_the_real_default(keys: None, tmp_path: Path) -> None:
    # Uncomment every "# key = value" line and every "# [policies.x]" header (the ADVICE
    # aside): nothing may change.
    starter = starter_config(list(STARTER_KINDS))
    lines = []
    for line in starter.splitlines():
        match = re.fullmatch(r"# (\[policies\.\w+\]|\w+ = .*)", line)
        if match and not match.group(1).startswith(ADVICE):
            line = match.group(1)
        lines.append(line)
    text = "\n".join(lines)
    assert sum(line.startswith("[policies.") for line in lines) == 5
    assert "# budgets" not in text and "# probe = " not in text
    for key in ("probe_interval", "restart_cool_off", "keep_text", "log_format", "queue"):
        assert f"\n{key} = " in text or f" {key} = " in text, key
    gateway = _load(text, tmp_path)
    assert gateway.config.policies == Policies()
    assert gateway.server == ServerSettings()
    for provider in gateway.config.providers:
        assert provider.budgets == Budgets()
        assert (provider.max_concurrency, provider.inbox_size) == (64, 256)
    (tmp_path / "as-written").mkdir()
    written = _load(starter, tmp_path / "as-written").config.providers
    probes = [p.client.probe_mode for p in gateway.config.providers]
    assert probes == [p.client.probe_mode for p in written]


def test_the_starters_advice_loads_when_uncommented(
    keys: None, tmp_path: Path, monkeypatch
) -> None:
    for name in ("RELAYRACE_TOKEN", "RELAYRACE_ADMIN_TOKEN"):
        monkeypatch.setenv(name, f"token-{name.lower()}")
    advice = "|".join(ADVICE)
    text = re.sub(rf"^# ((?:{advice}) = )", r"\1", starter_config(["openai"]), flags=re.M)
    server = _load(text, tmp_path).server
    assert server.metrics_port is not None and server.tokens and server.admin_tokens


def test_an_unknown_kind_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["init", "--provider", "openia"])
    assert exc.value.code == 2
    assert "invalid choice: 'openia'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one"):
        starter_config([])


def test_init_then_check_as_a_newcomer_types_them(tmp_path: Path) -> None:
    # relayrace init --provider openai --provider anthropic > relayrace.toml
    # relayrace check relayrace.toml
    init = subprocess.run(
        [RELAYRACE, "init", "--provider", "openai", "--provider", "anthropic"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert init.stdout.startswith(
        "# relayrace config, written by `relayrace init --provider openai --provider anthropic`."
    )
    (tmp_path / "relayrace.toml").write_text(init.stdout)
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-1", "ANTHROPIC_API_KEY": "sk-2"}
    check = subprocess.run(
        [RELAYRACE, "check", "relayrace.toml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert (check.returncode, check.stderr) == (0, "")
    assert "relayrace.toml: ok" in check.stdout
    assert "chat → openai > anthropic" in check.stdout
    assert "sk-1" not in check.stdout
    # Without its key the same file is refused, naming the variable.
    del env["ANTHROPIC_API_KEY"]
    check = subprocess.run(
        [RELAYRACE, "check", "relayrace.toml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert check.returncode == 2 and "ANTHROPIC_API_KEY" in check.stderr


def test_init_piped_into_check_as_the_readme_shows() -> None:
    # relayrace init -p openai -p anthropic -p gemini | relayrace check --no-env -
    pipeline = subprocess.run(
        f"{RELAYRACE} init -p openai -p anthropic -p gemini | {RELAYRACE} check --no-env -",
        shell=True,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert (pipeline.returncode, pipeline.stderr) == (0, "")
    assert "chat → openai > anthropic > gemini" in pipeline.stdout
    # Without --no-env every missing variable is named, in one report.
    pipeline = subprocess.run(
        f"{RELAYRACE} init -p openai -p anthropic -p gemini | {RELAYRACE} check -",
        shell=True,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert pipeline.returncode == 2
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        assert name in pipeline.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["init"], ["serve"], ["check"]])
def test_help_ends_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    examples = help_text.split("\nexamples:\n")[1].strip("\n").splitlines()
    assert 2 <= len(examples) <= 3
    assert all(line.startswith("  relayrace ") for line in examples)
    if command:
        assert all(line.split()[1] == command[0] for line in examples)


@pytest.mark.parametrize("command", ["mock-provider", "bench"])
def test_the_commands_that_parse_their_own_arguments_have_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"relayrace {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--help"], ["demo", "--seed", "x"]])
def test_demo_arguments(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr()
    if "--help" in argv:
        assert "relayrace demo --seed 7" in out.out
    else:
        assert "--seed: invalid int value" in out.err
