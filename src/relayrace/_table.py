"""``Table``: a view of one table of plain config data (a TOML table, a dict) that knows its
path in the file and reports every mistake as a ``ConfigError`` naming that path."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._errors import ConfigError


class Table:
    """A view of one table of plain config data that knows its path and reports mistakes.

    Each getter removes the key it reads; ``done()`` then reports any key nobody read.
    """

    def __init__(self, data: Any, path: str):
        if not isinstance(data, Mapping):
            raise ConfigError(path, "a table", data)
        self._data = dict(data)
        self.path = path

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str, default: Any = None) -> Any:
        return self._data.pop(key, default)

    def text(self, key: str, default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(self._at(key), "a non-empty string", value)
        return value

    def flag(self, key: str, default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if not isinstance(value, bool) and not (value is default and default is not attrs.NOTHING):
            raise ConfigError(self._at(key), "true or false", value)
        return value

    def integer(self, key: str, default: Any = attrs.NOTHING, *, minimum: int = 0) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(self._at(key), f"an integer ≥ {minimum}", value)
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
            raise ConfigError(self._at(key), what, value)
        return float(value)

    def choice(self, key: str, choices: Sequence[str], default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if value not in choices:
            raise ConfigError(self._at(key), f"one of {', '.join(choices)}", value)
        return value

    def items(self, key: str, default: Any = attrs.NOTHING) -> Any:
        value = self._required(key, default)
        if value is default and default is not attrs.NOTHING:
            return value
        if not isinstance(value, list):
            raise ConfigError(self._at(key), "a list", value)
        return value

    def strings(self, key: str) -> list[str]:
        values = self.items(key, [])
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{self._at(key)}[{i}]", "a non-empty string", v)
        return list(values)

    def table(self, key: str) -> Table:
        return Table(self._data.pop(key, {}), self._at(key))

    def env(self, key: str) -> str | None:
        """Read ``key`` as the NAME of an environment variable and return its value."""
        name = self.text(key, None)
        if name is None:
            return None
        value = os.environ.get(name)
        if not value:
            raise ConfigError(
                self._at(key), f"the environment variable {name} to be set", show_got=False
            )
        return value

    def done(self) -> None:
        if self._data:
            key = sorted(self._data)[0]
            raise ConfigError(self._at(key), "no such key here", self._data[key], show_got=False)

    def _required(self, key: str, default: Any) -> Any:
        if key in self._data:
            return self._data.pop(key)
        if default is attrs.NOTHING:
            raise ConfigError(self._at(key), "a value (this key is required)", show_got=False)
        return default
