"""Gateway CPU per streamed request, HTTP (``/v1/chat/completions``, ``stream``) beside the
websocket endpoint, in one gateway process: the server's own cost, without a provider's.

The gateway runs in a child process with one scripted provider (in-process, no HTTP) and both
endpoints, so its CPU time is the server plus the supervisor. The parent alternates the two
surfaces, round after round (interleaved, so that the machine's other load hits both alike):
``requests`` streamed requests of ``chunks`` deltas each, over ``concurrency`` connections, each
connection one request after another (HTTP: keep-alive, every answer read to the end of its
chunked body and checked for ``[DONE]``; websocket: every frame read, ``done`` checked). The
child reports its CPU time (user + system) around each run.

    .venv/bin/python benchmarks/gateway_http_cpu.py [requests] [chunks] [concurrency] [rounds]
        [--baseline SRC]

Prints, per surface, the median over ``rounds`` of the gateway's CPU µs per request and the
load's req/s (the load generator is Python on the same machine: its req/s is a floor), and the
HTTP / websocket CPU ratio (the median of the per-round ratios). With ``--baseline SRC`` (a
``src`` directory of another revision, e.g. from ``git archive main src | tar -x -C /tmp/base``)
a second gateway runs that code, and every round measures both gateways, interleaved.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import trio
from trio_websocket import open_websocket_url

MESSAGES = [{"role": "user", "content": "hi"}]
BODY = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()


def gateway(chunks: int) -> None:
    from relayrace import Config, ProviderConfig, Route, open_supervisor
    from relayrace.server import ServerSettings, serve
    from relayrace.testing import Answer, ScriptedClient

    async def main() -> None:
        cfg = Config(
            providers=[ProviderConfig(name="a", client=ScriptedClient([Answer(chunks=chunks)]))],
            routes=[Route(model="m", chain=["a"])],
        )
        settings = ServerSettings(ws_port=0, http_port=0, max_in_flight_per_connection=1024)
        async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            print(server.ws_url, server.http_url, flush=True)
            stdin = trio.lowlevel.FdStream(0)
            while True:
                line = await stdin.receive_some()
                if not line:
                    nursery.cancel_scope.cancel()
                    return
                print(time.process_time(), flush=True)

    trio.run(main)


async def _closed_loop(one_connection, requests: int, concurrency: int) -> None:  # type: ignore[no-untyped-def]
    left = requests

    def take() -> bool:
        nonlocal left
        if left <= 0:
            return False
        left -= 1
        return True

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, requests)):
            nursery.start_soon(one_connection, take)


async def load_http(url: str, requests: int, concurrency: int) -> None:
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % (host.encode(), len(BODY))
    )

    async def connection(take) -> None:  # type: ignore[no-untyped-def]
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            while take():
                await stream.send_all(head + BODY)
                data = b""
                while not data.endswith(b"\r\n0\r\n\r\n"):
                    more = await stream.receive_some(65536)
                    if not more:
                        raise RuntimeError("connection closed")
                    data += more
                if not data.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in data:
                    raise RuntimeError(data[:300])

    await _closed_loop(connection, requests, concurrency)


async def load_ws(url: str, requests: int, concurrency: int) -> None:
    async def connection(take) -> None:  # type: ignore[no-untyped-def]
        async with open_websocket_url(url) as ws:
            n = 0
            while take():
                n += 1
                await ws.send_message(
                    json.dumps({"type": "request", "id": n, "model": "m", "messages": MESSAGES})
                )
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] in ("done", "error"):
                        assert frame["type"] == "done", frame
                        break

    await _closed_loop(connection, requests, concurrency)


def _start_gateway(chunks: int, src: str | None) -> tuple[subprocess.Popen[str], str, str]:
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    child = subprocess.Popen(
        [sys.executable, __file__, "--gateway", str(chunks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    ws_url, http_url = child.stdout.readline().split()
    return child, ws_url, http_url


def _cpu(child: subprocess.Popen[str]) -> float:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    return float(child.stdout.readline())


def main() -> None:
    argv = sys.argv[1:]
    sources: dict[str, str | None] = {"": None}
    if "--baseline" in argv:
        at = argv.index("--baseline")
        sources = {"base ": argv[at + 1], "this ": None}
        del argv[at : at + 2]
    defaults = ["2000", "20", "16", "5"]
    requests, chunks, concurrency, rounds = (int(a) for a in argv + defaults[len(argv) :])
    loads = {}
    children = []
    for label, src in sources.items():
        child, ws_url, http_url = _start_gateway(chunks, src)
        children.append(child)
        loads[f"{label}http"] = (load_http, http_url, child)
        loads[f"{label}ws"] = (load_ws, ws_url, child)
    for load, url, _ in loads.values():
        trio.run(load, url, 200, concurrency)  # warm up
    cpu_us: dict[str, list[float]] = {name: [] for name in loads}
    rps: dict[str, list[float]] = {name: [] for name in loads}
    for _ in range(rounds):
        for name, (load, url, child) in loads.items():
            before, wall = _cpu(child), time.perf_counter()
            trio.run(load, url, requests, concurrency)
            wall = time.perf_counter() - wall
            cpu_us[name].append((_cpu(child) - before) / requests * 1e6)
            rps[name].append(requests / wall)
    for child in children:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    print(f"gateway CPU per streamed request ({chunks} deltas, c={concurrency}, {requests} req):")
    for name in loads:
        print(
            f"  {name:9}: median {statistics.median(cpu_us[name]):.0f} µs "
            f"(rounds {', '.join(f'{f:.0f}' for f in cpu_us[name])}); "
            f"load {statistics.median(rps[name]):.0f} req/s"
        )
    for label in sources:
        http, ws = cpu_us[f"{label}http"], cpu_us[f"{label}ws"]
        ratios = [h / w for h, w in zip(http, ws, strict=True)]
        print(f"  {label}HTTP / websocket CPU: median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gateway"]:
        gateway(int(sys.argv[2]))
    else:
        main()
