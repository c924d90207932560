"""The gateway's config file: the supervisor's config plus the ``[server]`` table.

[server]
http_host = "127.0.0.1"
http_port = 8000            # 0: pick a free port
ws_port = 8765
ws_enabled = true           # false: no websocket endpoint (http_enabled likewise)
tokens_env = ["RELAYRACE_TOKEN"]   # names of environment variables holding bearer tokens
max_frame_bytes = 1048576
max_in_flight_per_connection = 64
max_connections = 1024
send_queue_frames = 32
max_body_bytes = 1048576
shutdown_grace = 10.0
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from ._config import ClientFactory, Config, read_toml
from ._errors import ConfigError
from ._table import Table
from .server._settings import ServerSettings


@attrs.frozen(kw_only=True)
class GatewayConfig:
    """What ``relayrace serve`` runs: the supervisor's config and the servers' settings."""

    config: Config
    server: ServerSettings


def load_gateway(
    path: str | os.PathLike[str], *, clients: Mapping[str, ClientFactory] | None = None
) -> GatewayConfig:
    """Read a gateway config file.

    Raises:
        ConfigError: naming the key's path in the file and what was expected.
    """
    data = read_toml(path)
    server = server_settings(data.pop("server", {}))
    return GatewayConfig(config=Config.from_dict(data, clients=clients), server=server)


def server_settings(data: Any) -> ServerSettings:
    """``ServerSettings`` from the ``[server]`` table.

    Raises:
        ConfigError: naming ``server.<key>`` and what was expected.
    """
    table = Table(data, "server")
    defaults = ServerSettings()
    tokens = []
    for i, name in enumerate(table.strings("tokens_env")):
        value = os.environ.get(name)
        if not value:
            raise ConfigError(
                f"server.tokens_env[{i}]",
                f"the environment variable {name} to be set",
                show_got=False,
            )
        tokens.append(value)

    def port(key: str, default: int | None) -> int | None:
        enabled = table.flag(key.replace("port", "enabled"), True)
        value = table.integer(key, default, minimum=0)
        if value is not None and value > 65535:
            raise ConfigError(f"server.{key}", "a port from 0 to 65535", value)
        return value if enabled else None

    try:
        settings = ServerSettings(
            ws_host=table.text("ws_host", defaults.ws_host),
            ws_port=port("ws_port", defaults.ws_port),
            http_host=table.text("http_host", defaults.http_host),
            http_port=port("http_port", defaults.http_port),
            tokens=tokens,
            max_frame_bytes=table.integer("max_frame_bytes", defaults.max_frame_bytes, minimum=1),
            max_in_flight_per_connection=table.integer(
                "max_in_flight_per_connection", defaults.max_in_flight_per_connection, minimum=1
            ),
            max_connections=table.integer("max_connections", defaults.max_connections, minimum=1),
            send_queue_frames=table.integer(
                "send_queue_frames", defaults.send_queue_frames, minimum=1
            ),
            max_body_bytes=table.integer("max_body_bytes", defaults.max_body_bytes, minimum=1),
            shutdown_grace=table.number("shutdown_grace", defaults.shutdown_grace),
        )
    except ConfigError as exc:
        raise ConfigError(f"server.{exc.path}", exc.expected, show_got=False) from None
    table.done()
    return settings
