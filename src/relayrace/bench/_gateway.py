"""Workload 3, ``gateway``: each path as its users meet it, side by side in one run.

Paths: the mock direct, ``relayrace serve`` over HTTP, the same process's websocket endpoint,
and LiteLLM's proxy server — every one in front of the same mock, asked the same thing (the
mock answering ``ok,chunks=N``), non-streamed and streamed. The HTTP paths are driven by
``wrk`` (see ``_wrk``); the websocket by this module's trio load generator, in a worker process.

Runs, per path and mode: sequential (c=1, a fixed count: the figure published overhead
numbers are given as), closed loop at c=1 and c=32 for a fixed time, and a paced open-loop run.
Each reports p50/p99 latency and their overhead over the direct path in the same run, req/s,
and the gateway process's CPU (user + sys, from /proc, its forked workers included) per
request.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._common import MESSAGES, ROUTE, BenchError, summarise_ms, tree_cpu_seconds
from ._gwprocs import Gateway, Usage, litellm_proxy, pid_listening, relayrace_serve
from ._procs import Runner
from ._wrk import WRK_MISSING, find_wrk, run_wrk

#: The runs of every path and mode, in the order they are made.
RUNS = ("sequential", "c1", "c32", "rate")
MODES = ("non-streamed", "streamed")
PATHS = ("direct", "http", "http-w2", "ws", "litellm")
_TOKEN_ENV = "RELAYRACE_BENCH_WS_TOKEN"

# --- the websocket load (in a worker process) ---------------------------------------------------

OneCall = Callable[[], Awaitable[None]]


class _WsClient:
    """One websocket connection carrying many requests, matched to their frames by id."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.next_id = 0

    async def read(self) -> None:
        while True:
            frame = json.loads(await self.ws.get_message())
            entry = self.pending.get(frame.get("id"))
            if entry is not None and frame["type"] in ("done", "error"):
                entry[1].append(frame["type"])
                entry[0].set()

    async def call(self) -> None:
        self.next_id += 1
        request_id = self.next_id
        event = trio.Event()
        box: list[Any] = []
        self.pending[request_id] = (event, box)
        try:
            await self.ws.send_message(
                json.dumps(
                    {"type": "request", "id": request_id, "model": ROUTE, "messages": MESSAGES}
                )
            )
            await event.wait()
        finally:
            del self.pending[request_id]
        if box != ["done"]:
            raise RuntimeError("error frame")


async def _closed_loop(
    calls: Sequence[OneCall], seconds: float, count: int
) -> tuple[list[float], int, float]:
    """Each call in ``calls`` one request after another, for ``seconds`` or until ``count``
    requests (0: no count) have started."""
    latencies: list[float] = []
    failed = 0
    started_count = 0
    stop = time.perf_counter() + seconds

    async def client(one: OneCall) -> None:
        nonlocal failed, started_count
        while time.perf_counter() < stop and (not count or started_count < count):
            started_count += 1
            started = time.perf_counter()
            try:
                await one()
            except Exception:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for one in calls:
            nursery.start_soon(client, one)
    return latencies, failed, time.perf_counter() - began


async def _paced(
    calls: Sequence[OneCall], rate: float, seconds: float
) -> tuple[list[float], int, float]:
    """As wrk's paced run: one schedule (a slot every 1/rate s) shared by the connections, each
    taking the next slot when it is free, waiting for it, then sending; latency from the send
    (so at most ``len(calls)`` requests in flight, as wrk's connections)."""
    latencies: list[float] = []
    failed = 0
    slots = int(rate * seconds)
    taken = 0
    began = trio.current_time()

    async def connection(one: OneCall) -> None:
        nonlocal failed, taken
        while taken < slots:
            slot = taken
            taken += 1
            await trio.sleep_until(began + slot / rate)
            started = time.perf_counter()
            try:
                await one()
            except Exception:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)

    wall = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for one in calls:
            nursery.start_soon(connection, one)
    return latencies, failed, time.perf_counter() - wall


