"""Per-request overhead of the supervisor with an in-process scripted provider.

Compares, in one run, N requests through ``sup.complete`` / ``sup.stream`` against the same
``ScriptedClient.call`` made directly with a trivial sink: the difference is what routing,
the actor hop, budgets, health and bookkeeping cost per request.

    .venv/bin/python benchmarks/overhead_scripted.py [N] [CHUNKS] [--metrics]

``--metrics`` runs the supervised requests with a ``relayrace.observe.Metrics`` observer and
renders its metrics once at the end (a scrape), inside the measured time.
"""

from __future__ import annotations

import sys
import time

import trio

from relayrace import Config, ProviderConfig, Request, Route, open_supervisor
from relayrace.actors import ClientCall
from relayrace.observe import Metrics
from relayrace.testing import Answer, ScriptedClient

REQUEST = Request("m", [{"role": "user", "content": "hi"}])


class NullSink:
    async def delta(self, text: str) -> None:
        await trio.lowlevel.checkpoint()

    def progress(self) -> None:
        pass


async def direct(n: int, chunks: int, stream: bool) -> float:
    client = ScriptedClient([Answer(chunks=chunks)])
    call = ClientCall(request=REQUEST, model=None, stream=stream, actor="a")
    sink = NullSink()
    start = time.process_time()
    for _ in range(n):
        await client.call(call, sink)
        client.calls.clear()
    return (time.process_time() - start) / n


async def supervised(n: int, chunks: int, stream: bool, metrics: bool = False) -> float:
    client = ScriptedClient([Answer(chunks=chunks)])
    config = Config(
        providers=[ProviderConfig(name="a", client=client)],
        routes=[Route(model="m", chain=["a"])],
    )
    observers = [Metrics()] if metrics else []
    async with open_supervisor(config, observers=observers) as sup:
        start = time.process_time()
        for _ in range(n):
            if stream:
                async with sup.stream(REQUEST) as s:
                    async for _delta in s:
                        pass
            else:
                await sup.complete(REQUEST)
            client.calls.clear()
        for observer in observers:
            observer.render()
        return (time.process_time() - start) / n


async def main(n: int, chunks: int, metrics: bool) -> None:
    for stream in (False, True):
        await direct(n // 10, chunks, stream)  # warm up
        await supervised(n // 10, chunks, stream, metrics)
        bare = await direct(n, chunks, stream)
        sup = await supervised(n, chunks, stream, metrics)
        label = f"stream ({chunks} chunks)" if stream else "complete"
        print(
            f"{label:>20}: direct {bare * 1e6:7.1f} µs CPU, supervised {sup * 1e6:7.1f} µs CPU,"
            f" overhead {(sup - bare) * 1e6:7.1f} µs per request"
        )


if __name__ == "__main__":
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    trio.run(
        main,
        int(args[0]) if len(args) > 0 else 5000,
        int(args[1]) if len(args) > 1 else 20,
        "--metrics" in flags,
    )
