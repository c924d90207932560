"""Where the CPU of a bare ``httpx.AsyncClient`` on trio goes under concurrency, and how much of
relayrace's CPU per request is its HTTP layer (httpx + httpcore + h11).

One mock provider process (``relayrace.bench._procs.mock_process``); in this process, per
concurrency level, every peer is opened once and warmed up until its whole pool is open
(``max(warmup, 3 * concurrency)`` requests), then measured in ``--rounds`` interleaved rounds
(peer order rotated each round; medians reported), then each peer is profiled once with
``cProfile.Profile(time.process_time)`` and, once, its pool is instrumented (connections in the
pool, idle ones, queued requests at each ``_assign_requests_to_connections``).

Peers:
  httpx          bare ``httpx.AsyncClient``, ``client.post`` (the bench's ``httpx_request``)
  relayrace      ``open_supervisor`` over ``OpenAIClient`` (``send(..., stream=True)``)
  httpx-sharded  bare httpx over ``ShardedTransport``: pools of at most ``--shard`` connections
  relay-sharded  relayrace over the same sharded transport
  relay-null     relayrace over a transport that answers at once, in memory (no socket, no
                 httpcore, no h11): the floor if the transport cost nothing
  httpx-null     bare httpx over the same in-memory transport
  httpx-send     bare httpx called as OpenAIClient calls it (build_request, send(stream=True))

Usage:
  .venv/bin/python benchmarks/httpx_pool_profile.py --concurrency 1,8,50,128 --rounds 3
  .venv/bin/python benchmarks/httpx_pool_profile.py --modes complete,stream --json out.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from contextlib import AsyncExitStack
from typing import Any

import httpcore
import httpx
import trio

from relayrace import open_supervisor
from relayrace.bench import _trio_load as L
from relayrace.bench._common import raise_fd_limit
from relayrace.bench._procs import mock_process

# --- an in-memory transport: the "free transport" floor -----------------------------------------


class NullTransport(httpx.AsyncBaseTransport):
    """Answers every request at once with a canned body (one trio checkpoint, so that tasks still
    interleave). The body is the mock's real answer, fetched once per model and stream mode."""

    def __init__(self, bodies: dict[tuple[str, bool], tuple[dict[str, str], bytes]]):
        self.bodies = bodies

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await trio.lowlevel.checkpoint()
        sent = json.loads(request.content)
        headers, body = self.bodies[(sent["model"], bool(sent.get("stream")))]
        return httpx.Response(200, headers=headers, content=body)


async def canned(url: str, models: list[str], stream: bool) -> dict:
    out = {}
    async with httpx.AsyncClient(timeout=10.0) as client:
        for model in models:
            r = await client.post(
                f"{url}/v1/chat/completions", content=L.payload(model, stream),
                headers={"content-type": "application/json"},
            )
            ctype = r.headers.get("content-type", "application/json")
            out[(model, stream)] = ({"content-type": ctype}, r.content)
    return out


def send_request(client: httpx.AsyncClient, url: str, primary: str, secondary: str, stream: bool):
    """Bare httpx the way ``OpenAIClient.call`` uses it: ``build_request`` then
    ``send(stream=True)``, ``aread`` / ``aiter_bytes``, ``aclose`` (non-streamed: the same JSON
    parse as the bench's ``httpx_request``)."""
    endpoint = f"{url}/v1/chat/completions"
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
    }
    bodies = (L.payload(primary, stream), L.payload(secondary, stream))

    async def one() -> float | None:
        for body in bodies:
            request = client.build_request("POST", endpoint, content=body, headers=headers)
            response = await client.send(request, stream=True)
            try:
                if response.status_code >= 500:
                    await response.aread()
                    continue
                if stream:
                    async for _ in response.aiter_bytes():
                        pass
                    return None
                data = json.loads(await response.aread())
                if not data["choices"][0]["message"]["content"]:
                    raise L.BenchFailure("empty answer")
                return None
            finally:
                await response.aclose()
        raise L.BenchFailure("both providers failed")

    return one


# --- profile digestion ------------------------------------------------------------------------

