"""The ``routing`` workload: the ``latency`` strategy and hedged first tokens vs plain priority,
against the mock provider (issue #15).

Two scenarios, each run with plain ``priority`` and with the feature, streamed, on two OpenAI
providers on the mock:

- ``slow``: the first provider in the chain is 3× slower to its first token than the second;
  ``priority`` always waits for it, ``latency`` moves the traffic to the fast one (exploring the
  slow one at its share).
- ``stalls``: the first provider stalls 5 % of its requests (its first token comes after
  ``stall`` seconds); a hedge at the p95 of its own times to first token starts the second.

Reported per run: p50/p99 time to first token and to the end, upstream requests per request (the
cost: failovers and hedges), hedges, and who served.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .._config import Config, Hedge, ProviderConfig, Route
from .._record import Action
from .._values import Request
from ..actors import OpenAIClient
from ..supervisor import open_supervisor
from ._common import API_KEY, MESSAGES, ROUTE, summarise_ms

#: (scenario, strategy, hedge): the runs, in order
RUNS = (
    ("slow", "priority", None),
    ("slow", "latency", None),
    ("stalls", "priority", None),
    ("stalls", "priority", "p95"),
)


@attrs.define(eq=False)
class _Stalls(httpx.AsyncBaseTransport):
    """Makes the mock stall the first token of a share of the requests (a scenario header)."""

    inner: httpx.AsyncBaseTransport
    share: float
    scenario: str
    rng: random.Random

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.rng.random() < self.share:
            request.headers["x-mock-scenario"] = self.scenario
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _config(url: str, job: dict[str, Any]) -> Config:
    fast, tag, concurrency = job["fast"], job["tag"], job["concurrency"]
    chunks = f"chunks={job['chunks']},delay=0.001"
    if job["scenario"] == "slow":
        models = [f"ok,first_delay={fast * 3},{chunks},tag={tag}-0", f"ok,first_delay={fast},{chunks},tag={tag}-1"]
    else:
        models = [f"ok,first_delay={fast},{chunks},tag={tag}-0", f"ok,first_delay={fast},{chunks},tag={tag}-1"]
    providers = []
    for i, model in enumerate(models):
        transport: httpx.AsyncBaseTransport | str = "h11"
        if job["scenario"] == "stalls" and i == 0:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            transport = _Stalls(
                httpx.AsyncHTTPTransport(limits=limits),
                job["stall_share"],
                f"ok,first_delay={job['stall']},{chunks}",
                random.Random(job.get("seed", 15)),
            )
        client = OpenAIClient(
            base_url=f"{url}/v1", api_key=API_KEY, max_connections=concurrency, transport=transport
        )
        providers.append(
            ProviderConfig(
                name=f"p{i}", client=client, model=model, max_concurrency=concurrency, inbox_size=256
            )
        )
    hedge = Hedge(after=job["hedge"], fallback=fast * 5) if job["hedge"] else None
    route = Route(model=ROUTE, chain=["p0", "p1"], strategy=job["strategy"], hedge=hedge)
    return Config(providers=providers, routes=[route], seed=job.get("seed", 15))


async def routing_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """One run of the routing workload: ``requests`` streams at ``concurrency``."""
    config = _config(url, job)
    request = Request(ROUTE, MESSAGES)
    ttft: list[float] = []
    total: list[float] = []
    upstream = hedges = failed = 0
    served: dict[str, int] = {}
    left = [job["requests"]]

    async def worker() -> None:
        nonlocal upstream, hedges, failed
        while left[0] > 0:
            left[0] -= 1
            started = time.perf_counter()
            first: float | None = None
            try:
                async with sup.stream(request) as s:
                    async for _ in s:
                        if first is None:
                            first = time.perf_counter()
                reply = s.reply
            except Exception:
                failed += 1
                continue
            if first is not None:
                ttft.append(first - started)
            total.append(time.perf_counter() - started)
            upstream += len(reply.attempts)
            hedges += sum(d.action is Action.HEDGE for d in reply.decisions)
            served[reply.provider] = served.get(reply.provider, 0) + 1

    async with open_supervisor(config) as sup:
        async with trio.open_nursery() as nursery:
            for _ in range(job["concurrency"]):
                nursery.start_soon(worker)
    done = len(total)
    return {
        "scenario": job["scenario"],
        "strategy": job["strategy"],
        "hedge": job["hedge"],
        "requests": job["requests"],
        "concurrency": job["concurrency"],
        "failed": failed,
        "ttft_ms": summarise_ms(ttft),
        "latency_ms": summarise_ms(total),
        "upstream_per_request": upstream / done if done else None,
        "hedges": hedges,
        "served_by": served,
    }


# --- in the main process ------------------------------------------------------------------------


def routing_params(quick: bool, requests: int | None) -> dict[str, Any]:
    return {
        "requests": requests or (40 if quick else 400),
        "concurrency": 4 if quick else 8,
        "fast": 0.02,
        "stall": 0.5 if quick else 1.0,
        "stall_share": 0.05,
        "chunks": 5,
    }


def routing_weight(p: dict[str, Any]) -> float:
    return len(RUNS) * (p["requests"] / p["concurrency"] * p["fast"] * 4 + 1)


def run_routing_workload(runner: Any) -> dict[str, Any]:
    """Each run in its own worker process, one after the other."""
    p = runner.params["routing"]
    jobs = [
        {"kind": "routing", "scenario": s, "strategy": st, "hedge": h, "tag": runner.tag("rt")}
        | {k: p[k] for k in ("requests", "concurrency", "fast", "stall", "stall_share", "chunks")}
        for s, st, h in RUNS
    ]
    weight = routing_weight(p) / len(RUNS)
    labels = [f"routing: {j['scenario']}, {j['strategy']}{' + hedge' if j['hedge'] else ''}" for j in jobs]
    results = runner.run("trio", jobs, [weight] * len(jobs), labels)
    return {"summary": [r for r in results if r is not None and "error" not in r]}


def _fmt(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def routing_markdown(routing: dict[str, Any] | None) -> list[str]:
    rows = (routing or {}).get("summary") or []
    if not rows:
        return []
    lines = [
        "## 6. Routing: latency strategy and hedged first tokens",
        "",
        "Two OpenAI providers on the mock, streamed. `slow`: the first in the chain is 3× slower "
        "to its first token than the second. `stalls`: the first stalls 5 % of its requests "
        "before the first token; the hedge starts the second at the p95 of the first's own "
        "times to first token. Upstream per request counts every attempt (hedges, and the "
        "cancelled losers, included).",
        "",
        "| scenario | routing | requests | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | upstream / request | hedges | served by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        routing_name = r["strategy"] + (f" + hedge {r['hedge']}" if r["hedge"] else "")
        ttft, total = r["ttft_ms"] or {}, r["latency_ms"] or {}
        lines.append(
            f"| {r['scenario']} | {routing_name} | {r['requests'] - r['failed']}/{r['requests']} "
            f"| {_fmt(ttft.get('p50'))} | {_fmt(ttft.get('p99'))} | {_fmt(total.get('p50'))} "
            f"| {_fmt(total.get('p99'))} | {_fmt(r['upstream_per_request'], 3)} | {r['hedges']} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(r['served_by'].items()))} |"
        )
    lines.append("")
    return lines


def routing_plot(routing: dict[str, Any] | None, pyplot: Any, out: Path, suffix: str) -> list[str]:
    rows = (routing or {}).get("summary") or []
    if not rows:
        return []
    figure, ax = pyplot.subplots(figsize=(8, 4))
    names = [f"{r['scenario']}\n{r['strategy']}{' + hedge' if r['hedge'] else ''}" for r in rows]
    width = 0.38
    for offset, key in ((-width / 2, "p50"), (width / 2, "p99")):
        ax.bar(
            [i + offset for i in range(len(rows))],
            [(r["ttft_ms"] or {}).get(key) or 0.0 for r in rows],
            width,
            label=f"TTFT {key}",
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names)
    ax.set_ylabel("time to first token (ms)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    figure.tight_layout()
    path = out / f"routing{suffix}.png"
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return [str(path)]