async def _ws_job(job: dict[str, Any]) -> dict[str, Any]:
    from trio_websocket import open_websocket_url

    headers = [("authorization", f"Bearer {os.environ[_TOKEN_ENV]}")]
    out: dict[str, Any] = {}
    async with trio.open_nursery() as readers:
        clients: list[_WsClient] = []
        for _ in range(max(run["connections"] for run in job["runs"])):
            ws = await readers.start(_ws_connection, open_websocket_url, job["ws"], headers)
            clients.append(_WsClient(ws))
            readers.start_soon(clients[-1].read)
        await _closed_loop([c.call for c in clients], job["warmup"], 0)
        for run in job["runs"]:
            calls = [c.call for c in clients[: run["connections"]]]
            cpu = tree_cpu_seconds(job["gateway_pid"])
            if run["rate"]:
                lat, failed, wall = await _paced(calls, run["rate"], run["seconds"])
            else:
                lat, failed, wall = await _closed_loop(calls, run["seconds"], run["requests"])
            cpu_end = tree_cpu_seconds(job["gateway_pid"])
            out[run["name"]] = {
                "requests": len(lat) + failed,
                "ok": len(lat),
                "failed": failed,
                "wall_s": round(wall, 3),
                "throughput_rps": round(len(lat) / wall, 1) if wall > 0 else None,
                "latency_ms": summarise_ms(lat),
                "latency_source": "trio",
                "gateway_cpu_s": cpu_end - cpu if cpu is not None and cpu_end is not None else None,
            }
        readers.cancel_scope.cancel()
    return out


def run_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run the websocket job in a fresh trio loop (in the load worker)."""
    return trio.run(_ws_job, job)


async def _ws_connection(
    open_url: Any,
    url: str,
    headers: list[tuple[str, str]],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold one websocket connection open in the readers' nursery (which owns its lifetime)."""
    async with open_url(url, extra_headers=headers) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


# --- orchestration ------------------------------------------------------------------------------


