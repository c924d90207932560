"""Workload 3: ``serve`` (websocket + OpenAI-compatible HTTP) under many concurrent clients,
against going direct to the mock.

Three processes: the mock, the gateway (a supervisor with two OpenAI providers on the mock,
served by ``relayrace.server.serve``), and the load worker (trio: httpx clients and
trio-websocket clients). Closed loop (``clients`` clients, each one request after another) for
throughput, then open loop at a fixed rate for latency: a request starts at its scheduled time
whether or not earlier ones finished, and its latency counts from that time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from ._common import API_KEY, MESSAGES, ROUTE, BenchError, cpu_seconds_of, summarise_ms
from ._procs import Runner

_GATEWAY_CODE = "from relayrace.bench._gateway import gateway_main; gateway_main()"


# --- the gateway process ------------------------------------------------------------------------


def gateway_main() -> None:
    """Serve a bench supervisor until SIGTERM; print ``{"http": ..., "ws": ...}`` once up."""
    from ._common import raise_fd_limit

    raise_fd_limit()
    spec = json.loads(sys.argv[1])
    trio.run(_serve_gateway, spec)


async def _serve_gateway(spec: dict[str, Any]) -> None:
    from ..server import ServerSettings, serve
    from ..supervisor import open_supervisor
    from ._trio_load import relay_config

    config = relay_config(spec["url"], spec["models"], spec["concurrency"])
    settings = ServerSettings(
        ws_port=0,
        http_port=0,
        max_in_flight_per_connection=spec["concurrency"],
        max_connections=max(1024, spec["concurrency"]),
        shutdown_grace=0.5,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_supervisor(config) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            print(json.dumps({"http": server.http_url, "ws": server.ws_url}), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# --- the load worker's job ----------------------------------------------------------------------

OneCall = Callable[[], Awaitable[float | None]]


def _sse_body(model: str) -> bytes:
    body = {
        "model": model,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _http_call(client: httpx.AsyncClient, url: str, model: str) -> OneCall:
    body = _sse_body(model)
    headers = {"content-type": "application/json", "accept": "text/event-stream"}

    async def one() -> float | None:
        first = None
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}")
            done = False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif first is None and line.startswith("data: ") and '"content"' in line:
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
            if not done:
                raise RuntimeError("the stream ended without [DONE]")
        return first

    return one


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
            if entry is None:
                continue
            event, box = entry
            kind = frame["type"]
            if kind == "delta" and box[1] is None:
                box[1] = time.perf_counter()
            elif kind in ("done", "error"):
                box[0] = kind
                event.set()

    async def call(self) -> float | None:
        self.next_id += 1
        request_id = self.next_id
        event = trio.Event()
        box: list[Any] = [None, None]
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
        if box[0] != "done":
            raise RuntimeError("error frame")
        first: float | None = box[1]
        return first


def _result(
    latencies: list[float], firsts: list[float], failed: int, wall: float, cpu: float | None
) -> dict[str, Any]:
    total = len(latencies) + failed
    return {
        "requests": total,
        "ok": len(latencies),
        "failed": failed,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else None,
        "latency_ms": summarise_ms(latencies),
        "first_delta_ms": summarise_ms(firsts),
        "gateway_cpu_us_per_request": cpu / total * 1e6 if cpu is not None and total else None,
    }


async def _closed_loop(calls: list[OneCall], seconds: float) -> tuple[list[float], list[float], int, float]:
    latencies: list[float] = []
    firsts: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds

    async def client(one: OneCall) -> None:
        nonlocal failed
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                first = await one()
            except Exception:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)
            if first is not None:
                firsts.append(first - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for one in calls:
            nursery.start_soon(client, one)
    return latencies, firsts, failed, time.perf_counter() - started


async def _open_loop(
    calls: list[OneCall], rate: float, seconds: float
) -> tuple[list[float], list[float], int, float]:
    latencies: list[float] = []
    firsts: list[float] = []
    failed = 0
    total = int(rate * seconds)

    async def request(one: OneCall, due: float) -> None:
        nonlocal failed
        try:
            first = await one()
        except Exception:
            failed += 1
            return
        latencies.append(time.perf_counter() - due)
        if first is not None:
            firsts.append(first - due)

    began = time.perf_counter()
    trio_began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(total):
            await trio.sleep_until(trio_began + i / rate)
            nursery.start_soon(request, calls[i % len(calls)], began + i / rate)
    return latencies, firsts, failed, time.perf_counter() - began


async def gateway_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    from trio_websocket import open_websocket_url

    clients, seconds, rate = job["clients"], job["seconds"], job["rate"]
    gateway_pid = job["gateway_pid"]
    direct_model = job["models"][0]
    limits = httpx.Limits(max_connections=clients * 4, max_keepalive_connections=clients * 4)
    timeout = httpx.Timeout(connect=30.0, read=None, write=10.0, pool=None)
    out: dict[str, Any] = {"closed": {"clients": clients, "seconds": seconds, "paths": {}}}
    rate_out: dict[str, Any] = {"rate": rate, "seconds": seconds}
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        direct = _http_call(client, f"{url}/v1/chat/completions", direct_model)
        through = _http_call(client, f"{job['http']}/v1/chat/completions", ROUTE)
        async with trio.open_nursery() as readers:
            ws_clients = []
            for _ in range(clients):
                ws = await readers.start(_ws_connection, open_websocket_url, job["ws"])
                ws_clients.append(_WsClient(ws))
                readers.start_soon(ws_clients[-1].read)
            paths: dict[str, list[OneCall]] = {
                "direct": [direct] * clients,
                "http": [through] * clients,
                "ws": [c.call for c in ws_clients],
            }
            for calls in paths.values():  # warm up every path and its connections
                await _closed_loop(calls, 0.3)
            for name, calls in paths.items():
                cpu = cpu_seconds_of(gateway_pid)
                lat, first, failed, wall = await _closed_loop(calls, seconds)
                cpu_end = cpu_seconds_of(gateway_pid)
                used = cpu_end - cpu if cpu is not None and cpu_end is not None and name != "direct" else None
                out["closed"]["paths"][name] = _result(lat, first, failed, wall, used)
            for name, calls in paths.items():
                cpu = cpu_seconds_of(gateway_pid)
                lat, first, failed, wall = await _open_loop(calls, rate, seconds)
                cpu_end = cpu_seconds_of(gateway_pid)
                used = cpu_end - cpu if cpu is not None and cpu_end is not None and name != "direct" else None
                rate_out[name] = _result(lat, first, failed, wall, used)
            readers.cancel_scope.cancel()
    base = rate_out["direct"]["latency_ms"]
    for name in ("http", "ws"):
        mine = rate_out[name]["latency_ms"]
        if base and mine:
            rate_out[name]["p50_overhead_ms"] = mine["p50"] - base["p50"]
            rate_out[name]["p99_overhead_ms"] = mine["p99"] - base["p99"]
    out["rate"] = rate_out
    return out


def run_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run the gateway job in a fresh trio loop (in the load worker)."""
    return trio.run(gateway_job, url, job)


