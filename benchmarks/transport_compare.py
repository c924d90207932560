"""CPU per request of bare httpx over three transports, side by side in one run.

The mock provider runs in its own process; in this one, the same ``httpx.AsyncClient`` request
(``relayrace.bench``'s bare-httpx request: post, check, parse the JSON or every SSE chunk) goes
through:

- ``httpx``: httpx's default transport (httpcore, one pool of ``c`` connections);
- ``sharded``: relayrace's ``ShardedTransport`` (httpcore pools of at most 8 connections, what
  relayrace's provider clients use above 8 connections);
- ``h11``: ``relayrace.actors.H11Transport`` (h11 over pooled trio streams);

and through relayrace's provider client (``OpenAIClient.call``, deltas dropped: request
building, SSE parsing, error mapping on top):

- ``client``: with the transport ``make_http_client`` picks today (httpcore; sharded above 8
  connections);
- ``client-h11``: with an ``H11Transport``.

For each case (whole answer / streamed, concurrency ``c``), rounds interleave the three (the
order alternating), each round ``n`` requests by ``c`` tasks; the figure is this process's CPU
time per request. The machine is noisy: medians over rounds, with the spread (min–max); the
comparisons are the medians of the ratios taken within each round.

    .venv/bin/python benchmarks/transport_compare.py [N] [ROUNDS] [CHUNKS] [CONCURRENCIES]

e.g. ``benchmarks/transport_compare.py 400 9 20 1,50``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import trio

from relayrace import Request
from relayrace.actors import ClientCall, H11Transport, OpenAIClient, sharded_transport
from relayrace.bench._common import API_KEY, MESSAGES, ROUTE
from relayrace.bench._procs import mock_process
from relayrace.bench._trio_load import httpx_client, httpx_request, models_for

WAYS = ("httpx", "sharded", "h11", "client", "client-h11")


class DropSink:
    async def delta(self, text: str) -> None:
        pass

    def progress(self) -> None:
        pass


def relay_client(
    url: str, primary: str, stream: bool, concurrency: int, h11: bool
) -> tuple[OpenAIClient, Callable[[], Awaitable[object]]]:
    client = OpenAIClient(
        base_url=f"{url}/v1",
        api_key=API_KEY,
        max_connections=concurrency,
        transport=H11Transport(max_connections=concurrency) if h11 else None,
    )
    call = ClientCall(request=Request(ROUTE, MESSAGES), model=primary, stream=stream, actor="p0")
    sink = DropSink()

    async def one() -> object:
        return await client.call(call, sink)

    return client, one


def transport(way: str, concurrency: int) -> httpx.AsyncBaseTransport | None:
    if way == "sharded":
        return sharded_transport(concurrency)
    if way == "h11":
        return H11Transport(max_connections=concurrency)
    return None  # httpx's own, sized by httpx_client's limits


async def cpu_per_request(one: Callable[[], Awaitable[object]], n: int, concurrency: int) -> float:
    per_task = n // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await one()

    gc.collect()
    start = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return (time.process_time() - start) / (per_task * concurrency) * 1e6


async def measure(
    url: str, n: int, rounds: int, chunks: int, stream: bool, concurrency: int
) -> dict[str, list[float]]:
    primary, secondary = models_for("stream" if stream else "complete", chunks, "transport")
    clients: dict[str, httpx.AsyncClient | OpenAIClient] = {}
    ones: dict[str, Callable[[], Awaitable[object]]] = {}
    for way in WAYS:
        if way.startswith("client"):
            clients[way], ones[way] = relay_client(
                url, primary, stream, concurrency, way == "client-h11"
            )
        else:
            bare = clients[way] = httpx_client(concurrency, transport(way, concurrency))
            ones[way] = httpx_request(bare, url, primary, secondary, stream)
    try:
        for one in ones.values():  # warm up: connections, caches
            await cpu_per_request(one, max(2 * concurrency, n // 4), concurrency)
        samples: dict[str, list[float]] = {way: [] for way in WAYS}
        for r in range(rounds):
            order = list(ones.items())
            if r % 2:
                order.reverse()
            for way, one in order:
                samples[way].append(await cpu_per_request(one, n, concurrency))
    finally:
        for client in clients.values():
            await client.aclose()
    return samples


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    levels = [int(c) for c in (sys.argv[4] if len(sys.argv) > 4 else "1,50").split(",")]
    print(f"CPU µs per request, median [min–max] of {rounds} rounds of {n} requests")
    print(
        f"| case | c | {' | '.join(WAYS)} | h11 vs httpx | h11 vs sharded | client-h11 vs client |"
    )
    print(f"|---|---|{'---|' * len(WAYS)}---|---|---|")
    with mock_process() as (url, _pid):
        for stream in (False, True):
            for concurrency in levels:
                samples = trio.run(measure, url, n, rounds, chunks, stream, concurrency)
                med = {way: statistics.median(values) for way, values in samples.items()}
                cells = [
                    f"{med[w]:,.0f} [{min(samples[w]):,.0f}–{max(samples[w]):,.0f}]" for w in WAYS
                ]
                case = f"stream ({chunks} chunks)" if stream else "whole"
                pairs = (("h11", "httpx"), ("h11", "sharded"), ("client-h11", "client"))
                # Ratios within each round (the same noise on both), their median over rounds.
                vs = [
                    f"{(statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True)) - 1) * 100:+.0f} %"
                    for a, b in pairs
                ]
                print(
                    f"| {case} | {concurrency} | {' | '.join(cells)} | {' | '.join(vs)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
