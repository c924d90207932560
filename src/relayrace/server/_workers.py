"""``relayrace serve --workers N``: N processes serving the same ports, each with its own
supervisor, watched by a parent that holds the listening sockets.

The parent binds every listening socket itself, so that a port of ``0`` is one port for all and
a restarted worker takes over the very socket (and the connections queued on it) of the worker
it replaces. Where ``SO_REUSEPORT`` exists, each worker gets a socket of its own on the shared
port (the kernel spreads new connections over them); elsewhere all workers share one socket
(whoever is idle accepts). SIGTERM or SIGINT to the parent reaches every worker, which shuts
down gracefully; a worker that dies is restarted, up to ``MAX_RESTARTS`` within
``RESTART_WINDOW`` seconds, after which the parent stops them all and fails.

Reload: SIGHUP to the parent is SIGHUP to every worker, each of which reloads the file on its
own (and logs the outcome; a file with mistakes changes nothing anywhere). Each worker has a
pipe to the parent (``ParentLink``) on which it says when it serves (a worker that does not
yet gets its SIGHUP once it does: it would otherwise die of it, or miss it) and when it
reloaded through ``POST /admin/reload``, which the parent passes on as SIGHUP to the others.
A restarted worker reads the file as it is when it starts; while the file has mistakes a dead
worker is not restarted (nor counted as a restart): its own sockets are closed, so that the
kernel sends new connections to the others, and bound again when the file is fixed.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

import attrs

from ._settings import ServerSettings

log = logging.getLogger("relayrace.server.workers")

#: Restarts allowed within ``RESTART_WINDOW`` seconds, all workers together, before giving up.
MAX_RESTARTS = 10
RESTART_WINDOW = 60.0
#: How often the parent looks at its workers.
_POLL_SECONDS = 0.1
#: How often a dead worker's slot looks at a config file that had mistakes.
_RECHECK_SECONDS = 1.0
#: A worker's graceful shutdown: the grace, the goodbyes (``FLUSH_SECONDS``), and a margin.
_EXIT_MARGIN = 10.0

#: Where the sockets of one worker are: endpoint ("http", "ws") → descriptor, and ``PARENT``:
#: the write end of its pipe to the parent.
Fds = dict[str, int]
PARENT = "parent"
#: What a worker writes on its pipe: it serves (SIGHUP is handled from now on) ...
_SERVING = b"s"
#: ... or it reloaded through the admin API (the parent reloads the others).
_RELOADED = b"r"


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
    command: Callable[[int, Fds], Sequence[str]],
    shares: list[dict[str, socket.socket]],
    *,
    grace: float,
    check: Callable[[], Sequence[str]] | None = None,
    announce: Callable[[], None] | None = None,
) -> int:
    """Run one worker per share of the sockets until SIGTERM/SIGINT, restarting the dead and
    passing SIGHUP (and a worker's admin reload) on to the workers.

    Args:
        command: the worker's command line, given its index (0 .. N-1, kept by its
            replacement) and the descriptors it inherits (its sockets and, under ``PARENT``,
            its pipe to the parent).
        shares: each worker's sockets (from ``bind_sockets``).
        grace: the workers' shutdown grace, in seconds (how long to wait for them to exit).
        check: the config file's mistakes now (none: a worker can start from it). A dead
            worker is not restarted while there are any (it could not start, and each try
            would count towards ``MAX_RESTARTS``): it waits, checking again every
            ``_RECHECK_SECONDS``, while the other workers serve.
        announce: called once the parent handles SIGHUP, SIGTERM and SIGINT (say where the
            server listens then: a signal sent on seeing that must not kill the parent).

    Returns:
        0 after a graceful shutdown of every worker; 1 when workers kept dying (too many
        restarts) or had to be killed.
    """
    stopping: list[int] = []
    hangups: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        (hangups if signum == signal.SIGHUP else stopping).append(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    slots = [_Slot(*os.pipe()) for _ in shares]
    restarts: list[float] = []
    status = 0
    try:
        for slot in slots:
            os.set_blocking(slot.read_end, False)

        def start(i: int) -> None:
            slot = slots[i]
            _drain(slot.read_end)  # what the worker it replaces said is no news of this one
            fds = {name: sock.fileno() for name, sock in shares[i].items()}
            fds[PARENT] = slot.write_end
            slot.process = subprocess.Popen(list(command(i, fds)), pass_fds=tuple(fds.values()))
            slot.serving = slot.reload_pending = False
            log.info("worker %d started: pid %d", i, slot.process.pid)

        for i in range(len(shares)):
            start(i)
        if announce is not None:
            announce()
        while not stopping:
            ready = _wait_readable([slot.read_end for slot in slots], _POLL_SECONDS)
            if hangups:
                log.info("SIGHUP: reloading %d workers", len(slots))
                hangups.clear()
                for slot in slots:
                    slot.reload()
            for i, slot in enumerate(slots):
                if slot.read_end in ready:
                    for said in _drain(slot.read_end):
                        if said == _SERVING[0]:
                            slot.now_serving()
                        elif said == _RELOADED[0]:
                            log.info("worker %d reloaded (admin API): reloading the others", i)
                            for other in slots:
                                if other is not slot:
                                    other.reload()
            for i, slot in enumerate(slots):
                worker = slot.process
                if stopping or worker is None or worker.poll() is None:
                    continue
                now = time.monotonic()
                if check is not None and not slot.file_ok(check, now, i):
                    # Not a crash loop: the others serve on while the file gets fixed. Its own
                    # sockets close meanwhile, or the kernel would queue new connections there
                    # for nobody (SO_REUSEPORT); they are bound again for its restart.
                    slot.parked |= _park(shares, i)
                    continue
                try:
                    _unpark(shares, i, slot.parked)
                except OSError as exc:
                    log.error("worker %d: cannot listen again: %s; trying again", i, exc)
                    continue
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
        workers = [slot.process for slot in slots]
        if stopping[0]:
            log.info("%s: stopping %d workers", signal.Signals(stopping[0]).name, len(workers))
        status = max(status, _stop(workers, grace + _EXIT_MARGIN))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for slot in slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
                slot.process.wait()
            os.close(slot.read_end)
            os.close(slot.write_end)
    return status


@attrs.define(eq=False)
class _Slot:
    """One worker's place in the parent: its pipe, its process, whether it serves yet."""

    read_end: int
    write_end: int
    process: subprocess.Popen[bytes] | None = None
    serving: bool = False
    #: A SIGHUP for a worker that did not serve yet: sent once it does.
    reload_pending: bool = False
    #: Dead and waiting for a config file without mistakes: when to look at it again.
    recheck_at: float | None = None
    #: Its listening sockets closed while it waits: endpoint → (host, port).
    parked: dict[str, tuple[str, int]] = attrs.field(factory=dict)

    def file_ok(self, check: Callable[[], Sequence[str]], now: float, index: int) -> bool:
        """Whether the worker can be restarted from the file now (logged once when not)."""
        if self.recheck_at is not None and now < self.recheck_at:
            return False
        problems = check()
        if not problems:
            if self.recheck_at is not None:
                log.info("worker %d: the config file is fixed: restarting it", index)
            self.recheck_at = None
            return True
        if self.recheck_at is None:
            log.error(
                "worker %d exited; not restarted while the config file has mistakes "
                "(the other workers serve on): %s",
                index,
                "; ".join(problems),
            )
        self.recheck_at = now + _RECHECK_SECONDS
        return False

    def reload(self) -> None:
        if self.serving and self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)
        else:
            self.reload_pending = True

    def now_serving(self) -> None:
        self.serving = True
        if self.reload_pending:
            self.reload_pending = False
            self.reload()