async def _ws_connection(
    open_url: Any, url: str, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """Hold one websocket connection open in the readers' nursery (which owns its lifetime)."""
    async with open_url(url, extra_headers=[("authorization", f"Bearer {API_KEY}")]) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


# --- orchestration ------------------------------------------------------------------------------


def run_gateway_workload(runner: Runner) -> dict[str, Any]:
    p = runner.params["gateway"]
    tag = runner.tag("gw")
    models = [f"ok,chunks={p['chunks']},tag={tag}-p", f"ok,chunks={p['chunks']},tag={tag}-s"]
    concurrency = max(256, p["clients"] * 4)
    spec = json.dumps({"url": runner.url, "models": models, "concurrency": concurrency})
    with tempfile.TemporaryFile(mode="w+") as errors:
        gateway = subprocess.Popen(
            [sys.executable, "-c", _GATEWAY_CODE, spec],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert gateway.stdout is not None
            line = gateway.stdout.readline()
            if not line.startswith("{"):
                gateway.wait(timeout=10)
                errors.seek(0)
                raise BenchError(f"the gateway did not start: {errors.read()[-2000:]}")
            where = json.loads(line)
            job = {
                "kind": "gateway",
                "http": where["http"],
                "ws": where["ws"],
                "gateway_pid": gateway.pid,
                "models": models,
                "clients": p["clients"],
                "rate": p["rate"],
                "seconds": p["seconds"],
            }
            (result,) = runner.run(
                "trio",
                [job],
                [p["seconds"] * 3 * 2 + 3],
                [f"gateway: {p['clients']} clients per path, then {p['rate']} req/s"],
            )
        finally:
            gateway.terminate()
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
            if gateway.stdout is not None:
                gateway.stdout.close()
    if result is None or "error" in result:
        return {"summary": None, "error": result}
    return {"summary": result, "parameters": p | {"models": models}}
