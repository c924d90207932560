"""Throughput self-check of the mock provider: requests/s with one ``httpx.AsyncClient``.

The mock runs in its own process (``main`` of ``relayrace.testing._mock_provider``), so the
client and the server do not share a CPU core; the server's own CPU time per request is read
from ``/proc`` (Linux) and gives the rate the mock could serve on one core.

    .venv/bin/python benchmarks/mock_throughput.py [--requests N] [--concurrency C]
        [--in-process] [--url URL]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import trio

from relayrace.testing import serve_mock_provider

BODY = {"model": "ok", "messages": [{"role": "user", "content": "hello there"}]}
STREAM_BODY = {**BODY, "model": "ok,chunks=10", "stream": True}
ANTHROPIC_STREAM = {**STREAM_BODY, "max_tokens": 100}


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, from /proc; ``None`` where unavailable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_load(
    client: httpx.AsyncClient, one: Callable[[], Awaitable[None]], n: int, concurrency: int
) -> float:
    """Run ``n`` requests over ``concurrency`` tasks; return the elapsed seconds."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return trio.current_time() - start


async def bench(url: str, server_pid: int | None, n: int, concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def whole() -> None:
            response = await client.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text

        async def openai_stream() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=STREAM_BODY) as r:
                assert r.status_code == 200
                await r.aread()

        async def anthropic_stream() -> None:
            async with client.stream("POST", "/v1/messages", json=ANTHROPIC_STREAM) as r:
                assert r.status_code == 200
                await r.aread()

        await run_load(client, whole, 200, concurrency)  # warm up: connections, caches
        for name, one in [
            ("openai JSON", whole),
            ("openai SSE, 10 chunks", openai_stream),
            ("anthropic SSE, 10 chunks", anthropic_stream),
        ]:
            cpu_before = cpu_seconds(server_pid)
            elapsed = await run_load(client, one, n, concurrency)
            cpu_after = cpu_seconds(server_pid)
            line = f"{name:26} {n / elapsed:8.0f} req/s  ({n} requests, {concurrency} concurrent)"
            if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
                per_request = (cpu_after - cpu_before) / n
                line += (
                    f"; mock CPU {per_request * 1e6:.0f} µs/request"
                    f" = {1 / per_request:.0f} req/s per core"
                )
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--in-process", action="store_true", help="run the mock in this process")
    parser.add_argument("--url", help="use a mock that is already running")
    args = parser.parse_args()

    if args.url:
        trio.run(bench, args.url, None, args.requests, args.concurrency)
        return
    if args.in_process:

        async def in_process() -> None:
            async with serve_mock_provider() as mock:
                await bench(mock.base_url, None, args.requests, args.concurrency)

        trio.run(in_process)
        return

    code = "import sys; from relayrace.testing._mock_provider import main; sys.exit(main(sys.argv[1:]))"
    server = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if not url:
            raise SystemExit("the mock provider did not start")
        print(f"mock provider at {url} (pid {server.pid})")
        started = time.perf_counter()
        trio.run(bench, url, server.pid, args.requests, args.concurrency)
        print(f"total {time.perf_counter() - started:.1f} s")
    finally:
        server.terminate()
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()


if __name__ == "__main__":
    main()