LAYERS = [
    ("httpcore", "/httpcore/"),
    ("httpx", "/httpx/"),
    ("h11", "/h11/"),
    ("trio", "/trio/"),
    ("relayrace", "/relayrace/"),
    ("attrs", "/attr/"),
]

# (label, filename suffix, function name): cumulative times reported per request.
FUNCS = [
    ("pool.handle_async_request", "httpcore/_async/connection_pool.py", "handle_async_request"),
    ("pool._assign_requests_to_connections", "httpcore/_async/connection_pool.py",
     "_assign_requests_to_connections"),
    ("pool._close_connections", "httpcore/_async/connection_pool.py", "_close_connections"),
    ("PoolByteStream.aclose", "httpcore/_async/connection_pool.py", "aclose"),
    ("conn.is_idle", "httpcore/_async/connection.py", "is_idle"),
    ("conn.has_expired (poll)", "httpcore/_async/connection.py", "has_expired"),
    ("http11.handle_async_request", "httpcore/_async/http11.py", "handle_async_request"),
    ("httpx Client.send", "httpx/_client.py", "send"),
    ("trio unrolled_run (all)", "trio/_core/_run.py", "unrolled_run"),
    ("select.poll (is_readable)", "~", "<method 'poll' of 'select.poll' objects>"),
    ("epoll wait", "~", "<method 'poll' of 'select.epoll' objects>"),
    ("json.loads", "json/__init__.py", "loads"),
]


def layer_of(filename: str, func: str) -> str:
    for name, needle in LAYERS:
        if needle in filename:
            return name
    if filename == "~":
        return "builtins/C"
    return "other Python"


def digest(stats: pstats.Stats, requests: int) -> dict[str, Any]:
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    # Self time per layer; C functions (filename "~") are charged to the layer of their
    # callers, in proportion to the time each caller spent in them.
    layers: dict[str, float] = defaultdict(float)
    for (filename, _line, func), (_cc, _nc, tt, _ct, callers) in raw.items():
        if filename == "~" and callers:
            by = sum(v[3] for v in callers.values()) or 1.0
            for (cf, _cl, cfn), v in callers.items():
                layers[layer_of(cf, cfn)] += tt * v[3] / by
        else:
            layers[layer_of(filename, func)] += tt
    funcs = {}
    for label, suffix, name in FUNCS:
        ct = calls = 0.0
        for (filename, _line, func), (_cc, nc, _tt, ct_, _callers) in raw.items():
            if func == name and (filename.endswith(suffix) or (suffix == "~" and filename == "~")):
                ct += ct_
                calls += nc
        funcs[label] = {"cum_share": ct / total if total else 0.0, "calls_per_req": calls / requests}
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    return {
        "profiled_cpu_s": total,
        "layers": {k: v / total for k, v in sorted(layers.items(), key=lambda kv: -kv[1])},
        "funcs": funcs,
        "top_self": [
            {
                "func": f"{f.split('site-packages/')[-1]}:{ln}({fn})",
                "self_share": tt / total,
                "calls_per_req": nc / requests,
            }
            for (f, ln, fn), (_cc, nc, tt, _ct, _c) in top
        ],
    }


# --- pool instrumentation ---------------------------------------------------------------------

POOL_SAMPLES: list[tuple[int, int, int]] = []
POOL_EVENTS: dict[str, int] = defaultdict(int)


