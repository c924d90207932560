"""Gateway CPU per streamed websocket request: the server's own cost, without a provider's.

The gateway runs in a child process with one scripted provider (in-process, no HTTP), so its
CPU time is the websocket server plus the supervisor. The parent sends ``requests`` streamed
requests of ``chunks`` deltas each, ``concurrency`` at a time on one connection, and reads
every frame; the child reports its CPU time (user + system) over the run.

    .venv/bin/python benchmarks/gateway_ws_cpu.py [requests] [chunks] [concurrency] [rounds]

Prints the median over ``rounds`` of the gateway's CPU µs per request.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import trio
from trio_websocket import open_websocket_url

MESSAGES = [{"role": "user", "content": "hi"}]


def gateway(chunks: int) -> None:
    from relayrace import Config, ProviderConfig, Route, open_supervisor
    from relayrace.server import ServerSettings, serve
    from relayrace.testing import Answer, ScriptedClient

    async def main() -> None:
        cfg = Config(
            providers=[ProviderConfig(name="a", client=ScriptedClient([Answer(chunks=chunks)]))],
            routes=[Route(model="m", chain=["a"])],
        )
        settings = ServerSettings(ws_port=0, http_port=None, max_in_flight_per_connection=1024)
        async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            print(server.ws_url, flush=True)
            stdin = trio.lowlevel.FdStream(0)
            while True:
                line = await stdin.receive_some()
                if not line:
                    nursery.cancel_scope.cancel()
                    return
                print(time.process_time(), flush=True)

    trio.run(main)


async def load(url: str, requests: int, concurrency: int) -> None:
    async with open_websocket_url(url) as ws:
        sent = done = 0
        while sent < min(concurrency, requests):
            await ws.send_message(json.dumps({"type": "request", "id": sent, "model": "m", "messages": MESSAGES}))
            sent += 1
        while done < requests:
            frame = json.loads(await ws.get_message())
            if frame["type"] in ("done", "error"):
                assert frame["type"] == "done", frame
                done += 1
                if sent < requests:
                    await ws.send_message(
                        json.dumps({"type": "request", "id": sent, "model": "m", "messages": MESSAGES})
                    )
                    sent += 1


def main() -> None:
    requests, chunks, concurrency, rounds = (int(a) for a in (sys.argv[1:] + ["2000", "20", "16", "5"][len(sys.argv) - 1 :]))
    child = subprocess.Popen(
        [sys.executable, __file__, "--gateway", str(chunks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    url = child.stdout.readline().strip()

    def cpu() -> float:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        return float(child.stdout.readline())

    trio.run(load, url, 200, concurrency)  # warm up
    figures = []
    for _ in range(rounds):
        before = cpu()
        trio.run(load, url, requests, concurrency)
        figures.append((cpu() - before) / requests * 1e6)
    child.stdin.close()
    child.wait()
    print(
        f"gateway CPU per streamed websocket request ({chunks} deltas, c={concurrency}): "
        f"median {statistics.median(figures):.0f} µs; rounds {', '.join(f'{f:.0f}' for f in figures)}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gateway"]:
        gateway(int(sys.argv[2]))
    else:
        main()
