"""The constructor options every HTTP provider client takes (``ClientOptions``) and how they
are read from a provider's config table (``options_from_table``): what a client is built
from, apart from the attempt loop of ``_base``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import httpx

from .._client import PROBE_MODES, ProbeMode
from .._errors import ConfigError
from .._table import Table
from ..providers import MAX_EVENT_BYTES, MAX_SSE_LINE_BYTES
from ._body import MAX_BODY_BYTES
from ._transport import TRANSPORTS


class ClientOptions(TypedDict, total=False):
    """The constructor options every HTTP provider client takes (see ``HTTPProviderClient``);
    each client adds its own."""

    base_url: str
    api_key: str | None
    headers: Mapping[str, str] | None
    query: Mapping[str, str] | None
    extra_body: Mapping[str, Any] | None
    accepts_continuation: bool
    max_connections: int
    connect_timeout: float
    transport: httpx.AsyncBaseTransport | str
    max_body_bytes: int
    max_sse_line_bytes: int
    max_event_bytes: int
    probe: ProbeMode


# --- reading a client's config table ---------------------------------------------------------------


def options_from_table(
    table: Table, *, base_url: str, max_connections: int, connect_timeout: float
) -> ClientOptions:
    """The constructor options every HTTP client reads from its provider's config table
    (``ClientOptions``, to pass on with ``**``).

    Reads ``base_url`` (defaults to the provider's public API), ``api_key_env`` (the NAME of
    the environment variable that holds the key), ``headers`` and ``query`` (tables of strings)
    and ``extra_body`` (a table merged into every request body, under what the request sets),
    and the limits on what the provider may send: ``max_body_bytes``, ``max_sse_line_bytes``,
    ``max_event_bytes`` (see ``HTTPProviderClient``), ``transport`` (``h11`` or ``httpx``)
    and ``probe`` (``models``, ``completion`` or ``off``: what an active probe of a benched
    provider sends). The pool size and connect timeout come from the provider's
    ``max_concurrency`` and
    ``budgets.connect``, read by the config before the client's own keys.

    Raises:
        ConfigError: a key has the wrong type, or the named environment variable is unset.
    """
    url = table.text("base_url", base_url)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(_at(table, "base_url"), "an http:// or https:// URL", url)
    extra_body = table.raw("extra_body", None)
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise ConfigError(_at(table, "extra_body"), "a table", extra_body)
    return ClientOptions(
        base_url=url,
        api_key=table.env("api_key_env"),
        headers=_string_table(table, "headers"),
        query=_string_table(table, "query"),
        extra_body=extra_body,
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        max_body_bytes=table.integer("max_body_bytes", MAX_BODY_BYTES, minimum=1),
        max_sse_line_bytes=table.integer("max_sse_line_bytes", MAX_SSE_LINE_BYTES, minimum=1),
        max_event_bytes=table.integer("max_event_bytes", MAX_EVENT_BYTES, minimum=1),
        transport=table.choice("transport", TRANSPORTS, "h11"),
        probe=table.choice("probe", PROBE_MODES, "models"),
    )


def _string_table(table: Table, key: str) -> dict[str, str] | None:
    value = table.raw(key, None)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(_at(table, key), "a table of strings", value)
    for name, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"{_at(table, key)}.{name}", "a string", item)
    return dict(value)


def _at(table: Table, key: str) -> str:
    return f"{table.path}.{key}" if table.path else key
