"""The ``relayrace`` command: ``demo``, ``init``, ``serve``, ``check``, ``explain``, ``top``,
``mock-provider``, ``bench``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import socket
import sys
import textwrap
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._errors import ConfigError
from ._starter import STARTER_KINDS

if TYPE_CHECKING:
    from ._loader import GatewayConfig
    from .server import Operations, Server, ServerSettings
    from .server._workers import ParentLink
    from .supervisor import Supervisor


# Shown at the end of each command's --help: real commands a newcomer can paste.
_EXAMPLES = {
    "relayrace": """examples:
  relayrace demo                       watch failover on mock providers, narrated
  relayrace init --provider openai --provider anthropic > relayrace.toml
  relayrace serve --config relayrace.toml
""",
    "demo": """examples:
  relayrace demo                       40 requests, faults timed by a random seed
  relayrace demo --seed 7              the same faults as the last run with seed 7
  relayrace demo --in-process          scripted providers, scene by scene, every rule
""",
    "init": """examples:
  relayrace init --provider openai --provider anthropic > relayrace.toml
  relayrace init -p mock > relayrace.toml    then: relayrace mock-provider
  relayrace init -p gemini -p openai -p mock > relayrace.toml
""",
    "serve": """examples:
  relayrace serve --config relayrace.toml
  relayrace serve -c examples/relayrace.toml --log-level DEBUG
  relayrace serve -c relayrace.toml --log-format text     access log lines as text
""",
    "top": """examples:
  relayrace top --url http://127.0.0.1:8000      the admin token in RELAYRACE_ADMIN_TOKEN
  relayrace top --once --token-env MY_ADMIN_TOKEN        one frame, then exit
""",
    "check": """examples:
  relayrace check relayrace.toml
  relayrace check --no-env examples/relayrace.toml
  relayrace check --no-env - < relayrace.toml
""",
    "explain": """examples:
  relayrace explain reply.json         a reply, an error body or a websocket done/error frame
  relayrace explain - < stream.txt     from stdin: any of those, or an SSE stream's text
  relayrace explain access.log --html story.html    access-log lines, one story each
