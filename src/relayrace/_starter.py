"""``relayrace init``: a commented starter config for the providers a user names.

Every default the file shows is read from the objects that define it (``ServerSettings``,
``Budgets``, ``Policies``…), so the file cannot drift from what relayrace really does: a line
shown commented out is the value relayrace uses when the line is left out.
"""

from __future__ import annotations

import enum
import json
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from ._config import Budgets, ProviderConfig
from ._loader import MOCK_BASE_URL, load_config
from ._policy import Policies


@attrs.frozen(kw_only=True)
class StarterKind:
    """What the starter config writes for one provider kind."""

    model: str
    api_key_env: str | None
    base_url: str | None
    note: str


#: The kinds ``relayrace init --provider`` knows, in the order they are listed.
STARTER_KINDS: dict[str, StarterKind] = {
    "openai": StarterKind(
        model="gpt-4o-mini",
        api_key_env="OPENAI_API_KEY",
        base_url="https://api.openai.com/v1",
        note="OpenAI, or any OpenAI-compatible server (vLLM, Ollama, OpenRouter): set base_url",
    ),
    "anthropic": StarterKind(
        model="claude-3-5-haiku-latest",
        api_key_env="ANTHROPIC_API_KEY",
        base_url="https://api.anthropic.com",
        note="Anthropic's Messages API",
    ),
    "gemini": StarterKind(
        model="gemini-2.0-flash",
        api_key_env="GEMINI_API_KEY",
        base_url="https://generativelanguage.googleapis.com",
        note="Google's Gemini API (the key goes in a header, never in the URL)",
    ),
    "mock": StarterKind(
        model="ok",
        api_key_env=None,
        base_url=MOCK_BASE_URL,
        note="the fault-injecting mock provider: run `relayrace mock-provider` first; the model"
        " name picks its behaviour (ok, flaky, rate-limit,retry_after=2, ...)",
    ),
}


def toml_value(value: Any) -> str:
    """``value`` written as TOML (the few types a default can have)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return toml_value(value.value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, frozenset | set | list | tuple):
        items = sorted(value, key=str) if isinstance(value, frozenset | set) else value
        return "[" + ", ".join(toml_value(item) for item in items) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _names(kinds: Sequence[str]) -> list[str]:
    """A unique provider name per kind: the kind itself, then ``openai-2``, ``openai-3``."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}-{seen[kind]}")
    return names


def _line(key: str, value: Any, comment: str = "", *, commented: bool = False) -> str:
    text = f"{'# ' if commented else ''}{key} = {toml_value(value)}"
    return f"{text:<42}  # {comment}" if comment else text


def _budgets_line(budgets: Budgets) -> str:
    inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in attrs.asdict(budgets).items())
    return f"# budgets = {{ {inner} }}"


def starter_config(kinds: Sequence[str], *, command: str = "relayrace init") -> str:
    """The starter config for ``kinds`` (each one of ``STARTER_KINDS``), in priority order.

    Args:
        kinds: the provider kinds; the first is tried first. A kind may repeat.
        command: the command line quoted in the file's first line.

    Raises:
        ValueError: no kinds, or a kind that is not one of ``STARTER_KINDS``.
    """
    if not kinds:
        raise ValueError("name at least one provider kind")
    unknown = [k for k in kinds if k not in STARTER_KINDS]
    if unknown:
        raise ValueError(
            f"unknown provider kind {unknown[0]!r} (one of {', '.join(STARTER_KINDS)})"
        )
    names = _names(kinds)
    env = sorted({e for k in kinds if (e := STARTER_KINDS[k].api_key_env) is not None})
    lines = [
        f"# relayrace config, written by `{command}`.",
        "# Check it:  relayrace check relayrace.toml",
        "# Run it:    relayrace serve --config relayrace.toml",
        "# A line commented out shows a default: it is what relayrace uses while the line stays",
        "# commented. Secrets never go in this file: api_key_env and tokens_env name environment",
        "# variables that hold them.",
    ]
    if env:
        lines.append(f"# Set before checking or serving: {', '.join(env)}")
    lines += ["", *_server_lines()]
    for priority, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        lines += ["", *_provider_lines(name, kind, priority)]
    lines += [
        "",
        "[[routes]]",
        _line("model", "chat", 'what callers put in "model"'),
        _line("chain", names, "the providers of this route, tried by priority"),
        _line("strategy", "priority", "priority | round_robin | weighted | least_busy"),
        "",
        *_policy_lines(),
    ]
    return "\n".join(lines) + "\n"


def _server_lines() -> list[str]:
    from .server import ServerSettings  # only init needs the server package

    d = ServerSettings()
    return [
        "[server]",
        _line("http_host", d.http_host, "the OpenAI-compatible HTTP endpoint, /v1"),
        _line("http_port", d.http_port, "0 picks a free port; http_enabled = false: none"),
        _line("ws_host", d.ws_host, "the websocket endpoint"),
        _line("ws_port", d.ws_port, "ws_enabled = false: no websocket endpoint"),
        "# Bearer tokens the clients must send, read from these environment variables. Without",
        "# tokens_env anyone who reaches the ports may use your keys: set it before listening",
        "# anywhere but 127.0.0.1.",
        _line("tokens_env", ["RELAYRACE_TOKEN"], commented=True),
        _line(
            "max_in_flight_per_connection",
            d.max_in_flight_per_connection,
            "requests at once on one websocket",
            commented=True,
        ),
        _line("max_connections", d.max_connections, "websocket connections", commented=True),
        _line("max_body_bytes", d.max_body_bytes, "largest HTTP request body", commented=True),
        _line(
            "shutdown_grace",
            d.shutdown_grace,
            "seconds in-flight requests get on SIGTERM",
            commented=True,
        ),
        _line("log_format", d.log_format, "the access log: json | text", commented=True),
        "# Prometheus /metrics on its own listener (unauthenticated: keep it off public",
        "# interfaces); without metrics_port there is none.",
        _line("metrics_host", d.metrics_host, commented=True),
        _line("metrics_port", 9464, commented=True),
        "# The /admin/ API (health, bench, reload) on the HTTP endpoint, for these tokens only;",
        "# without admin_tokens_env it answers 404.",
        _line("admin_tokens_env", ["RELAYRACE_ADMIN_TOKEN"], commented=True),
    ]


