"""Per-request overhead of the supervisor with an in-process scripted provider.

Compares, in one run, N requests through ``sup.complete`` / ``sup.stream`` against the same
``ScriptedClient.call`` made directly with a trivial sink: the difference is what routing,
the actor hop, budgets, health and bookkeeping cost per request.

    .venv/bin/python benchmarks/overhead_scripted.py [N] [CHUNKS]
"""

from __future__ import annotations

import sys
import time

import trio

from relayrace import Config, ProviderConfig, Request, Route, open_supervisor
from relayrace.actors import ClientCall
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


async def supervised(n: int, chunks: int, stream: bool) -> float:
    client = ScriptedClient([Answer(chunks=chunks)])
    config = Config(
        providers=[ProviderConfig(name="a", client=client)],
        routes=[Route(model="m", chain=["a"])],
    )
    async with open_supervisor(config) as sup:
        start = time.process_time()
        for _ in range(n):
            if stream:
                async with sup.stream(REQUEST) as s:
                    async for _delta in s:
                        pass
            else:
                await sup.complete(REQUEST)
            client.calls.clear()
        return (time.process_time() - start) / n


async def main(n: int, chunks: int) -> None:
    for stream in (False, True):
        await direct(n // 10, chunks, stream)  # warm up
        await supervised(n // 10, chunks, stream)
        bare = await direct(n, chunks, stream)
        sup = await supervised(n, chunks, stream)
        label = f"stream ({chunks} chunks)" if stream else "complete"
        print(
            f"{label:>20}: direct {bare * 1e6:7.1f} µs CPU, supervised {sup * 1e6:7.1f} µs CPU,"
            f" overhead {(sup - bare) * 1e6:7.1f} µs per request"
        )


if __name__ == "__main__":
    trio.run(
        main,
        int(sys.argv[1]) if len(sys.argv) > 1 else 5000,
        int(sys.argv[2]) if len(sys.argv) > 2 else 20,
    )