""",
}
_EXAMPLE_FORMAT = argparse.RawDescriptionHelpFormatter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relayrace",
        description="LLM request failover over ranked provider actors.",
        epilog=_EXAMPLES["relayrace"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    parser.add_argument("--version", action="version", version=f"relayrace {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="mock providers, the gateway and a stream of requests, shown live",
        description=textwrap.fill(
            "Mock providers (one flapping, one rate-limited, one healthy) behind the gateway,"
            " and a stream of requests over its websocket, narrated: who answered each request,"
            " why not the providers before it, the benches and recoveries, and a summary.",
            width=78,
        ),
        epilog=_EXAMPLES["demo"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    demo.add_argument("--requests", type=int, default=40, help="requests to send (default 40)")
    demo.add_argument(
        "--in-process", action="store_true", help="scripted providers, no servers, scene by scene"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=None,
        help="picks the timing of the mock providers' faults and seeds the supervisor; the same"
        " seed plays the same faults (default: a random seed, printed)",
    )
    init = commands.add_parser(
        "init",
        help="print a commented starter config for the providers you name",
        description=textwrap.fill(
            "Print a starter config (TOML) to standard output: one [[providers]] table per"
            " --provider, in the order given (the first is tried first), a route 'chat' over"
            " them, a [server] table and the policies, commented, with their defaults.",
            width=78,
        ),
        epilog=_EXAMPLES["init"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    init.add_argument(
        "--provider",
        "-p",
        action="append",
        required=True,
        choices=list(STARTER_KINDS),
        metavar="KIND",
        help=f"a provider kind ({', '.join(STARTER_KINDS)}); repeat it, in priority order",
    )
    serve = commands.add_parser(
        "serve",
        help="run the gateway from a TOML config file",
        description=textwrap.fill(
            "Run the websocket and HTTP endpoints (and the metrics listener, with [server]"
            " metrics_port) until SIGINT or SIGTERM; SIGHUP reloads the file, as"
            " POST /admin/reload does (with --workers: SIGHUP the parent, or POST to any"
            " worker, and every worker reloads).",
            width=78,
        ),
        epilog=_EXAMPLES["serve"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    serve.add_argument("--config", "-c", required=True, help="the TOML config file")
    serve.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    serve.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=None,
        help="the access log's lines (default: [server] log_format, else json)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes serving the same ports, each with its own supervisor "
        "(default: [server] workers, else 1)",
    )
    # A worker of `serve --workers`: the listening sockets it inherits (name=fd,...).
    serve.add_argument("--worker-fds", help=argparse.SUPPRESS)
    # ... and its index (0 .. N-1): worker i serves metrics on metrics_port + i.
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    check = commands.add_parser(
        "check",
        help="check a TOML config file, report every mistake in it, and exit",
        epilog=_EXAMPLES["check"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    check.add_argument("config", help="the TOML config file ('-': read it from stdin)")
    check.add_argument(
        "--no-env",
        action="store_true",
        help="do not read environment variables (their names are still checked)",
    )
    explain = commands.add_parser(
        "explain",
        help="tell a request's story: its attempts on a timeline, its decisions and their rules",
        description=textwrap.fill(
            "Read a chat-completion response, an HTTP error body, the 'relayrace' object alone,"
            " a websocket done/error frame, an SSE stream's text or access-log lines, and show"
            " each request's attempts on a timeline, each decision with the rule that made it"
            " and a one-line verdict.",
            width=78,
        ),
        epilog=_EXAMPLES["explain"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    explain.add_argument("input", nargs="?", default="-", help="the file ('-', the default: stdin)")
    explain.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page")
    explain.add_argument(
        "--width", type=int, default=None, help="columns to draw in (default: the terminal's)"
    )
    top = commands.add_parser(
        "top",
        help="a live view of every provider's health, load, failures and benches",
        description=textwrap.fill(
            "Read GET /admin/providers of a running gateway every --interval seconds and show"
            " each provider's state, bench deadline, attempts in flight, inbox depth and recent"
            " failure categories.",
            width=78,
        ),
        epilog=_EXAMPLES["top"],
        formatter_class=_EXAMPLE_FORMAT,
    )
    top.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's HTTP endpoint")
    top.add_argument(
        "--token-env",
        default="RELAYRACE_ADMIN_TOKEN",
        help="the environment variable holding an admin token (default RELAYRACE_ADMIN_TOKEN)",
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    commands.add_parser(
        "mock-provider", help="run the fault-injecting mock provider", add_help=False
    )
    commands.add_parser("bench", help="run the load benchmarks", add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    # These two parse their own arguments.
    if argv and argv[0] == "mock-provider":
        from .testing._mock_provider import main as mock_main

        return mock_main(argv[1:])
    if argv and argv[0] == "bench":
        import importlib

        bench = importlib.import_module("relayrace.bench")
        return int(bench.main(argv[1:]))

    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo_main

        demo_main(in_process=args.in_process, requests=args.requests, seed=args.seed)
        return 0
    if args.command == "init":
        from ._starter import starter_config

        command = "relayrace init " + " ".join(f"--provider {kind}" for kind in args.provider)
        sys.stdout.write(starter_config(args.provider, command=command))
        return 0
    if args.command == "check":
        return _check(args.config, env=not args.no_env)
    if args.command == "explain":
        from ._explain import main as explain_main

        return explain_main(args.input, html_out=args.html, width=args.width)
    if args.command == "top":
        from ._top import main as top_main

        return top_main(args.url, args.token_env, interval=args.interval, once=args.once)
    # A worker of `serve --workers` names itself in each line: its reload, its failures.
    who = "worker %(process)d " if args.worker_fds is not None else ""
    try:
        logging.basicConfig(
            level=args.log_level.upper(),
            format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
        )
    except ValueError as exc:
        print(f"relayrace: --log-level: {exc}", file=sys.stderr)
        return 2
    if args.worker_fds is not None:
        fds = {k: int(v) for k, v in (item.split("=") for item in args.worker_fds.split(","))}
        return _serve(
            args.config, log_format=args.log_format, worker_fds=fds, worker_index=args.worker_index
        )
    if args.workers is not None and args.workers < 1:
        print("relayrace: --workers must be at least 1", file=sys.stderr)
        return 2
    return _serve(
        args.config, log_format=args.log_format, workers=args.workers, log_level=args.log_level
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relayrace")
    except PackageNotFoundError:
        return "unknown"


def _report(source: str, error: ConfigError) -> None:
    """One line per mistake on stderr, each naming the file."""
    for problem in error.problems:
        print(f"{source}: {problem}", file=sys.stderr)


def _check(path: str, *, env: bool = True) -> int:
    from ._loader import load_gateway, parse_toml, read_gateway

    source = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            gateway = load_gateway(parse_toml(sys.stdin.read(), source), env=env)
        else:
            gateway = read_gateway(path, env=env)
    except ConfigError as exc:
        _report(source, exc)
        return 2
    config, server = gateway.config, gateway.server
    routes = ", ".join(f"{r.model} → {' > '.join(r.chain)}" for r in config.routes) or "* → all"
    print(f"{source}: ok")
    print(f"  providers: {', '.join(p.name for p in config.providers)}")
    print(f"  routes:    {routes}")
    if server.ws_port is not None:
        print(f"  websocket: {server.ws_host}:{server.ws_port}")
    if server.http_port is not None:
        print(f"  http:      {server.http_host}:{server.http_port}")
    if env:
        print(f"  auth:      {'bearer tokens' if server.tokens else 'none'}")
    else:
        print("  auth:      not checked (--no-env: environment variables not read)")
    return 0


def _serve(
    path: str,
    *,
    log_format: str | None = None,
    workers: int | None = None,
    log_level: str = "INFO",
    worker_fds: dict[str, int] | None = None,
    worker_index: int = 0,
) -> int:
    """``relayrace serve``: every failure to start is one line on stderr and a non-zero exit
    (2: the config; 1: anything else), never a traceback."""
    from ._loader import read_gateway

    try:
        gateway = read_gateway(path)
    except ConfigError as exc:
        _report(path, exc)
        return 2
    failed: list[str] = []
    # The access log's lines are whole records (JSON or text, with their own time): no prefix.
    access = logging.getLogger("relayrace.access")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    try:
        overrides: dict[str, Any] = {} if log_format is None else {"log_format": log_format}
        if worker_fds is not None:
            from .server._workers import adopt, die_with_parent

            die_with_parent()
            # Until it serves (and handles SIGHUP), SIGHUP would kill the worker; the parent
            # holds it back until then anyway.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            sockets, parent = adopt(worker_fds)
            metrics_port = gateway.server.metrics_port
            if metrics_port:  # one port each (port 0: each its own, unannounced)
                overrides["metrics_port"] = metrics_port + worker_index
            trio.run(
                partial(
                    run_gateway,
                    gateway,
                    config_path=path,
                    overrides=overrides,
                    http_socket=sockets.get("http"),
                    ws_socket=sockets.get("ws"),
                    announce=False,
                    parent=parent,
                    freeze_gc=True,
                )
            )
        elif (workers or gateway.server.workers) > 1:
            count = workers or gateway.server.workers
            return _serve_workers(path, gateway, count, log_level, log_format)
        else:
            trio.run(
                partial(
                    run_gateway, gateway, config_path=path, overrides=overrides, freeze_gc=True
                )
            )
    except* OSError as group:  # a port in use, a host that does not resolve (in nursery groups)
        failed += _messages(group)
    except* Exception as group:  # a bug: one line here, the traceback only at DEBUG
        logging.getLogger("relayrace").debug("serve failed", exc_info=group)
        failed += [f"{type(e).__name__}: {e}" for e in _leaves(group)]
    finally:
        access.removeHandler(handler)
        access.propagate = True
    if failed:
        server = gateway.server
        where = ", ".join(
            f"{name} {host}:{port}"
            for name, host, port in (
                ("websocket", server.ws_host, server.ws_port),
                ("http", server.http_host, server.http_port),
                ("metrics", server.metrics_host, server.metrics_port),
            )
            if port is not None
        )
        for message in dict.fromkeys(failed):  # each once, in order
            print(f"relayrace: cannot serve ({where}): {message}", file=sys.stderr)
        return 1
    return 0


def _serve_workers(
    path: str, gateway: GatewayConfig, workers: int, log_level: str, log_format: str | None
) -> int:
    from .server._workers import bind_sockets, close_sockets, run_workers, urls

    shares = bind_sockets(gateway.server, workers)  # OSError: reported by the caller
    try:

        def announce() -> None:
            for name, url in urls(gateway.server, shares[0]):
                print(f"relayrace: {name} on {url} ({workers} workers)", flush=True)
            server = gateway.server
            if server.metrics_port:
                host = server.metrics_host
                host = f"[{host}]" if ":" in host else host
                print(
                    f"relayrace: metrics on http://{host}:{server.metrics_port}/metrics"
                    f" (worker 0; worker i: port {server.metrics_port} + i)",
                    flush=True,
                )

        def command(index: int, fds: dict[str, int]) -> list[str]:
            listed = ",".join(f"{name}={fd}" for name, fd in fds.items())
            serve = ["serve", "--config", path, "--log-level", log_level, "--worker-fds", listed]
            serve += ["--worker-index", str(index)]
            if log_format is not None:
                serve += ["--log-format", log_format]
            return [sys.executable, "-m", "relayrace._cli", *serve]

        def check() -> list[str]:
            from ._loader import read_gateway

            try:
                read_gateway(path)
            except ConfigError as exc:
                return [str(problem) for problem in exc.problems]
            return []

        return run_workers(
            command, shares, grace=gateway.server.shutdown_grace, check=check, announce=announce
        )
    finally:
        close_sockets(shares)


def _messages(group: BaseExceptionGroup[OSError]) -> list[str]:
    """The message of every exception in a (nested) group."""
    return [str(exc) for exc in _leaves(group)]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves


@attrs.frozen
class Running:
    """A running ``run_gateway``: the server, its supervisor, and where metrics are served.

    Attributes:
        server: the websocket and HTTP endpoints (``Server.shutdown()`` stops the gateway).
        sup: the supervisor serving them.
        metrics_url: ``http://host:port/metrics`` (``None``: no metrics listener).
    """

    server: Server
    sup: Supervisor
    metrics_url: str | None


async def run_gateway(
    gateway: GatewayConfig,
    *,
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    http_socket: socket.socket | None = None,
    ws_socket: socket.socket | None = None,
    announce: bool = True,
    parent: ParentLink | None = None,
    freeze_gc: bool = False,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``gateway`` until SIGINT or SIGTERM (or ``Server.shutdown()``), then shut down
    gracefully: stop accepting, let requests in flight finish within the grace period, cancel
    the rest (each client gets its terminal frame).

    The supervisor is watched by ``Metrics`` (served on ``[server] metrics_port``, if set), an
    ``AccessLog`` in ``[server] log_format`` and the admin API's ``RecentFailures``. SIGHUP
    reloads ``config_path`` as ``POST /admin/reload`` does. ``overrides`` are ``[server]``
    settings the command line sets over the file's (``log_format``). A worker of
    ``serve --workers`` passes the sockets it inherited (its parent announces the URLs) and
    its ``parent`` link: told when it serves, and of each reload through the admin API (the
    parent passes that on as SIGHUP to the other workers). ``freeze_gc`` (the ``serve``
    command's processes): once the supervisor and its state backend are up, before accepting,
    ``gc.freeze()`` what exists so far (see below).
    """
    from .observe import AccessLog, Metrics, serve_metrics
    from .server import Operations, RecentFailures, serve
    from .supervisor import open_supervisor

    overrides = dict(overrides or {})
    settings = attrs.evolve(gateway.server, **overrides)
    metrics, recent = Metrics(), RecentFailures()
    observers = [metrics, AccessLog(settings.log_format), recent]
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with trio.open_signal_receiver(*signums) as signals:
        async with (
            open_supervisor(gateway.config, observers=observers) as sup,
            trio.open_nursery() as nursery,
        ):
            if freeze_gc:
                # Modules, config, the supervisor and the state client (coredis: thousands of
                # long-lived objects) live as long as the process: out of the collector's
                # walks, which cost ~6-16 % CPU per request (relayrace bench --only state).
                gc.collect()
                gc.freeze()
            metrics_url = None
            if settings.metrics_port is not None:
                host = settings.metrics_host
                port = await nursery.start(serve_metrics, metrics, host, settings.metrics_port)
                metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
            operations = Operations(
                config_path=config_path,
                recent=recent,
                overrides=overrides,
                on_reload=None if parent is None else parent.reloaded,
            )

            async def serving(*, task_status: trio.TaskStatus[Server]) -> None:
                await serve(
                    sup,
                    settings,
                    operations=operations,
                    http_socket=http_socket,
                    ws_socket=ws_socket,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # shut down: stop waiting for signals

            server: Server = await nursery.start(serving)
            # ``serve`` logs where it listens; this is for the person who started it.
            for name, url in (
                ("websocket", server.ws_url),
                ("http", server.http_url),
                ("metrics", metrics_url),
            ):
                if url is not None and announce:
                    print(f"relayrace: {name} on {url}", flush=True)
            task_status.started(Running(server, sup, metrics_url))
            if parent is not None:
                parent.serving()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload_on_signal(sup, operations, settings)
                    continue
                logging.getLogger("relayrace").info(
                    "%s: shutting down gracefully", signal.Signals(signum).name
                )
                server.shutdown()
                break


async def _reload_on_signal(
    sup: Supervisor, operations: Operations, settings: ServerSettings
) -> None:
    from .server import reload_gateway

    log = logging.getLogger("relayrace.admin")
    path = operations.config_path
    if path is None:
        log.warning("SIGHUP: no config file to reload")
        return
    log.info("SIGHUP: reloading %s", path)
    try:
        await reload_gateway(sup, path, settings, operations.overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, nothing changed: %s: %s", path, problem)
    except RuntimeError as exc:
        log.error("reload refused: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
