"""``serve``: run the websocket and the OpenAI-compatible HTTP endpoints on one supervisor."""

from __future__ import annotations

import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import Supervisor
from ._admin import Operations
from ._common import Gate, Stop, dumps
from ._h11 import HTTPServer
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
    http_socket: socket.socket | None = None,
    ws_socket: socket.socket | None = None,
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
        http_socket: a listening socket to serve HTTP on instead of binding
            ``http_host:http_port`` (``serve --workers``: each worker's share of the port);
            responses then name the process in an ``x-relayrace-worker`` header.
        ws_socket: the same for the websocket endpoint.
        task_status: ``nursery.start`` receives the ``Server`` once both endpoints listen
            (with the ports actually bound, when a port of ``0`` was asked for).
    """
    settings = settings or ServerSettings()
    gate = Gate()
    async with trio.open_nursery() as nursery:
        websocket: WebsocketEndpoint | None = None
        ws_port = http_port = None
        # Half the descriptors for the listeners, shared between them; the rest stays free
        # for upstream calls.
        listening = (settings.ws_port is not None) + (settings.http_port is not None)
        max_sockets = settings.max_sockets or max(16, _open_file_limit() // 2 // max(1, listening))
        if settings.ws_port is not None:
            websocket = WebsocketEndpoint(
                sup,
                settings,
                gate,
                max_sockets=max_sockets,
                encode_json=encode_json,
                listeners=_listeners(ws_socket),
            )
            ws_port = await nursery.start(websocket.run)
        http: HTTPServer | None = None
        if settings.http_port is not None:
            app = OpenAIApp(sup, settings, gate, encode_json=encode_json, operations=operations)
            http = HTTPServer(
                app,
                max_header_bytes=settings.max_header_bytes,
                read_timeout=settings.read_timeout,
                keep_alive_timeout=settings.keep_alive_timeout,
                max_sockets=max_sockets,
                extra_headers=(
                    [] if http_socket is None else [(b"x-relayrace-worker", b"%d" % os.getpid())]
                ),
            )
            listeners = _listeners(http_socket) or await trio.open_tcp_listeners(
                settings.http_port, host=settings.http_host, backlog=4096
            )
            http_port = listeners[0].socket.getsockname()[1]
            await nursery.start(http.run, listeners)
        server = Server(ws_port, http_port, settings=settings)
        log.info("serving: websocket %s, http %s", server.ws_url, server.http_url)
        task_status.started(server)

        await server._stop.wait()
        log.info("shutting down: %d requests in flight", len(gate))
        gate.close()
        if websocket is not None:
            websocket.stop_accepting()
        if http is not None:
            http.stop_accepting()
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


def _listeners(sock: socket.socket | None) -> list[trio.SocketListener] | None:
    if sock is None:
        return None
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
