"""Workload 7, ``state``: what the shared state (issue #16, ``[state] backend = "redis"``) costs
per request, and how fast a bench made by one process reaches another.

**Cost.** A throwaway ``redis-server`` (free loopback port, no persistence, stopped after) and
two ``relayrace serve --workers 2`` started side by side with the same config but for
``[state] backend``: ``"local"`` and ``"redis"``. Each is driven by ``wrk`` at c=32,
non-streamed and streamed, in four scenarios:

- ``healthy``: one healthy provider; the shared state mostly answers mirror reads (and counts
  requests for the fleet's retry budget);
- ``failing``: the route's first provider answers 503 to every request and is exempt from
  benching, so every request fails over and counts a failure: the fleet's count passes the
  threshold and stays past it (those failures are sent once a second, not announced);
- ``flapping``: the first provider, exempt too, is down (503) for 20 ms and up for 20 ms in
  turn: about half the requests fail over, and the fleet's count reaches the threshold and is
  reset ~25 times a second (each change sent within 0.1 s and announced): the most the
  failure counts cost;
- ``outage``: the first provider answers 503 to every request and is benched (3 failures, then
  0.1 s benches, a probe each 0.1 s under the fleet's probe lease): benches, leases and
  failure counts written as in a real outage.

A third gateway, ``local-aa``, is a second ``"local"`` one: the A/A control. The three runs of
each scenario and mode are interleaved (their order rotates through the six permutations),
repeated (``--repeats``, default 3), and the cost is the ratio redis / local of the gateway's
CPU per request (the parent and its workers, from /proc) within each triple of runs; the same
ratio local-aa / local is the noise floor, printed beside it. Both as the median of the
triples with its spread (min, max). redis-server's own CPU is measured separately and
reported beside it, not counted in the gateway's.

**Propagation.** Two processes, each with its own ``RedisState`` on the same Redis: this one
benches a deployment and notes the wall clock; the other spins on its mirror (a trio checkpoint
between reads: no polling interval, a few µs of resolution) and notes the wall clock when it
sees the bench. Same host, same clock: the difference is the propagation time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import trio

from ._common import (
    MESSAGES,
    ROUTE,
    BenchError,
    cpu_seconds_of,
    summarise_ms,
    tree_cpu_seconds,
)
from ._gwprocs import Gateway, relayrace_serve
from ._procs import Runner
from ._statereport import summarise_state
from ._wrk import find_wrk, run_wrk

SCENARIOS = ("healthy", "failing", "flapping", "outage")
MODES = ("non-streamed", "streamed")
BACKENDS = ("local", "redis")
#: The A/A control: a second gateway with ``backend = "local"``, run like the other two.
CONTROL = "local-aa"
GATEWAYS = (*BACKENDS, CONTROL)
#: The orders the three gateways' runs take, in turn (each position equally often).
_ORDERS = list(itertools.permutations(GATEWAYS))
#: The route each scenario's requests ask for.
_ROUTES = {"healthy": ROUTE, "failing": "failing", "flapping": "flapping", "outage": "outage"}

WRK_MISSING = (
    "wrk not found on PATH (Debian/Ubuntu: `sudo apt-get install wrk`; macOS: `brew install wrk`)"
)
REDIS_MISSING = (
    "redis-server not found on PATH (Debian/Ubuntu: `sudo apt-get install redis-server`; "
    "macOS: `brew install redis`; Valkey's `valkey-server` is not looked for)"
)
COREDIS_MISSING = "coredis is not installed (pip install 'relayrace[redis]')"


def state_params(quick: bool, requests: int | None, repeats: int | None = None) -> dict[str, Any]:
    """The workload's parameters for a quick or full run (``requests``: a count per run;
    ``repeats``: triples of runs per scenario and mode, default 1 quick, 3 full)."""
    return {
        "repeats": repeats or (1 if quick else 3),
        "seconds": 1.0 if quick else 4.0,
        "requests": requests or 0,
        "clients": 32,
        "warmup": 0.0 if quick else 1.0,
        "benches": 20 if quick else 300,
        "scenarios": list(SCENARIOS),
    }


def state_weight(p: dict[str, Any]) -> float:
    """Rough seconds of the workload, for the progress bar only."""
    runs = p["repeats"] * len(p["scenarios"]) * len(MODES) * len(GATEWAYS)
    return runs * p["seconds"] + 10 + p["benches"] * 0.01


def missing() -> list[str]:
    """What the workload needs and this machine lacks (it installs nothing)."""
    lacks = []
    if find_wrk() is None:
        lacks.append(WRK_MISSING)
    if shutil.which("redis-server") is None:
        lacks.append(REDIS_MISSING)
    if importlib.util.find_spec("coredis") is None:
        lacks.append(COREDIS_MISSING)
    return lacks


# --- redis-server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_process(executable: str) -> Iterator[tuple[str, int]]:
    """A throwaway ``redis-server`` on a free loopback port, no persistence; yields
    ``(url, pid)`` once it answers PING, and stops it afterwards."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(
            [executable, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
            + ["--appendonly", "no", "--dir", folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not _pong(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"redis-server did not start (exit {process.poll()})")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0", process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def redis_calls(url: str) -> dict[str, int] | None:
    """How often the Redis at ``url`` has run each command since it started (``INFO
    commandstats``, asked over a plain socket), ``INFO`` itself left out. Commands that scripts
    run (``redis.call``) are counted as well as the ``EVALSHA`` that ran them."""
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"INFO commandstats\r\n")
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_end(data):
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    calls = {}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("cmdstat_") and ":calls=" in line:
            name, stats = line[len("cmdstat_") :].split(":", 1)
            if name != "info":
                calls[name] = int(stats.split(",", 1)[0].removeprefix("calls="))
    return calls


def _bulk_end(data: bytes) -> int:
    """Where the RESP bulk string at the start of ``data`` ends (header, body, CRLF)."""
    header, _, _ = data.partition(b"\r\n")
    return len(header) + 2 + int(header[1:]) + 2


def _settled(url: str, quiet: float = 0.05, most: float = 2.0) -> dict[str, int] | None:
    """Redis's command counts once it has run none for ``quiet`` seconds (or after ``most``)."""
    last = redis_calls(url)
    deadline = time.monotonic() + most
    while last is not None and time.monotonic() < deadline:
        time.sleep(quiet)
        now = redis_calls(url)
        if now is None or now == last:
            return now
        last = now
    return last


def _commands(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What Redis ran between two counts: ``all`` (scripts' own commands included) and
    ``scripts``."""
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    scripts = sum(delta.get(k, 0) for k in ("evalsha", "eval", "evalsha_ro", "eval_ro"))
    return {"all": sum(delta.values()), "scripts": scripts}


def _per_request(
    before: dict[str, int] | None, after: dict[str, int] | None, requests: int
) -> tuple[float | None, float | None]:
    """Commands (all, scripts' own included) and scripts run per request between two counts."""
    if before is None or after is None or not requests:
        return None, None
    ran = _commands(before, after)
    return round(ran["all"] / requests, 3), round(ran["scripts"] / requests, 3)


# --- the gateways -------------------------------------------------------------------------------


def _provider(name: str, mock_url: str, model: str, concurrency: int, exempt: bool) -> str:
    return f"""
[[providers]]
name = "{name}"
kind = "openai"
model = {json.dumps(model)}
base_url = {json.dumps(mock_url + "/v1")}
api_key_env = "RELAYRACE_BENCH_UPSTREAM_KEY"
max_concurrency = {concurrency}
inbox_size = {max(256, concurrency)}
exempt = {"true" if exempt else "false"}
"""


def extra_toml(backend: str, redis_url: str, prefix: str, mock_url: str, concurrency: int) -> str:
    """What the state workload adds to the gateway workload's config: the failing providers and
    their routes, the policies, and ``[state]`` (the only line that differs between the two)."""
    state = (
        f'backend = "redis"\nurl = {json.dumps(redis_url)}\nprefix = {json.dumps(prefix)}'
        if backend == "redis"
        else 'backend = "local"'
    )
    return (
        _provider("down", mock_url, "unavailable,tag=down", concurrency, exempt=True)
        + _provider("outage", mock_url, "unavailable,tag=outage", concurrency, exempt=False)
        + _provider("flap", mock_url, "flapping,down=0.02,up=0.02", concurrency, exempt=True)
        + """
[[routes]]
model = "failing"
chain = ["down", "mock"]

[[routes]]
model = "outage"
chain = ["outage", "mock"]

[[routes]]
model = "flapping"
chain = ["flap", "mock"]

[policies.retry]
max_attempts = 1

[policies.health]
failure_threshold = 3
cooldown_base = 0.1
cooldown_cap = 0.1
probe_interval = 0.1

[state]
"""
        + state
        + "\n"
    )


def _body(route: str, streamed: bool) -> bytes:
    body: dict[str, Any] = {"model": route, "messages": MESSAGES}
    if streamed:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _drive(
    wrk: str, gateway: Gateway, redis: tuple[str, int], scenario: str, mode: str, p: dict[str, Any]
) -> dict[str, Any]:
    """One wrk run against ``gateway``; its figures, the CPU both processes spent, and the
    commands Redis processed meanwhile."""
    redis_url, redis_pid = redis
    calls = redis_calls(redis_url)
    cpu, redis_cpu = tree_cpu_seconds(gateway.pid), cpu_seconds_of(redis_pid)
    result = run_wrk(
        wrk,
        f"{gateway.http_url}/v1/chat/completions",
        _body(_ROUTES[scenario], mode == "streamed"),
        streamed=mode == "streamed",
        key=gateway.token,
        connections=p["clients"],
        seconds=p["seconds"],
        stop_after=p["requests"],
    )
    # The writes a redis gateway queued during the run reach Redis in the background: they
    # belong to this run (not to the next one), so the end is read once Redis has settled.
    calls_end = _settled(redis_url)
    cpu_end, redis_end = tree_cpu_seconds(gateway.pid), cpu_seconds_of(redis_pid)
    requests = result["requests"]
    commands, scripts = _per_request(calls, calls_end, requests)

    def per_request(start: float | None, end: float | None) -> float | None:
        if start is None or end is None or not requests:
            return None
        return round((end - start) / requests * 1e3, 4)

    return result | {
        "scenario": scenario,
        "mode": mode,
        "gateway_cpu_ms_per_request": per_request(cpu, cpu_end),
        "redis_cpu_ms_per_request": per_request(redis_cpu, redis_end),
        "redis_commands_per_request": commands,
        "redis_scripts_per_request": scripts,
    }


def _cost_runs(runner: Runner, wrk: str, redis_url: str, redis_pid: int) -> list[dict[str, Any]]:
    redis = (redis_url, redis_pid)
    p = runner.params["state"]
    model = f"ok,chunks={runner.params['chunks']}"
    concurrency = max(256, p["clients"] * 4)
    prefix = "relayrace-bench-" + secrets.token_hex(4)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        runner.progress.start("state: starting relayrace serve --workers 2: local, redis, local")
        gateways = {
            name: stack.enter_context(
                relayrace_serve(
                    runner.url,
                    model,
                    concurrency,
                    workers=2,
                    extra_toml=extra_toml(
                        "local" if name == CONTROL else name,
                        redis_url,
                        prefix,
                        runner.url,
                        concurrency,
                    ),
                )
            )
            for name in GATEWAYS
        }
        runner.progress.advance(5)
        # Warm every path (workers up, pools open, Redis reached): for ``warmup`` seconds, or
        # (quick) a count, at the measured concurrency so that both workers get connections.
        warm = p | {"seconds": p["warmup"] or 30.0, "requests": 0 if p["warmup"] else 64}
        for gateway in gateways.values():
            for scenario in p["scenarios"]:
                _drive(wrk, gateway, redis, scenario, "non-streamed", warm)
        for repeat in range(p["repeats"]):
            for turn, (scenario, mode) in enumerate(itertools.product(p["scenarios"], MODES)):
                # Each scenario and mode moves one permutation on per repeat.
                for backend in _ORDERS[(turn + repeat) % len(_ORDERS)]:
                    row = _drive(wrk, gateways[backend], redis, scenario, mode, p)
                    rows.append(row | {"backend": backend, "repeat": repeat})
                    runner.progress.advance(p["seconds"], f"state: {scenario} {mode}, {backend}")
    return rows


# --- propagation ----------------------------------------------------------------------------------

_OBSERVER_CODE = "from relayrace.bench._state import observer_main; observer_main()"


def observer_main() -> None:
    """The observing process: ``<url> <prefix> <count>``; prints ``ready``, then a line
    ``<i> <wall>`` as it first sees each bench ``m<i>`` (i from -1: the warm-up) in its mirror."""
    url, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trio.run(_observe, url, prefix, count)


def _config(url: str, prefix: str) -> Any:
    from ..state import StateConfig

    return StateConfig(backend="redis", url=url, prefix=prefix)


async def _observe(url: str, prefix: str, count: int) -> None:
    from ..state import Deployment, open_state

    async with open_state(_config(url, prefix)) as state:
        mirror = state.mirror
        print("ready", flush=True)
        for i in range(-1, count):
            deployment = Deployment("bench", f"m{i}")
            while True:
                now = time.time()
                if mirror.bench(deployment, now) is not None:
                    break
                await trio.lowlevel.checkpoint()  # the reader task runs; no timer involved
            print(f"{i} {now:.6f}", flush=True)


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream):
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                raise BenchError("the observing process ended early")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()


async def _propagation(url: str, count: int) -> dict[str, Any]:
    from ..state import Deployment, open_state

    prefix = "relayrace-bench-prop-" + secrets.token_hex(4)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _OBSERVER_CODE, url, prefix, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    lines = _Lines(process.stdout)
    delays: list[float] = []
    try:
        async with open_state(_config(url, prefix)) as state:
            with trio.fail_after(60):
                if await lines.next() != "ready":
                    raise BenchError("the observing process did not start")
            for i in range(-1, count):
                started = time.time()
                state.bench(Deployment("bench", f"m{i}"), until=started + 600, reason="bench")
                with trio.fail_after(10):
                    index, seen = (await lines.next()).split()
                if int(index) != i:
                    raise BenchError(f"the observer saw bench {index}, expected {i}")
                if i >= 0:  # m-1 is the warm-up (the observer may not be subscribed yet)
                    delays.append(float(seen) - started)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        await process.stdout.aclose()
    ms = summarise_ms(delays)
    return {
        "benches": len(delays),
        "latency_ms": ms,
        "resolution": "the observer spins on its mirror with a trio checkpoint between reads: microseconds",
    }


# --- the workload ---------------------------------------------------------------------------------


def run_state_workload(runner: Runner) -> dict[str, Any]:
    p = runner.params["state"]
    lacks = missing()
    if lacks:
        reason = "; ".join(lacks) + "; skipping the state workload"
        print(f"relayrace bench: {reason}", flush=True)
        return {"summary": None, "skipped": reason, "parameters": p}
    wrk, redis = find_wrk(), shutil.which("redis-server")
    assert wrk is not None and redis is not None
    with redis_process(redis) as (url, pid):
        before = redis_calls(url)
        rows = _cost_runs(runner, wrk, url, pid)
        # Only the redis gateway talks to Redis in that part: what it ran there in all (start,
        # warm-up, runs and the writes it defers past a run's end).
        after = _settled(url)
        commands = None if before is None or after is None else _commands(before, after)
        runner.progress.start("state: bench propagation between two processes")
        propagation = trio.run(_propagation, url, p["benches"])
        runner.progress.advance(p["benches"] * 0.01 + 5)
    return {
        "summary": {"rows": summarise_state(rows), "propagation": propagation},
        "runs": rows,
        "redis_commands": commands,
        "parameters": p,
        "redis_server": _redis_version(redis),
    }


def _redis_version(executable: str) -> str | None:
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())
