"""The README's config reference cannot fall behind the loader: every key the loader reads, in
every table, has a row in the README's "Config file" reference table, and every row names a key
the loader reads.

The loader's keys are recorded, not listed by hand: each ``Table`` getter that reads a key
(``text``, ``integer``, ``table``, ...) is wrapped to note the table's path and the key while a
config with every kind of provider and table loads. A key added to the loader, a client or a
policy appears here without anyone remembering it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import relayrace
from relayrace._table import Table

README = Path(__file__).resolve().parent.parent / "README.md"

#: Where the README's reference table calls the root of the file.
TOP_LEVEL = "(top level)"

#: A config with one provider of each kind and every table the loader reads.
EVERY_TABLE: dict[str, Any] = {
    "server": {},
    "providers": [
        {"name": "o", "kind": "openai", "budgets": {}, "capabilities": {}},
        {"name": "a", "kind": "anthropic"},
        {"name": "g", "kind": "gemini"},
        {"name": "m", "kind": "mock"},
        {"name": "s", "kind": "scripted"},
    ],
    "routes": [{"model": "chat", "chain": ["o", "a", "g", "m", "s"]}],
}


def _section(path: str) -> str:
    """The TOML header of the table at a loader path: ``providers[0].budgets`` →
    ``[providers.budgets]``, ``providers[0]`` → ``[[providers]]``, ``""`` → top level."""
    if not path:
        return TOP_LEVEL
    name = re.sub(r"\[\d+\]", "", path)
    return f"[[{name}]]" if path.endswith("]") else f"[{name}]"


def _loader_keys(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """``(section, key)`` for every key the loader reads from ``EVERY_TABLE``, a key that is
    itself a table left to its own section's rows."""
    read: set[tuple[str, str]] = set()
    tables: set[str] = set()
    original_init = Table.__init__

    def init(self: Table, data: Any, path: str, *args: Any, **kwargs: Any) -> None:
        tables.add(re.sub(r"\[\d+\]", "", path))
        original_init(self, data, path, *args, **kwargs)

    monkeypatch.setattr(Table, "__init__", init)
    for name, method in inspect.getmembers(Table, inspect.isfunction):
        params = list(inspect.signature(method).parameters)
        if name.startswith("_") or name == "at" or params[1:2] != ["key"]:
            continue

        def recording(self: Table, key: str, *args: Any, _method: Any = method, **kw: Any) -> Any:
            read.add((self.path, key))
            return _method(self, key, *args, **kw)

        monkeypatch.setattr(Table, name, recording)
    relayrace.load_gateway(EVERY_TABLE, env=False)
    monkeypatch.undo()
    keys = set()
    for path, key in read:
        if ".script[" in path:
            continue  # the scripted test double's steps: documented with ScriptedClient
        plain = re.sub(r"\[\d+\]", "", path)
        if (f"{plain}.{key}" if plain else key) in tables:
            continue  # a sub-table: its own section
        keys.add((_section(path), key))
    return keys


def _config_file_section() -> str:
    text = README.read_text()
    start = text.index("\n## Config file\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _documented_keys() -> set[tuple[str, str]]:
    """``(section, key)`` for each row of the reference table (a cell may name several)."""
    keys = set()
    in_table = False
    for line in _config_file_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| section | key |"):
            in_table = True
            continue
        if not in_table or not line.startswith("|"):
            in_table = in_table and line.startswith("|")
            continue
        if set(cells[0]) <= {"-", ":"}:
            continue
        sections = re.findall(r"`([^`]+)`", cells[0]) or [cells[0]]
        for section in sections:
            for key in re.findall(r"`([^`]+)`", cells[1]):
                keys.add((section, key))
    return keys


def test_the_recording_sees_the_loaders_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check below would pass vacuously if nothing were recorded.
    keys = _loader_keys(monkeypatch)
    for expected in [
        ("[server]", "tokens_env"),
        ("[[providers]]", "transport"),
        ("[[providers]]", "max_tokens"),
        ("[providers.budgets]", "queue"),
        ("[providers.capabilities]", "tools"),
        ("[policies.health]", "probe_interval"),
        ("[policies.failover.actions]", "timeout"),
        ("[[routes]]", "chain"),
        (TOP_LEVEL, "seed"),
    ]:
        assert expected in keys
    assert ("[[providers]]", "budgets") not in keys  # a sub-table, with rows of its own


def test_every_key_the_loader_reads_is_in_the_readme(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = _loader_keys(monkeypatch) - _documented_keys()
    assert not missing, "keys missing from the README's config reference: " + ", ".join(
        f"{section} {key}" for section, key in sorted(missing)
    )


def test_every_key_in_the_readme_is_one_the_loader_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    stale = _documented_keys() - _loader_keys(monkeypatch)
    assert not stale, "keys in the README's config reference the loader does not read: " + (
        ", ".join(f"{section} {key}" for section, key in sorted(stale))
    )


def test_the_examples_commented_lines_are_valid_when_uncommented(tmp_path: Path) -> None:
    # A line the example shows commented out is one an operator may uncomment as it stands.
    example = README.parent / "examples" / "relayrace.toml"
    text = example.read_text()
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    assert uncommented.count("\n") == text.count("\n") and uncommented != text
    path = tmp_path / "relayrace.toml"
    path.write_text(uncommented)
    relayrace.read_gateway(path, env=False)
