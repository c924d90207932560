"""Where a streamed request's CPU and memory go, over real HTTP to the mock provider.

Two measurements, each with the mock provider in its own process:

- ``profile``: cProfile of ``N`` streamed requests (``CHUNKS`` deltas each) through a
  supervisor, or through bare httpx on ``H11Transport`` (``--peer httpx-h11``); prints the
  functions by own time, so that the supervisor's share can be read beside the client's.
- ``memory``: ``N`` streams held open mid-flight (each has its first delta, the mock sends the
  rest slowly); a ``tracemalloc`` snapshot before and after, grouped by the line that allocated
  (``--group lineno``) or by file; prints the bytes per stream in flight and the top sources.

    .venv/bin/python benchmarks/stream_cost.py profile [N] [CHUNKS] [--peer supervisor|httpx-h11]
    .venv/bin/py-spy record -r 500 -f raw -o out.txt -- \
        .venv/bin/python benchmarks/stream_cost.py run [N] [CHUNKS] [--peer ...]
    .venv/bin/python benchmarks/stream_cost.py memory [N] [CHUNKS] [--group lineno|filename]
    .venv/bin/python benchmarks/stream_cost.py rss [N] [CHUNKS]     (RSS only, no tracemalloc)
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
import tracemalloc

import trio

from relayrace import Budgets, Request, open_supervisor
from relayrace.actors import H11Transport
from relayrace.bench._common import MESSAGES, ROUTE, rss_bytes
from relayrace.bench._procs import mock_process
from relayrace.bench._trio_load import (
    httpx_client,
    httpx_request,
    models_for,
    relay_config,
    relay_request,
)


async def profile(url: str, n: int, chunks: int, peer: str, cprofile: bool = True) -> None:
    primary, secondary = models_for("stream", chunks, "profile")
    async with httpx_client(1, H11Transport(max_connections=1)) as bare, open_supervisor(
        relay_config(url, [primary, secondary], 1)
    ) as sup:
        if peer == "supervisor":
            one = relay_request(sup, True)
        else:
            one = httpx_request(bare, url, primary, secondary, True)
        for _ in range(200):
            await one()
        gc.collect()
        if not cprofile:  # for a sampling profiler outside (py-spy record -- ...)
            start = time.process_time()
            for _ in range(n):
                await one()
            print(f"{peer}: {(time.process_time() - start) / n * 1e6:.0f} µs CPU per request")
            return
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        for _ in range(n):
            await one()
        profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(45)


async def memory(
    url: str, n: int, chunks: int, group: str, traced: bool = True, warm_pool: bool = False
) -> None:
    # Slow enough that every stream is mid-flight when the snapshot is taken.
    primary, secondary = models_for("stream", chunks, "memory", delay=max(3.0, n * 0.02) / chunks)
    budgets = Budgets(connect=120.0, first_token=300.0, idle=120.0, attempt=600.0)
    config = relay_config(url, [primary, secondary], n, budgets=budgets, connect_timeout=120.0)
    fast, _ = models_for("stream", chunks, "memory-warm")
    warm_config = relay_config(url, [fast, fast], 1)
    started = ended = 0
    all_started = trio.Event()

    async with open_supervisor(config) as sup, open_supervisor(warm_config) as warm_sup:
        warm = relay_request(warm_sup, True)
        for _ in range(5):
            await warm()

        async def one() -> None:
            # A reader that keeps up, as in ``relayrace bench``'s scale workload: counted once
            # it has its first delta.
            nonlocal started, ended
            first = True
            async with sup.stream(Request(ROUTE, MESSAGES)) as s:
                async for _delta in s:
                    if first:
                        first = False
                        started += 1
                        if started == n:
                            all_started.set()
            ended += 1

        if warm_pool:
            # Connections opened before the baseline (a pooled connection outlives a stream):
            # what a stream costs beyond its connection, on a heap already grown.
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(one)
                await all_started.wait()
        gc.collect()
        if traced:
            tracemalloc.start(12)
            before = tracemalloc.take_snapshot()
        rss_before = rss_bytes() or 0
        started = ended = 0
        all_started = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
            await all_started.wait()
            # Let every producer run up to its wait for the next chunk.
            await trio.sleep(0.05)
            gc.collect()
            rss_after = rss_bytes() or 0
            if traced:
                after = tracemalloc.take_snapshot()
            in_flight = started - ended
            print(f"in flight at the snapshot: {in_flight} of {n}")
    print(f"RSS delta per stream in flight: {(rss_after - rss_before) / in_flight / 1024:.1f} KiB")
    if not traced:
        return
    tracemalloc.stop()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(filters).compare_to(before.filter_traces(filters), group)
    total = sum(d.size_diff for d in diff)
    print(f"{n} streams in flight: {total / n:,.0f} bytes per stream (tracemalloc, Python heap)")
    for d in diff[:30]:
        if d.size_diff <= 0:
            continue
        frames = d.traceback if group == "traceback" else d.traceback[:1]
        where = " < ".join(
            f"{frame.filename.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno}"
            for frame in list(frames)[::-1][:6]
        )
        print(f"{d.size_diff / n:8.0f} B/stream  {d.count_diff / n:6.1f} blocks/stream  {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("profile", "run", "memory", "rss"))
    p.add_argument("n", type=int, nargs="?", default=2000)
    p.add_argument("chunks", type=int, nargs="?", default=20)
    p.add_argument("--peer", choices=("supervisor", "httpx-h11"), default="supervisor")
    p.add_argument(
        "--warm-pool",
        action="store_true",
        help="open the N connections before the baseline (default: as `relayrace bench`'s "
        "scale workload, each stream's connection counts)",
    )
    p.add_argument("--group", choices=("lineno", "filename", "traceback"), default="lineno")
    args = p.parse_args()
    with mock_process() as (url, _pid):
        if args.what in ("profile", "run"):
            trio.run(profile, url, args.n, args.chunks, args.peer, args.what == "profile")
        else:
            trio.run(memory, url, args.n, args.chunks, args.group, args.what == "memory", args.warm_pool)


if __name__ == "__main__":
    main()
