"""``relayrace serve --workers N``: N processes serving the same ports, each with its own
supervisor, watched by a parent that holds the listening sockets.

The parent binds every listening socket itself, so that a port of ``0`` is one port for all and
a restarted worker takes over the very socket (and the connections queued on it) of the worker
it replaces. Where ``SO_REUSEPORT`` exists, each worker gets a socket of its own on the shared
port (the kernel spreads new connections over them); elsewhere all workers share one socket
(whoever is idle accepts). SIGTERM or SIGINT to the parent reaches every worker, which shuts
down gracefully; a worker that dies is restarted, up to ``MAX_RESTARTS`` within
``RESTART_WINDOW`` seconds, after which the parent stops them all and fails.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from ._settings import ServerSettings

log = logging.getLogger("relayrace.server.workers")

#: Restarts allowed within ``RESTART_WINDOW`` seconds, all workers together, before giving up.
MAX_RESTARTS = 10
RESTART_WINDOW = 60.0
#: How often the parent looks at its workers.
_POLL_SECONDS = 0.1
#: A worker's graceful shutdown: the grace, the goodbyes (``FLUSH_SECONDS``), and a margin.
_EXIT_MARGIN = 10.0

#: Where the sockets of one worker are: endpoint ("http", "ws") → descriptor.
Fds = dict[str, int]


def _listen(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_sockets(settings: ServerSettings, workers: int) -> list[dict[str, socket.socket]]:
    """Each worker's listening sockets, one per enabled endpoint, all on the same ports.

    Raises:
        OSError: a port is in use, or a host is not an address of this machine.
    """
    reuse_port = hasattr(socket, "SO_REUSEPORT") and workers > 1
    shares: list[dict[str, socket.socket]] = [{} for _ in range(workers)]
    try:
        for name, host, port in (
            ("http", settings.http_host, settings.http_port),
            ("ws", settings.ws_host, settings.ws_port),
        ):
            if port is None:
                continue
            first = _listen(host, port, reuse_port=reuse_port)
            shares[0][name] = first
            bound = first.getsockname()[1]
            for share in shares[1:]:
                share[name] = _listen(host, bound, reuse_port=True) if reuse_port else first
    except BaseException:
        close_sockets(shares)
        raise
    return shares


def close_sockets(shares: list[dict[str, socket.socket]]) -> None:
    for sock in {id(s): s for share in shares for s in share.values()}.values():
        sock.close()


def urls(settings: ServerSettings, share: dict[str, socket.socket]) -> list[tuple[str, str]]:
    """``(endpoint, URL)`` of the bound sockets, as ``serve`` prints them."""

    def host(name: str) -> str:
        return f"[{name}]" if ":" in name else name

    found = []
    if "ws" in share:
        found.append(
            ("websocket", f"ws://{host(settings.ws_host)}:{share['ws'].getsockname()[1]}/")
        )
    if "http" in share:
        found.append(
            ("http", f"http://{host(settings.http_host)}:{share['http'].getsockname()[1]}")
        )
    return found


def run_workers(
    command: Callable[[Fds], Sequence[str]],
    shares: list[dict[str, socket.socket]],
    *,
    grace: float,
) -> int:
    """Run one worker per share of the sockets until SIGTERM/SIGINT, restarting the dead.

    Args:
        command: the worker's command line, given the descriptors it inherits.
        shares: each worker's sockets (from ``bind_sockets``).
        grace: the workers' shutdown grace, in seconds (how long to wait for them to exit).

    Returns:
        0 after a graceful shutdown of every worker; 1 when workers kept dying (too many
        restarts) or had to be killed.
    """
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers: list[subprocess.Popen[bytes] | None] = [None] * len(shares)
    restarts: list[float] = []
    status = 0
    try:

        def start(i: int) -> None:
            fds = {name: sock.fileno() for name, sock in shares[i].items()}
            workers[i] = subprocess.Popen(list(command(fds)), pass_fds=tuple(fds.values()))
            log.info("worker %d started: pid %d", i, workers[i].pid)  # type: ignore[union-attr]

        for i in range(len(shares)):
            start(i)
        while not stopping:
            time.sleep(_POLL_SECONDS)
            for i, worker in enumerate(workers):
                if stopping or worker is None or worker.poll() is None:
                    continue
                now = time.monotonic()
                restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW]
                if len(restarts) >= MAX_RESTARTS:
                    log.error(
                        "worker %d (pid %d) exited with %s; %d restarts in %.0f s: giving up",
                        i, worker.pid, worker.returncode, len(restarts), RESTART_WINDOW,
                    )  # fmt: skip
                    stopping.append(0)
                    status = 1
                    break
                log.warning(
                    "worker %d (pid %d) exited with %s: restarting it",
                    i, worker.pid, worker.returncode,
                )  # fmt: skip
                restarts.append(now)
                start(i)
        if stopping[0]:
            log.info("%s: stopping %d workers", signal.Signals(stopping[0]).name, len(workers))
        status = max(status, _stop(workers, grace + _EXIT_MARGIN))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for worker in workers:
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()
    return status


def _stop(workers: list[subprocess.Popen[bytes] | None], timeout: float) -> int:
    """SIGTERM every live worker and wait for them all (killing those that outlast
    ``timeout``); 1 if any had to be killed."""
    live = [w for w in workers if w is not None and w.poll() is None]
    for worker in live:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    status = 0
    for worker in live:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop within %.0f s: killed", worker.pid, timeout)
            worker.kill()
            worker.wait()
            status = 1
    return status


def die_with_parent() -> None:
    """In a worker: get SIGTERM when the parent dies (Linux), so that no worker outlives it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def adopt(fds: Fds) -> dict[str, socket.socket]:
    """In a worker: the listening sockets inherited from the parent."""
    return {name: socket.socket(fileno=fd) for name, fd in fds.items()}
