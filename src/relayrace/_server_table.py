"""The gateway file's ``[server]`` table: where the endpoints listen, who may use them, their
limits, as ``ServerSettings`` with every mistake named by its path (``server.http_port``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ConfigError
from ._table import Problems, Table

if TYPE_CHECKING:
    from .server._settings import ServerSettings


def server_settings(data: Any, problems: Problems) -> ServerSettings:
    """``ServerSettings`` from the ``[server]`` table.

    Raises:
        ConfigError: naming ``server.<key>`` and what was expected.
    """
    # Imported here: the server package (h11, trio-websocket) loads only with a gateway.
    from .server._settings import LOG_FORMATS, ServerSettings

    table = Table(data, "server", problems)
    defaults = ServerSettings()
    tokens = []
    for i, name in enumerate(table.strings("tokens_env")):
        value = table.lookup_env(f"{table.at('tokens_env')}[{i}]", name)
        if value is not None:
            tokens.append(value)
    admin_tokens = []
    for i, name in enumerate(table.strings("admin_tokens_env")):
        value = table.lookup_env(f"{table.at('admin_tokens_env')}[{i}]", name)
        if value is not None:
            admin_tokens.append(value)

    def port(key: str, default: int | None) -> int | None:
        enabled = table.flag(key.replace("port", "enabled"), True)
        value = table.integer(key, default, minimum=0)
        if value is not None and value > 65535:
            value = table.mistake(table.at(key), "a port from 0 to 65535", value, fallback=default)
        return value if enabled else None

    values = dict(
        ws_host=table.text("ws_host", defaults.ws_host),
        ws_port=port("ws_port", defaults.ws_port),
        http_host=table.text("http_host", defaults.http_host),
        http_port=port("http_port", defaults.http_port),
        max_frame_bytes=table.integer("max_frame_bytes", defaults.max_frame_bytes, minimum=1),
        max_in_flight_per_connection=table.integer(
            "max_in_flight_per_connection", defaults.max_in_flight_per_connection, minimum=1
        ),
        max_connections=table.integer("max_connections", defaults.max_connections, minimum=1),
        send_queue_frames=table.integer("send_queue_frames", defaults.send_queue_frames, minimum=1),
        max_body_bytes=table.integer("max_body_bytes", defaults.max_body_bytes, minimum=1),
        shutdown_grace=table.number("shutdown_grace", defaults.shutdown_grace),
        handshake_timeout=table.number(
            "handshake_timeout", defaults.handshake_timeout, positive=True
        ),
        max_sockets=table.integer("max_sockets", defaults.max_sockets, minimum=1),
        metrics_host=table.text("metrics_host", defaults.metrics_host),
        metrics_port=port("metrics_port", defaults.metrics_port),
        log_format=table.choice("log_format", LOG_FORMATS, defaults.log_format),
        max_header_bytes=table.integer("max_header_bytes", defaults.max_header_bytes, minimum=1),
        read_timeout=table.number("read_timeout", defaults.read_timeout, positive=True),
        keep_alive_timeout=table.number(
            "keep_alive_timeout", defaults.keep_alive_timeout, positive=True
        ),
        workers=table.integer("workers", defaults.workers, minimum=1),
    )
    table.done()
    try:
        return ServerSettings(tokens=tokens, admin_tokens=admin_tokens, **values)
    except ConfigError as exc:
        raise ConfigError(f"server.{exc.path}", exc.expected, show_got=False) from None