def instrument(on: bool) -> None:
    """Wrap httpcore's pool: sample it at each assignment pass, count the requests sent back to
    the queue (``ConnectionNotAvailable``: two requests were handed the same idle connection),
    the connections created and those dropped as expired (idle, socket readable)."""
    from httpcore._async import connection_pool as cp
    from httpcore._async import http11

    cls = httpcore.AsyncConnectionPool
    if not on:
        cls._assign_requests_to_connections = cls._orig_assign  # type: ignore[attr-defined]
        cls.create_connection = cls._orig_create  # type: ignore[attr-defined]
        cp.AsyncPoolRequest.clear_connection = cp.AsyncPoolRequest._orig_clear  # type: ignore
        http11.AsyncHTTP11Connection.has_expired = http11.AsyncHTTP11Connection._orig_exp  # type: ignore
        return
    original = cls.__dict__["_assign_requests_to_connections"]
    cls._orig_assign = original  # type: ignore[attr-defined]
    create = cls._orig_create = cls.__dict__["create_connection"]  # type: ignore[attr-defined]
    clear = cp.AsyncPoolRequest._orig_clear = cp.AsyncPoolRequest.__dict__["clear_connection"]  # type: ignore
    exp = http11.AsyncHTTP11Connection._orig_exp = http11.AsyncHTTP11Connection.__dict__["has_expired"]  # type: ignore

    def count(name, fn, test=None):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            result = fn(*a, **k)
            if test is None or test(result):
                POOL_EVENTS[name] += 1
            return result

        return wrapper

    cls.create_connection = count("created", create)  # type: ignore[method-assign]
    cp.AsyncPoolRequest.clear_connection = count("requeued", clear)  # type: ignore
    http11.AsyncHTTP11Connection.has_expired = count("expired", exp, bool)  # type: ignore

    def wrapped(self):  # type: ignore[no-untyped-def]
        conns = self._connections
        POOL_SAMPLES.append(
            (
                len(conns),
                sum(1 for c in conns if c.is_idle()),
                sum(1 for r in self._requests if r.is_queued()),
            )
        )
        return original(self)

    cls._assign_requests_to_connections = wrapped  # type: ignore[method-assign]


# --- the run ----------------------------------------------------------------------------------


