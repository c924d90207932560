"""The mock provider's scenario grammar: ``scenario,key=value,…`` (see ``_mock_provider``)."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from typing import Any

import attrs

# Scenarios that answer with an error of a kind (relayrace.providers.ERROR_KINDS), and the
# aliases with defaults.
ERROR_SCENARIOS = {
    "rate-limit": "rate_limit",
    "quota": "quota",
    "server-error": "server",
    "unavailable": "unavailable",
    "overloaded": "overloaded",
    "unauthorized": "unauthorized",
    "forbidden": "forbidden",
    "not-found": "not_found",
    "context-length": "context_length",
    "content-policy": "content_policy",
}
_OTHER_SCENARIOS = (
    "ok",
    "no-prefill",
    "reset",
    "hang",
    "cut",
    "stall",
    "malformed",
    "no-done",
    "stream-error",
    "flapping",
)
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "slow": ("ok", {"first_delay": 30.0}),
    "flaky": ("server-error", {"times": 1}),
}
SCENARIOS: tuple[str, ...] = tuple(sorted({*ERROR_SCENARIOS, *_OTHER_SCENARIOS, *_ALIASES}))


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("expected a whole number, 1 or more")
    return value


def _status(text: str) -> int:
    value = int(text)
    if not 100 <= value <= 599:
        raise ValueError("expected an HTTP status from 100 to 599")
    return value


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0 (true or false)")


# Kinds a user may pick for `error=`: the ones with a scenario of their own.
_USER_ERRORS = frozenset(ERROR_SCENARIOS.values())


def _error_kind(text: str) -> str:
    if text not in _USER_ERRORS:
        raise ValueError(f"expected one of {', '.join(sorted(_USER_ERRORS))}")
    return text


_PARAMS: dict[str, Callable[[str], Any]] = {
    "chunks": _positive,
    "delay": _seconds,
    "first_delay": _seconds,
    "head_delay": _seconds,
    "repeat": _positive,
    "times": _count,
    "status": _status,
    "retry_after": _seconds,
    "retry_after_ms": _count,
    "should_retry": _flag,
    "after": _count,
    "stall": _seconds,
    "clean": _flag,
    "error": _error_kind,
    "down": _seconds,
    "up": _seconds,
    "tag": str,
    "tools": _count,
    "reuse_index": _flag,
    "bad_args": _flag,
    "cached": _count,
    "logprobs": _flag,
    "refusal": _flag,
    "rl_remaining": _count,
    "rl_reset": _seconds,
    "rl_garbage": _flag,
}


@attrs.frozen(kw_only=True)
class MockScenario:
    """A parsed model name: the scenario and its parameters (see the module docstring)."""

    name: str
    kind: str
    chunks: int = 5
    delay: float = 0.0
    first_delay: float = 0.0
    head_delay: float = 0.0
    repeat: int = 1
    times: int | None = None
    status: int | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    should_retry: bool | None = None
    after: int = 2
    stall: float = 30.0
    clean: bool = False
    error: str = "overloaded"
    down: float = 5.0
    up: float | None = None
    tag: str | None = None
    tools: int = 0
    reuse_index: bool = False
    bad_args: bool = False
    cached: int = 0
    logprobs: bool = False
    refusal: bool = False
    rl_remaining: int | None = None
    rl_reset: float = 60.0
    rl_garbage: bool = False

    @classmethod
    def parse(cls, spec: str) -> MockScenario:
        """Parse ``scenario,key=value,...``.

        Raises:
            LookupError: the scenario is unknown.
            ValueError: a parameter is unknown, repeated or invalid (the message says which).
        """
        name, *items = (item.strip() for item in spec.split(","))
        name = name.lower()
        kind, defaults = _ALIASES.get(name, (name, {}))
        if kind not in ERROR_SCENARIOS and kind not in _OTHER_SCENARIOS:
            raise LookupError(f"unknown mock scenario {name!r}; known: {', '.join(SCENARIOS)}")
        params = dict(defaults)
        seen: set[str] = set()
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _PARAMS:
                raise ValueError(
                    f"mock scenario parameter {item!r}: expected key=value, keys: {', '.join(_PARAMS)}"
                )
            if key in seen:
                raise ValueError(f"mock scenario parameter {key!r} given twice")
            seen.add(key)
            try:
                params[key] = _PARAMS[key](text.strip())
            except ValueError as exc:
                raise ValueError(f"mock scenario parameter {key}={text!r}: {exc}") from None
        return cls(name=name, kind=kind, **params)


def mock_model(scenario: str, **params: Any) -> str:
    """Spell a model name for the mock: ``mock_model("rate-limit", retry_after=2)`` is
    ``"rate-limit,retry_after=2"``. Booleans become ``1`` / ``0``."""
    items = [scenario]
    for key, value in params.items():
        if isinstance(value, bool):
            value = int(value)
        items.append(f"{key}={value}")
    return ",".join(items)


def rate_limit_headers(sc: MockScenario) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers of an answer under ``rl_remaining`` / ``rl_reset`` (none without
    ``rl_remaining``): OpenAI's and Anthropic's, both. ``rl_garbage``: the same headers, their
    values unreadable."""
    if sc.rl_garbage:
        readable = rate_limit_headers(attrs.evolve(sc, rl_garbage=False, rl_remaining=0))
        return [(name, b"lots" if b"remaining" in name else b"soon") for name, _ in readable]
    if sc.rl_remaining is None:
        return []
    requests, tokens = str(sc.rl_remaining).encode(), str(sc.rl_remaining * 1000).encode()
    reset = f"{sc.rl_reset:g}s".encode()
    at = datetime.datetime.fromtimestamp(time.time() + sc.rl_reset, datetime.UTC)
    stamp = at.isoformat().replace("+00:00", "Z").encode()
    return [
        (b"x-ratelimit-remaining-requests", requests),
        (b"x-ratelimit-reset-requests", reset),
        (b"x-ratelimit-remaining-tokens", tokens),
        (b"x-ratelimit-reset-tokens", reset),
        (b"anthropic-ratelimit-requests-remaining", requests),
        (b"anthropic-ratelimit-requests-reset", stamp),
    ]
