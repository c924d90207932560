"""``Table``: a view of one table of plain config data (a TOML table, a dict) that knows its
path in the file and reports every mistake as a ``ConfigError`` naming that path.

A table either raises at its first mistake, or, given a ``Problems`` collector (as the loader
gives it), records the mistake there and goes on with the key's default, so that one reading
of a file finds every mistake in it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._errors import ConfigError, raise_config_errors

#: What an environment variable's name may look like (POSIX).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@attrs.define
class Problems:
    """The mistakes found while reading one configuration.

    Attributes:
        errors: one ``ConfigError`` per mistake, in the order found.
        unset_env: ``(key path, variable name)`` for each environment variable a key names
            and the environment does not set; reported together, as one mistake.
        read_env: ``False``: environment variables are not read (their names are still
            checked for shape), as ``relayrace check --no-env`` does.
    """

    errors: list[ConfigError] = attrs.Factory(list)
    unset_env: list[tuple[str, str]] = attrs.Factory(list)
    read_env: bool = True

    def add(self, error: ConfigError) -> None:
        self.errors.extend(error.problems)

    def all(self) -> list[ConfigError]:
        """Every mistake, the unset environment variables last, as one."""
        if not self.unset_env:
            return list(self.errors)
        if len(self.unset_env) == 1:
            ((path, name),) = self.unset_env
            env = ConfigError(path, f"the environment variable {name} to be set", show_got=False)
        else:
            paths: dict[str, list[str]] = {}
            for path, name in self.unset_env:
                paths.setdefault(name, []).append(path)
            listed = ", ".join(f"{name} ({', '.join(at)})" for name, at in paths.items())
            env = ConfigError("environment", f"the variables {listed} to be set", show_got=False)
        return [*self.errors, env]

    def raise_if_any(self) -> None:
        """Raises: ``ConfigError`` for one mistake, ``ConfigErrors`` for several."""
        raise_config_errors(self.all())


class Table:
    """A view of one table of plain config data that knows its path and reports mistakes.

    Each getter removes the key it reads; ``done()`` then reports any key nobody read, with the
    nearest key that was read (``did you mean 'max_concurrency'?``).

    Args:
        data: the table's contents.
        path: its path in the file (``providers[0]``; ``""`` for the root).
        problems: where to record mistakes; ``None`` raises at the first one. A key that is
            required, or a table that is not one, raises in either case (there is nothing to
            go on with): whoever reads the enclosing unit records it and moves to the next.

    Raises:
        ConfigError: ``data`` is not a table.
    """

    def __init__(self, data: Any, path: str, problems: Problems | None = None):
        if not isinstance(data, Mapping):
            raise ConfigError(path, "a table", data)
        self._data = dict(data)
        self._asked: set[str] = set()
        self.path = path
        self.problems = problems

    def at(self, key: str) -> str:
        """The path of ``key`` in this table."""
        return f"{self.path}.{key}" if self.path else key

    def mistake(
        self,
        path: str,
        expected: str,
        got: Any = None,
        *,
        fallback: Any = attrs.NOTHING,
        show_got: bool = True,
        hint: str | None = None,
    ) -> Any:
        """Report a mistake at ``path``: raise it, or record it and return ``fallback``.

        Raises:
            ConfigError: without a ``Problems`` collector, or without a ``fallback``.
        """
        error = ConfigError(path, expected, got, show_got=show_got, hint=hint)
        if self.problems is None or fallback is attrs.NOTHING:
            raise error
        self.problems.add(error)
        return fallback

    def has(self, key: str) -> bool:
        self._asked.add(key)
        return key in self._data

    def raw(self, key: str, default: Any = None) -> Any:
        self._asked.add(key)
        return self._data.pop(key, default)

    def text(self, key: str, default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if not isinstance(value, str) or not value:
            return self.mistake(self.at(key), "a non-empty string", value, fallback=default)
        return value

    def flag(self, key: str, default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if not isinstance(value, bool) and not (value is default and default is not attrs.NOTHING):
            return self.mistake(self.at(key), "true or false", value, fallback=default)
        return value

    def integer(self, key: str, default: Any = attrs.NOTHING, *, minimum: int = 0) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return self.mistake(self.at(key), f"an integer ≥ {minimum}", value, fallback=default)
        return value

    def number(
        self,
        key: str,
        default: Any = attrs.NOTHING,
        *,
        minimum: float = 0.0,
        positive: bool = False,
        maximum: float = math.inf,
    ) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < minimum
            or (positive and value <= 0)
            or value > maximum
        ):
            what = "a positive number" if positive else f"a number ≥ {minimum}"
            if maximum != math.inf:
                what += f" and ≤ {maximum}"
            return self.mistake(self.at(key), what, value, fallback=default)
        return float(value)

    def choice(self, key: str, choices: Sequence[str], default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if value not in choices:
            return self.mistake(
                self.at(key),
                f"one of {', '.join(choices)}",
                value,
                fallback=default,
                hint=nearest(value, choices),
            )
        return value

    def items(self, key: str, default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if not isinstance(value, list):
            return self.mistake(self.at(key), "a list", value, fallback=default)
        return value

    def strings(self, key: str) -> list[str]:
        """A list of non-empty strings (the bad ones are reported and left out)."""
        values = []
        for i, v in enumerate(self.items(key, [])):
            if not isinstance(v, str) or not v:
                self.mistake(f"{self.at(key)}[{i}]", "a non-empty string", v, fallback=None)
            else:
                values.append(v)
        return values

    def table(self, key: str) -> Table:
        self._asked.add(key)
        value = self._data.pop(key, {})
        if not isinstance(value, Mapping):
            value = self.mistake(self.at(key), "a table", value, fallback={})
        return Table(value, self.at(key), self.problems)

    def env(self, key: str) -> str | None:
        """Read ``key`` as the NAME of an environment variable and return its value."""
        name = self.text(key, None)
        if name is None:
            return None
        return self.lookup_env(self.at(key), name)

    def lookup_env(self, path: str, name: str) -> str | None:
        """The value of the environment variable ``name`` that the key at ``path`` names.

        Without it, or when the ``Problems`` say not to read the environment, ``None``; an
        unset variable is recorded in ``Problems.unset_env`` (raised without a collector).
        """
        if not ENV_NAME.fullmatch(name):
            expected = "the name of an environment variable (letters, digits, _)"
            return self.mistake(path, expected, name, fallback=None)
        if self.problems is not None and not self.problems.read_env:
            return None
        value = os.environ.get(name)
        if value:
            return value
        if self.problems is None:
            raise ConfigError(path, f"the environment variable {name} to be set", show_got=False)
        self.problems.unset_env.append((path, name))
        return None

    def done(self) -> None:
        """Report every key nobody read (with the nearest key that was read, if one is close)."""
        for key in sorted(self._data):
            self.mistake(
                self.at(key),
                "no such key here",
                show_got=False,
                fallback=None,
                hint=nearest(key, self._asked),
            )
        self._data.clear()

    def _required(self, key: str, default: Any) -> Any:
        self._asked.add(key)
        if key in self._data:
            return self._data.pop(key)
        if default is attrs.NOTHING:
            raise ConfigError(self.at(key), "a value (this key is required)", show_got=False)
        return default


def nearest(word: Any, known: Sequence[str] | set[str]) -> str | None:
    """The known word closest to a misspelt one, if one is close enough."""
    if not isinstance(word, str):
        return None
    matches = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.75)
    return matches[0] if matches else None
