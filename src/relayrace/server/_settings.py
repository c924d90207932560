"""``ServerSettings``: where the two network surfaces listen, who may use them, and their limits."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

from .. import ConfigError


def _port(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(attribute.name, "a port from 0 to 65535, or None", value)


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(attribute.name, "a positive integer", value)


def _seconds(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(attribute.name, "a number of seconds >= 0", value)


def _optional_positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive(instance, attribute, value)


#: The access log's formats (``relayrace.observe.FORMATS``; repeated here so that the settings
#: load without the observe package).
LOG_FORMATS = ("json", "text")


def _log_format(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in LOG_FORMATS:
        raise ConfigError(attribute.name, f"one of {', '.join(LOG_FORMATS)}", value)


def _tokens(value: Iterable[str] | str) -> frozenset[str]:
    if isinstance(value, str):
        # A lone string would become a set of its characters: every 1-letter token would pass.
        raise ConfigError("tokens", "a list of strings", value, show_got=False)
    tokens = frozenset(value)
    for token in tokens:
        # Never echo the token itself: it is a secret.
        if not isinstance(token, str) or not token or token != token.strip() or " " in token:
            raise ConfigError("tokens", "non-empty strings without spaces", show_got=False)
    return tokens


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Settings of ``serve``: the websocket and OpenAI-compatible HTTP endpoints.

    Raises:
        ConfigError: a value is out of range (the token values are never shown).

    Attributes:
        ws_host: the interface the websocket endpoint binds.
        ws_port: its port; ``0`` picks a free port, ``None`` disables the endpoint.
        http_host: the interface the HTTP endpoint binds.
        http_port: its port; ``0`` picks a free port, ``None`` disables the endpoint.
        tokens: the bearer tokens accepted on both endpoints; empty: no authentication.
            Never shown by ``repr`` and never logged.
        max_frame_bytes: the largest websocket frame a client may send (measured in characters
            of the text frame); a larger one closes the connection with code 1009.
        max_in_flight_per_connection: requests running at once on one websocket connection;
            one more is refused with a ``local_capacity`` error frame.
        max_connections: websocket connections open at once, those still in their opening
            handshake included; one more is refused at the handshake with HTTP 503.
        handshake_timeout: seconds a new websocket connection may take to finish its opening
            handshake; then it is closed (an idle socket holds a descriptor no longer).
        max_sockets: TCP connections each listener (websocket, HTTP) keeps open at once
            (handshakes and idle connections included); more wait in the kernel's accept
            queue, costing no descriptor. ``None``: half of the process's open-file limit
            (``RLIMIT_NOFILE``, raised to its hard limit at start), shared between the
            listeners, so that the rest stays free for upstream calls.
        send_queue_frames: frames queued for one websocket connection before the requests on
            it wait for the client to read (a slow reader slows its own requests only).
        max_body_bytes: the largest HTTP request body; a larger one gets HTTP 413.
        shutdown_grace: seconds requests in flight may take to finish once a graceful
            shutdown begins; what is still running then is cancelled (and told so).
        metrics_host: the interface the Prometheus ``/metrics`` listener binds (of
            ``relayrace serve``; unauthenticated: keep it on loopback or a scrapers' network).
        metrics_port: its port; ``None`` (the default): no metrics listener; ``0``: a free port.
        admin_tokens: the bearer tokens of the ``/admin/`` API on the HTTP endpoint; empty (the
            default): the admin API is refused entirely (404). Never shown nor logged.
        log_format: the access log's lines, ``json`` (default) or ``text``.
        max_header_bytes: the largest HTTP request head (request line and headers); a
            larger one gets HTTP 431.
        read_timeout: seconds an HTTP request's head (from its first byte) and, separately,
            its body may take to arrive; then the connection is closed (slowloris defence).
        keep_alive_timeout: seconds an idle HTTP connection is kept for its next request.
        workers: processes ``relayrace serve`` runs, each with its own supervisor, accepting
            on the same ports (``serve`` itself is always one process).
    """

    ws_host: str = "127.0.0.1"
    ws_port: int | None = attrs.field(default=8765, validator=_port)
    http_host: str = "127.0.0.1"
    http_port: int | None = attrs.field(default=8000, validator=_port)
    tokens: frozenset[str] = attrs.field(default=frozenset(), converter=_tokens, repr=False)
    max_frame_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    max_in_flight_per_connection: int = attrs.field(default=64, validator=_positive)
    max_connections: int = attrs.field(default=1024, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_seconds)
    max_sockets: int | None = attrs.field(default=None, validator=_optional_positive)
    send_queue_frames: int = attrs.field(default=32, validator=_positive)
    max_body_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    shutdown_grace: float = attrs.field(default=10.0, validator=_seconds)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = attrs.field(default=None, validator=_port)
    admin_tokens: frozenset[str] = attrs.field(default=frozenset(), converter=_tokens, repr=False)
    log_format: str = attrs.field(default="json", validator=_log_format)

    max_header_bytes: int = attrs.field(default=16384, validator=_positive)
    read_timeout: float = attrs.field(default=10.0, validator=_seconds)
    keep_alive_timeout: float = attrs.field(default=5.0, validator=_seconds)
    workers: int = attrs.field(default=1, validator=_positive)

    def restart_needed(self, new: ServerSettings) -> list[str]:
        """The names of the settings that differ in ``new``: a reload keeps the running
        server's settings (listeners, tokens, limits), so each takes effect at a restart."""
        return [
            field.name
            for field in attrs.fields(ServerSettings)
            if getattr(self, field.name) != getattr(new, field.name)
        ]
