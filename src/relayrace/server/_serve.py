"""``serve``: run the websocket and the OpenAI-compatible HTTP endpoints on one supervisor."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework

from .. import Supervisor
from ._admin import Operations
from ._common import Gate, Stop, dumps
from ._http import OpenAIApp
from ._settings import ServerSettings
from ._websocket import WebsocketEndpoint

log = logging.getLogger("relayrace.server")

#: Once the grace has run out and the remaining requests are cancelled, how long their terminal
#: frames and error events get to reach the clients before the connections are cut.
FLUSH_SECONDS = 5.0


@attrs.define(eq=False)
class Server:
    """A running ``serve``: where it listens, and the handle to shut it down gracefully.

    Attributes:
        ws_port: the port the websocket endpoint listens on (``None``: disabled).
        http_port: the port the HTTP endpoint listens on (``None``: disabled).
    """

    ws_port: int | None
    http_port: int | None
    _settings: ServerSettings = attrs.field(repr=False, alias="settings")
    _stop: trio.Event = attrs.field(factory=trio.Event, repr=False, alias="stop")

    @property
    def ws_url(self) -> str | None:
        """``ws://host:port/`` of the websocket endpoint."""
        if self.ws_port is None:
            return None
        return f"ws://{_url_host(self._settings.ws_host)}:{self.ws_port}/"

    @property
    def http_url(self) -> str | None:
        """``http://host:port`` of the HTTP endpoint (the OpenAI base URL adds ``/v1``)."""
        if self.http_port is None:
            return None
        return f"http://{_url_host(self._settings.http_host)}:{self.http_port}"

    def shutdown(self) -> None:
        """Begin a graceful shutdown and return at once; ``serve`` returns when it is done.

        New connections and requests are refused; requests in flight get
        ``ServerSettings.shutdown_grace`` seconds to finish, then are cancelled and told so.
        """
        self._stop.set()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(
    sup: Supervisor,
    settings: ServerSettings | None = None,
    *,
    encode_json: Callable[[Any], str] = dumps,
    operations: Operations | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sup`` over the websocket endpoint and the OpenAI-compatible HTTP endpoint::

        async with open_supervisor(config) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, ServerSettings(http_port=0, ws_port=0))
            print(server.http_url, server.ws_url)
            ...
            server.shutdown()  # graceful; or cancel the nursery for a hard stop

    Returns after ``Server.shutdown()``: once the listeners are closed, the requests in flight
    have finished (or were cancelled at the end of the grace, each with a terminal frame or an
    error event) and every connection is closed. Cancelling ``serve`` stops everything at once,
    without goodbyes. The supervisor stays open: it belongs to the caller.

    Args:
        sup: the running supervisor that serves every request.
        settings: hosts, ports, tokens and limits (default: ``ServerSettings()``).
        encode_json: writes every JSON object both surfaces send, but the websocket's
            ``delta`` frames and the SSE content chunks (default: compact ``json.dumps``).
            If it raises, that one request is answered with an ``internal_error`` and the
            server goes on.
        operations: what the ``/admin/`` API reloads from and the recent failures it shows.
        task_status: ``nursery.start`` receives the ``Server`` once both endpoints listen
            (with the ports actually bound, when a port of ``0`` was asked for).
    """
    settings = settings or ServerSettings()
    gate = Gate()
    http_stop = trio.Event()
    async with trio.open_nursery() as nursery:
        websocket: WebsocketEndpoint | None = None
        ws_port = http_port = None
        if settings.ws_port is not None:
            max_sockets = settings.max_sockets or max(16, _open_file_limit() // 2)
            websocket = WebsocketEndpoint(
                sup, settings, gate, max_sockets=max_sockets, encode_json=encode_json
            )
            ws_port = await nursery.start(websocket.run)
        if settings.http_port is not None:
            app = OpenAIApp(sup, settings, gate, encode_json=encode_json, operations=operations)
            binds = await nursery.start(
                partial(
                    hypercorn.trio.serve,
                    cast(ASGIFramework, app),
                    _hypercorn_config(settings),
                    shutdown_trigger=http_stop.wait,
                    mode="asgi",
                )
            )
            http_port = int(binds[0].rsplit(":", 1)[1])
        server = Server(ws_port, http_port, settings=settings)
        log.info("serving: websocket %s, http %s", server.ws_url, server.http_url)
        task_status.started(server)

        await server._stop.wait()
        log.info("shutting down: %d requests in flight", len(gate))
        gate.close()
        if websocket is not None:
            websocket.stop_accepting()
        http_stop.set()
        with trio.move_on_after(settings.shutdown_grace):
            await gate.wait_idle()
        if len(gate):
            log.warning("cancelling %d requests still running after the grace", len(gate))
        gate.cancel_all(Stop.SHUTDOWN)
        # Time for the cancelled requests' goodbyes to reach their clients, then cut.
        nursery.cancel_scope.deadline = trio.current_time() + FLUSH_SECONDS
    log.info("server stopped")


def _open_file_limit() -> int:
    """The process's open-file limit, raised to its hard limit first (a gateway's descriptors
    are its connections: clients' and upstream's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit: go to a million, which the kernel's nr_open allows by default.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit from %d to %d", soft, target)
            return soft
        return target
    return target if soft == resource.RLIM_INFINITY else soft


def _hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{_url_host(settings.http_host)}:{settings.http_port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("relayrace.server.http")
    # Our own grace runs first and cancels what is left; hypercorn's must outlast it so that the
    # error events of the cancelled requests are written before it cuts the connections.
    config.graceful_timeout = settings.shutdown_grace + FLUSH_SECONDS
    config.include_server_header = False
    # hypercorn's default accept backlog is 100: a burst of more new connections than that (a
    # few hundred clients starting at once) got connection resets. The websocket listener has
    # trio's default (4096, capped by the kernel's somaxconn); the HTTP one now has the same.
    config.backlog = 4096
    return config