class _ProviderDefaults:
    """The defaults of ``ProviderConfig``'s fields, read from its definition."""

    def __getattr__(self, name: str) -> Any:
        return getattr(attrs.fields(ProviderConfig), name).default


_PROVIDER_DEFAULTS = _ProviderDefaults()


def _client_default(kind: str, name: str) -> Any:
    """An attribute of the client the loader builds for a ``kind`` given no client keys: the
    default its config table gets."""
    config = load_config({"providers": [{"name": "x", "kind": kind}]}, env=False)
    return getattr(config.providers[0].client, name)


def _provider_lines(name: str, kind: str, priority: int) -> list[str]:
    spec = STARTER_KINDS[kind]
    d = _PROVIDER_DEFAULTS
    lines = [
        *textwrap.wrap(spec.note, width=96, initial_indent="# ", subsequent_indent="# "),
        "[[providers]]",
        _line("name", name, "unique; routes name it"),
        _line("kind", kind),
        _line("model", spec.model, "the upstream model"),
    ]
    if spec.api_key_env is not None:
        lines.append(_line("api_key_env", spec.api_key_env, "the variable holding the API key"))
    lines += [
        _line("priority", priority, "lower is tried first"),
        _line("base_url", spec.base_url, commented=True),
        _line("max_concurrency", d.max_concurrency, "requests at once", commented=True),
        _line("inbox_size", d.inbox_size, "requests waiting for a slot", commented=True),
        "# When a bench for failures ends: models (GET the model list, then the next request",
        "# decides), completion (one billed token decides), off (the next request decides).",
        _line("probe", _client_default(kind, "probe_mode"), commented=True),
        "# Seconds: connect, then the first token, then between tokens, the whole attempt, and",
        "# the longest wait in the inbox for a slot before failing over.",
        _budgets_line(d.budgets),
    ]
    return lines


def _policy_lines() -> list[str]:
    p = Policies()
    out = [
        "# Policies: what happens when a provider fails. Every value below is the default; to",
        "# change one, uncomment it and the [policies.…] line above it.",
        "",
        "# Retrying the same provider (rate_limit, provider_5xx, network, unknown are retried).",
        "# [policies.retry]",
    ]
    out += _defaults(
        (
            ("max_attempts", p.retry.max_attempts, "tries per provider, the first included"),
            ("backoff_base", p.retry.backoff_base, "full-jitter exponential backoff, seconds"),
            ("backoff_cap", p.retry.backoff_cap, ""),
            ("max_wait", p.retry.max_wait, "a longer Retry-After fails over instead"),
        )
    )
    out += [
        "",
        "# Moving on to the next provider (content_policy and bad_request stop the request).",
        "# [policies.failover]",
    ]
    out += _defaults(
        (
            ("max_providers", p.failover.max_providers, "providers one request may try; 0: all"),
            ("total_budget", p.failover.total_budget, "seconds for the whole request"),
        )
    )
    out += [
        "",
        "# Benching a failing provider, and probing it back.",
        "# [policies.health]",
    ]
    h = p.health
    out += _defaults(
        (
            ("failure_threshold", h.failure_threshold, "failures in a row that bench"),
            ("cooldown_base", h.cooldown_base, "the first bench, in seconds"),
            ("cooldown_cap", h.cooldown_cap, ""),
            ("probe_interval", h.probe_interval, "a down provider is probed this often"),
            ("bench_immediately", h.bench_immediately, "these bench at once, for long_bench"),
            ("long_bench", h.long_bench, ""),
            ("probe_timeout", h.probe_timeout, "the probe after a bench"),
            ("restart_cool_off", h.restart_cool_off, "before an actor that gave up restarts"),
            ("when_all_benched", h.when_all_benched, "try_anyway | terminus | fail"),
        )
    )
    out += [
        "",
        "# Retries across the whole gateway: at most ratio × requests + floor per window.",
        "# [policies.retry_budget]",
    ]
    b = p.retry_budget
    out += _defaults(
        (("ratio", b.ratio, ""), ("floor", b.floor, ""), ("window", b.window, "seconds"))
    )
    out += [
        "",
        "# A stream that fails after the caller got part of it: error | restart | continue.",
        "# [policies.stream]",
    ]
    out += _defaults(
        (
            ("mid_stream", p.stream.mid_stream, "error: never a truncated answer"),
            ("keep_text", p.stream.keep_text, "characters kept to continue a stream; 0: none"),
        )
    )
    return out


def _defaults(rows: Iterable[tuple[str, Any, str]]) -> list[str]:
    return [_line(key, value, comment, commented=True) for key, value, comment in rows]