def _body(model: str, streamed: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if streamed:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _run_specs(p: dict[str, Any]) -> list[dict[str, Any]]:
    """What each run is: connections, seconds, a count (sequential), an offered rate."""
    return [
        {
            "name": "sequential",
            "connections": 1,
            "seconds": 600.0,
            "requests": p["sequential"],
            "rate": 0,
        },
        {"name": "c1", "connections": 1, "seconds": p["seconds"], "requests": 0, "rate": 0},
        {
            "name": "c32",
            "connections": p["clients"],
            "seconds": p["seconds"],
            "requests": 0,
            "rate": 0,
        },
        {
            "name": "rate",
            "connections": p["rate_connections"],
            "seconds": p["seconds"],
            "requests": 0,
            "rate": p["rate"],
        },
    ]


def run_weight(p: dict[str, Any], run: str) -> float:
    """Rough seconds a run takes, for the progress bar only."""
    return p["sequential"] * 0.004 if run == "sequential" else p["seconds"]


def workload_weight(p: dict[str, Any]) -> float:
    """Rough seconds of the whole workload, for the progress bar only."""
    per_path = sum(run_weight(p, run) for run in RUNS)
    http_paths = 3 if p["litellm"] else 2
    return (
        len(MODES) * http_paths * (per_path + p["warmup"])
        + len(MODES) * (run_weight(p, "c32") + p["warmup"])  # serve --workers 2
        + per_path
        + 3
        + (60 if p["litellm"] else 0)
    )


def _row(
    path: str,
    mode: str,
    spec: dict[str, Any],
    result: dict[str, Any],
    used: dict[str, float | None],
) -> dict[str, Any]:
    """One run's row. ``used``: CPU seconds of the gateway, the mock and wrk during the run
    (``None``: not measured), and the cores the machine left idle."""
    requests = result["requests"]
    row = {
        "path": path,
        "mode": mode,
        "run": spec["name"],
        "connections": spec["connections"],
        "offered_rps": spec["rate"] or None,
    } | {k: v for k, v in result.items() if k != "gateway_cpu_s"}
    for who in ("gateway", "mock", "wrk"):
        cpu = used.get(f"{who}_cpu_s")
        row[f"{who}_cpu_ms_per_request"] = (
            round(cpu / requests * 1e3, 4) if cpu is not None and requests else None
        )
    row["machine_idle_cores"] = used.get("machine_idle_cores")
    return row


def _wrk_path(
    wrk: str,
    gateway: Gateway | None,
    mock_url: str,
    model: str,
    mode: str,
    spec: dict[str, Any],
    mock_pid: int | None = None,
) -> tuple[dict[str, Any], dict[str, float | None]]:
    streamed = mode == "streamed"
    if gateway is None:
        url, token, body, pid = (
            f"{mock_url}/v1/chat/completions",
            "sk-bench",
            _body(model, streamed),
            None,
        )
    else:
        url, token, body = (
            f"{gateway.http_url}/v1/chat/completions",
            gateway.token,
            _body(ROUTE, streamed),
        )
        pid = gateway.pid
    before, start = Usage.now(pid, mock_pid), time.perf_counter()
    result = run_wrk(
        wrk,
        url,
        body,
        streamed=streamed,
        key=token,
        connections=spec["connections"],
        seconds=spec["seconds"],
        stop_after=spec["requests"],
        rate=spec["rate"],
    )
    return result, before.until(Usage.now(pid, mock_pid), time.perf_counter() - start)


def _add_overheads(rows: list[dict[str, Any]]) -> None:
    direct = {(r["mode"], r["run"]): r for r in rows if r["path"] == "direct"}
    for row in rows:
        base = direct.get((row["mode"], row["run"]))
        if (
            row["path"] == "direct"
            or base is None
            or not base["latency_ms"]
            or not row["latency_ms"]
        ):
            continue
        row["p50_overhead_ms"] = round(row["latency_ms"]["p50"] - base["latency_ms"]["p50"], 4)
        row["p99_overhead_ms"] = round(row["latency_ms"]["p99"] - base["latency_ms"]["p99"], 4)


def run_gateway_workload(runner: Runner) -> dict[str, Any]:
    p = runner.params["gateway"]
    wrk = find_wrk()
    if wrk is None:
        print(f"relayrace bench: {WRK_MISSING}", flush=True)
        return {"summary": None, "skipped": WRK_MISSING}
    model = f"ok,chunks={p['chunks']}"
    specs = _run_specs(p)
    paths: dict[str, dict[str, Any]] = {name: {"available": True, "reason": None} for name in PATHS}
    rows: list[dict[str, Any]] = []
    runner.progress.start(
        "gateway: starting relayrace serve" + (" and LiteLLM's proxy" if p["litellm"] else "")
    )
    runner.progress.advance(60 if p["litellm"] else 0)
    with contextlib.ExitStack() as stack:
        serve = stack.enter_context(relayrace_serve(runner.url, model, max(256, p["clients"] * 4)))
        # `serve --workers 2`, measured at c=32 only (issue #13: a second worker adds ≥ 50 %).
        serve2 = stack.enter_context(
            relayrace_serve(runner.url, model, max(256, p["clients"] * 4), workers=2)
        )
        litellm: Gateway | None = None
        if not p["litellm"]:
            paths["litellm"] = {
                "available": False,
                "reason": "left out (--no-litellm, or LiteLLM not installed)",
            }
        else:
            try:
                litellm = stack.enter_context(litellm_proxy(runner.url, model))
            except BenchError as exc:
                paths["litellm"] = {"available": False, "reason": str(exc)}
                print(f"relayrace bench: skipping LiteLLM's proxy: {exc}", flush=True)
        http_paths = {"direct": None, "http": serve, "http-w2": serve2} | (
            {"litellm": litellm} if litellm else {}
        )
        warm = {
            "name": "warmup",
            "connections": 4,
            "seconds": p["warmup"],
            "requests": 0,
            "rate": 0,
        }
        # --workers 2: as many connections as its run, so that SO_REUSEPORT's hash gives each
        # worker some (four may all land on one, leaving the other cold).
        warm2 = warm | {"connections": p["clients"]}
        # The mock's CPU per request too, and the idle cores: what a second worker could use.
        mock_pid = pid_listening(int(runner.url.rsplit(":", 1)[1]))
        for mode in MODES:
            for name, gateway in http_paths.items() if p["warmup"] > 0 else ():
                spec = warm2 if name == "http-w2" else warm
                _wrk_path(wrk, gateway, runner.url, model, mode, spec)  # warm up path and pools
            for spec in specs:
                for name, gateway in http_paths.items():
                    if name == "http-w2" and spec["name"] != "c32":
                        continue
                    result, used = _wrk_path(wrk, gateway, runner.url, model, mode, spec, mock_pid)
                    rows.append(_row(name, mode, spec, result, used))
                    runner.progress.advance(run_weight(p, spec["name"]), f"gateway: {mode}, {name}")
                if litellm is not None and spec["name"] == "rate":
                    time.sleep(2.0)  # let an overrun proxy drain before the next run
        job = {
            "kind": "gateway",
            "ws": serve.ws_url,
            "gateway_pid": serve.pid,
            "warmup": p["warmup"],
            "runs": specs,
        }
        # The token goes to the worker in its environment, never in the job (which an error
        # report would copy into the results).
        os.environ[_TOKEN_ENV] = serve.token
        try:
            (ws_result,) = runner.run(
                "trio",
                [job],
                [sum(run_weight(p, r) for r in RUNS) + 3],
                ["gateway: websocket, streamed"],
            )
        finally:
            del os.environ[_TOKEN_ENV]
        if ws_result is None or "error" in ws_result:
            paths["ws"] = {"available": False, "reason": json.dumps(ws_result)[:500]}
        else:
            for spec in specs:
                got = ws_result[spec["name"]]
                rows.append(
                    _row("ws", "streamed", spec, got, {"gateway_cpu_s": got["gateway_cpu_s"]})
                )
    _add_overheads(rows)
    summary = {"paths": paths, "rows": rows, "model": model, "cores": os.cpu_count()}
    return {"summary": summary, "parameters": p}