def _park(shares: list[dict[str, socket.socket]], i: int) -> dict[str, tuple[str, int]]:
    """Close worker ``i``'s own listening sockets (not one it shares with the others); where
    each was bound."""
    others = {id(sock) for j, share in enumerate(shares) if j != i for sock in share.values()}
    parked = {}
    for name, sock in shares[i].items():
        if id(sock) not in others and sock.fileno() != -1:
            parked[name] = sock.getsockname()[:2]
            sock.close()
    return parked


def _unpark(
    shares: list[dict[str, socket.socket]], i: int, parked: dict[str, tuple[str, int]]
) -> None:
    """Bind worker ``i``'s sockets again where ``_park`` closed them (``parked``: emptied).

    Raises:
        OSError: a port cannot be bound again.
    """
    for name, (host, port) in list(parked.items()):
        shares[i][name] = _listen(host, port, reuse_port=True)
        del parked[name]


def _wait_readable(fds: list[int], timeout: float) -> list[int]:
    """The descriptors among ``fds`` with something to read, waiting at most ``timeout``
    (a signal handled meanwhile ends the wait early or not: either way within ``timeout``)."""
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except InterruptedError:  # pragma: no cover - PEP 475 retries select
        return []
    return ready


def _drain(fd: int) -> bytes:
    """Everything readable now on the non-blocking ``fd``."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


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


@attrs.frozen
class ParentLink:
    """In a worker: the pipe to the parent of ``serve --workers``.

    Attributes:
        fd: the pipe's write end, inherited from the parent.
    """

    fd: int

    def serving(self) -> None:
        """Tell the parent this worker serves (and handles SIGHUP) from now on."""
        self._say(_SERVING)

    def reloaded(self) -> None:
        """Tell the parent this worker reloaded through the admin API: it reloads the others."""
        self._say(_RELOADED)

    def _say(self, what: bytes) -> None:
        try:
            os.write(self.fd, what)
        except OSError as exc:  # the parent is gone (we get SIGTERM) or not reading
            log.warning("cannot tell the parent of serve --workers: %s", exc)


def adopt(fds: Fds) -> tuple[dict[str, socket.socket], ParentLink | None]:
    """In a worker: the listening sockets inherited from the parent, and the pipe to it."""
    sockets = {name: socket.socket(fileno=fd) for name, fd in fds.items() if name != PARENT}
    link = ParentLink(fds[PARENT]) if PARENT in fds else None
    if link is not None:
        os.set_blocking(link.fd, False)
    return sockets, link
