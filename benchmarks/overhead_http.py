"""Where the supervisor's cost per request goes, over real HTTP to the mock provider.

Runs the mock provider in its own process and, in this one, three ways of making the same
request, interleaved round by round (the machine is noisy: medians over rounds):

- ``httpx``: a bare ``httpx.AsyncClient`` on trio with httpx's default transport (httpcore),
  as ``relayrace bench`` measures it;
- ``httpx-h11``: the same bare client on relayrace's ``H11Transport``, the transport the provider
  clients use by default: the like-for-like baseline, so the supervisor's own cost is the
  difference;
- ``client``: relayrace's ``OpenAIClient.call`` directly, with a sink that drops the deltas
  (the provider client's own cost: request building, SSE parsing, error mapping);
- ``supervisor``: ``sup.complete`` / ``sup.stream`` on a supervisor with that client (routing,
  the actor's slot, time budgets, health, the hand-over of deltas to the caller, the records).

    .venv/bin/python benchmarks/overhead_http.py [REQUESTS_PER_ROUND] [ROUNDS] [CHUNKS] [MODES]

``MODES`` is ``both`` (the default), ``stream`` or ``complete``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from relayrace import Request, open_supervisor
from relayrace.actors import ClientCall, H11Transport, OpenAIClient
from relayrace.bench._common import API_KEY, MESSAGES, ROUTE
from relayrace.bench._procs import mock_process
from relayrace.bench._trio_load import (
    httpx_client,
    httpx_request,
    models_for,
    relay_config,
    relay_request,
)


class DropSink:
    async def delta(self, text: str) -> None:
        pass

    def progress(self) -> None:
        pass


async def cpu_per_call(one: Callable[[], Awaitable[object]], n: int) -> float:
    gc.collect()
    start = time.process_time()
    for _ in range(n):
        await one()
    return (time.process_time() - start) / n * 1e6


BASELINES = ("httpx", "httpx-h11")


async def measure(url: str, n: int, rounds: int, chunks: int, stream: bool) -> dict[str, float]:
    primary, secondary = models_for("stream" if stream else "complete", chunks, "overhead")
    client = OpenAIClient(base_url=f"{url}/v1", api_key=API_KEY, max_connections=1)
    call = ClientCall(request=Request(ROUTE, MESSAGES), model=primary, stream=stream, actor="p0")
    sink = DropSink()

    async def direct() -> None:
        await client.call(call, sink)

    async with httpx_client(1) as bare, httpx_client(
        1, H11Transport(max_connections=1)
    ) as bare_h11, open_supervisor(relay_config(url, [primary, secondary], 1)) as sup:
        ways: dict[str, Callable[[], Awaitable[object]]] = {
            "httpx": httpx_request(bare, url, primary, secondary, stream),
            "httpx-h11": httpx_request(bare_h11, url, primary, secondary, stream),
            "client": direct,
            "supervisor": relay_request(sup, stream),
        }
        for one in ways.values():  # warm up: connections, caches
            for _ in range(max(20, n // 4)):
                await one()
        samples: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(rounds):
            order = list(ways.items())
            if r % 2:
                order.reverse()
            for name, one in order:
                samples[name].append(await cpu_per_call(one, n))
    await client.aclose()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 11
    chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    modes = sys.argv[4] if len(sys.argv) > 4 else "both"
    streams = {"both": (False, True), "stream": (True,), "complete": (False,)}[modes]
    with mock_process() as (url, _pid):
        for stream in streams:
            result = trio.run(measure, url, n, rounds, chunks, stream)
            label = f"stream ({chunks} chunks)" if stream else "complete"
            for base_name in BASELINES:
                base = result[base_name]
                figures = ", ".join(
                    f"{name} {cpu:6.0f} µs ({(cpu - base) / base * 100:+5.1f} %)"
                    for name, cpu in result.items()
                )
                print(f"{label:>20} vs {base_name:>9}: CPU per request: {figures}")


if __name__ == "__main__":
    main()