async def run_level(url: str, c: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    stream = mode == "stream"
    tag = f"pp{c}{mode}{time.monotonic_ns() % 10**6}"
    p, s = L.models_for(mode, args.chunks, tag)
    bodies = await canned(url, [p, s], stream)
    peers: dict[str, Any] = {}
    want = args.peers.split(",")

    def shard_t():
        t = L.sharded(c, args.shard)
        return t


    async with AsyncExitStack() as stack:
        for name in want:
            if name == "httpx":
                client = await stack.enter_async_context(L.httpx_client(c))
                peers[name] = L.httpx_request(client, url, p, s, stream)
            elif name == "httpx-sharded":
                t = shard_t()
                if t is None:
                    continue
                client = await stack.enter_async_context(L.httpx_client(c, transport=t))
                peers[name] = L.httpx_request(client, url, p, s, stream)
            elif name == "httpx-send":
                client = await stack.enter_async_context(L.httpx_client(c))
                peers[name] = send_request(client, url, p, s, stream)
            elif name == "httpx-null":
                client = await stack.enter_async_context(
                    L.httpx_client(c, transport=NullTransport(bodies))
                )
                peers[name] = L.httpx_request(client, url, p, s, stream)
            elif name in ("relayrace", "relay-sharded", "relay-null"):
                if name == "relayrace":
                    transports = None
                elif name == "relay-sharded":
                    if shard_t() is None:
                        continue
                    transports = [shard_t(), shard_t()]
                else:
                    transports = [NullTransport(bodies), NullTransport(bodies)]
                sup = await stack.enter_async_context(
                    open_supervisor(L.relay_config(url, [p, s], c, transports=transports))
                )
                peers[name] = L.relay_request(sup, stream)
        warm = max(args.warmup, 3 * c)
        for one in peers.values():
            await L.drive(one, warm, c)
        samples: dict[str, list[dict[str, Any]]] = {n: [] for n in peers}
        names = list(peers)
        for r in range(args.rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            for name in order:
                # httpx drops connections idle for 5 s (keepalive_expiry) while the other peers
                # run: reopen the pool first, so that connects are not counted in the round.
                await L.drive(peers[name], max(2 * c, 50), c)
                res = await L.drive(peers[name], args.requests, c)
                if res["failed"]:
                    print(f"  ! {name} c={c}: {res['errors']}", file=sys.stderr)
                samples[name].append(res)
        out: dict[str, Any] = {}
        for name in names:
            rows = samples[name]
            out[name] = {
                "cpu_us": statistics.median(x["cpu_us_per_request"] for x in rows),
                "cpu_us_all": [round(x["cpu_us_per_request"]) for x in rows],
                "rps": statistics.median(x["throughput_rps"] for x in rows),
                "p50_ms": statistics.median(x["latency_ms"]["p50"] for x in rows),
            }
        if args.profile:
            for name in names:
                await L.drive(peers[name], max(2 * c, 50), c)
                prof = cProfile.Profile(time.process_time)
                prof.enable()
                res = await L.drive(peers[name], args.requests, c)
                prof.disable()
                d = digest(pstats.Stats(prof), args.requests)
                d["profiled_cpu_us"] = res["cpu_us_per_request"]
                out[name]["profile"] = d
                if args.dump:
                    prof.dump_stats(f"{args.dump}-{mode}-c{c}-{name}.prof")
        if args.instrument:
            for name in names:
                await L.drive(peers[name], max(2 * c, 50), c)
                POOL_SAMPLES.clear()
                POOL_EVENTS.clear()
                instrument(True)
                try:
                    await L.drive(peers[name], args.requests, c)
                finally:
                    instrument(False)
                if POOL_SAMPLES:
                    n = len(POOL_SAMPLES)
                    out[name]["pool"] = {
                        "assign_calls_per_req": n / args.requests,
                        "conns_mean": sum(x[0] for x in POOL_SAMPLES) / n,
                        "idle_mean": sum(x[1] for x in POOL_SAMPLES) / n,
                        "queued_mean": sum(x[2] for x in POOL_SAMPLES) / n,
                        **{f"{k}_per_req": v / args.requests for k, v in POOL_EVENTS.items()},
                    }
    return out


def report(results: dict[str, Any]) -> None:
    for mode, levels in results.items():
        for c, peers in levels.items():
            print(f"\n== {mode} c={c}")
            for name, r in peers.items():
                line = (
                    f"  {name:14s} CPU µs/req {r['cpu_us']:7.0f}  {r['cpu_us_all']}  "
                    f"req/s {r['rps']:6.0f}  p50 {r['p50_ms']:.1f} ms"
                )
                if "pool" in r:
                    q = r["pool"]
                    line += (
                        f"  | pool: assign/req {q['assign_calls_per_req']:.1f} conns "
                        f"{q['conns_mean']:.0f} idle {q['idle_mean']:.1f} queued {q['queued_mean']:.1f}"
                        f" requeued/req {q.get('requeued_per_req', 0):.2f}"
                        f" created/req {q.get('created_per_req', 0):.2f}"
                        f" expired/req {q.get('expired_per_req', 0):.2f}"
                    )
                print(line)
                if "profile" in r:
                    d = r["profile"]
                    scale = r["cpu_us"]  # shares of the profile applied to unprofiled CPU
                    lay = "  ".join(f"{k} {v:.0%}" for k, v in d["layers"].items() if v >= 0.01)
                    net = sum(d["layers"].get(k, 0) for k in ("httpx", "httpcore", "h11"))
                    print(
                        f"    profiled {d['profiled_cpu_us']:.0f} µs/req; self time by layer: {lay}"
                    )
                    print(
                        f"    httpx+httpcore+h11 self: {net:.0%} ≈ {net * scale:.0f} µs/req "
                        f"of the unprofiled {scale:.0f}"
                    )
                    for label, f in d["funcs"].items():
                        if f["cum_share"] >= 0.005:
                            print(
                                f"      cum {label:38s} {f['cum_share']:6.1%} "
                                f"≈{f['cum_share'] * scale:6.0f} µs/req  "
                                f"calls/req {f['calls_per_req']:.1f}"
                            )
                    for t in d["top_self"][:8]:
                        print(
                            f"      self {t['self_share']:6.1%}  calls/req "
                            f"{t['calls_per_req']:7.1f}  {t['func']}"
                        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,50,128")
    ap.add_argument("--modes", default="complete")
    ap.add_argument("--peers", default="httpx,relayrace,httpx-sharded,relay-null")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--shard", type=int, default=8)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--instrument", action="store_true", help="count idle/queued in the pool")
    ap.add_argument("--dump", help="prefix for .prof files (snakeviz / pstats)")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    raise_fd_limit()
    results: dict[str, Any] = {}
    with mock_process() as (url, _pid):
        for mode in args.modes.split(","):
            results[mode] = {}
            for c in [int(x) for x in args.concurrency.split(",")]:
                t0 = time.perf_counter()
                results[mode][c] = trio.run(run_level, url, c, mode, args)
                print(f"[{mode} c={c} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
