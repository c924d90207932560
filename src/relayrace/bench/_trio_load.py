"""The trio side of the bench: bare ``httpx.AsyncClient`` and the relayrace supervisor.

Each function runs one job inside ``trio.run`` and returns plain JSON-able data. CPU is
``time.process_time()`` of this process (the mock runs in another one), wall time is
``time.perf_counter()``; warm-up requests run first and are not measured.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import trio

from .._config import Budgets, Config, ProviderConfig, Route
from .._events import EventKind
from .._policy import HealthPolicy, Policies, RetryPolicy
from .._values import Request
from ..actors import POOL_SHARD, OpenAIClient, sharded_transport
from ..observe import Metrics
from ..supervisor import Supervisor, open_supervisor
from ._common import API_KEY, MESSAGES, ROUTE, rss_bytes, summarise_ms
from ._routing_bench import routing_job

#: Returns the ``perf_counter`` time of the first delta (streams) or ``None``.
OneRequest = Callable[[], Awaitable[float | None]]


class BenchFailure(Exception):
    """A request in a bench failed (counted, never fatal)."""


# --- the two mock model names of a job -------------------------------------------------------


def models_for(mode: str, chunks: int, tag: str, delay: float = 0.0) -> tuple[str, str]:
    """The primary's and the secondary's model names (the mock picks its scenario by them).

    A ``tag`` gives each job its own per-model counter in the mock, read back at the end to
    check how many upstream requests each peer really made.
    """
    ok = f"ok,chunks={chunks}" + (f",delay={delay:g}" if delay else "")
    primary = f"server-error,tag={tag}-p" if mode == "failover" else f"{ok},tag={tag}-p"
    return primary, f"{ok},tag={tag}-s"


async def upstream_count(url: str, model: str) -> int | None:
    """How many requests the mock has seen for ``model`` (it counts per model name)."""
    body = {"model": model, "messages": MESSAGES}
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        value = response.headers.get("x-mock-attempt")
    return int(value) - 1 if value else None


def payload(model: str, stream: bool) -> bytes:
    """The body relayrace's ``OpenAIClient`` sends (and so the one bare httpx sends too)."""
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --- the load driver ----------------------------------------------------------------------------


async def drive(one: OneRequest, requests: int, concurrency: int) -> dict[str, Any]:
    """Run ``requests`` calls of ``one`` over ``concurrency`` tasks; measure CPU and wall time."""
    latencies: list[float] = []
    first_deltas: list[float] = []
    errors: dict[str, int] = {}
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            started = time.perf_counter()
            try:
                first = await one()
            except Exception as exc:  # counted: a bench reports failures, it does not stop
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            if first is not None:
                first_deltas.append(first - started)

    gc.collect()
    cpu = time.process_time()
    wall = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, requests)):
            nursery.start_soon(worker)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": len(latencies),
        "failed": requests - len(latencies),
        "errors": errors,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_us_per_request": cpu / requests * 1e6,
        "wall_us_per_request": wall / requests * 1e6,
        "throughput_rps": requests / wall if wall > 0 else None,
        "latency_ms": summarise_ms(latencies),
        "first_delta_ms": summarise_ms(first_deltas),
    }


# --- bare httpx ---------------------------------------------------------------------------------


def httpx_client(
    concurrency: int, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """A plain client with the same pool size and explicit timeouts as relayrace's own."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(connect=60.0, read=None, write=10.0, pool=None)
    return httpx.AsyncClient(
        limits=limits,
        timeout=timeout,
        headers={"authorization": f"Bearer {API_KEY}"},
        transport=transport,
    )


def sharded(connections: int, shard: int) -> httpx.AsyncBaseTransport | None:
    """``connections`` spread over pools of at most ``shard`` connections (relayrace's own
    ``ShardedTransport``, which every ``OpenAIClient`` above ``POOL_SHARD`` connections uses),
    or ``None`` (one pool) when shard is 0 or one pool is enough. For bare httpx in the scale
    workload: with one pool of 1 000 connections httpcore's pool re-planning dominates."""
    if shard <= 0 or connections <= shard:
        return None
    return sharded_transport(connections, shard)


def httpx_request(
    client: httpx.AsyncClient,
    url: str,
    primary: str,
    secondary: str,
    stream: bool,
    *,
    on_first: Callable[[], None] | None = None,
) -> OneRequest:
    """One request the way a careful user writes it with bare httpx: post, check the status,
    parse the JSON (or every SSE chunk), and on a 5xx post once to the secondary."""
    endpoint = f"{url}/v1/chat/completions"
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
    }
    bodies = (payload(primary, stream), payload(secondary, stream))

    async def whole(body: bytes) -> str | None:
        response = await client.post(endpoint, content=body, headers=headers)
        if response.status_code >= 500:
            return None
        if response.status_code != 200:
            raise BenchFailure(response.status_code)
        data = json.loads(response.content)
        return str(data["choices"][0]["message"]["content"])

    async def streamed(body: bytes) -> tuple[str, float | None] | None:
        first: float | None = None
        parts: list[str] = []
        async with client.stream("POST", endpoint, content=body, headers=headers) as response:
            if response.status_code >= 500:
                await response.aread()
                return None
            if response.status_code != 200:
                raise BenchFailure(response.status_code)
            # Read to the end of the body (past [DONE]) so that the connection goes back to
            # the pool, as relayrace's client does.
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices")
                if choices:
                    text = choices[0].get("delta", {}).get("content")
                    if text:
                        if first is None:
                            first = time.perf_counter()
                            if on_first is not None:
                                on_first()
                        parts.append(text)
        return "".join(parts), first

    async def one() -> float | None:
        for body in bodies:
            if stream:
                result = await streamed(body)
                if result is not None:
                    if not result[0]:
                        raise BenchFailure("empty answer")
                    return result[1]
            else:
                text = await whole(body)
                if text is not None:
                    if not text:
                        raise BenchFailure("empty answer")
                    return None
        raise BenchFailure("both providers failed")

    return one


# --- relayrace ----------------------------------------------------------------------------------


def relay_config(
    url: str,
    models: list[str],
    concurrency: int,
    *,
    failover: bool = False,
    budgets: Budgets | None = None,
    transports: list[httpx.AsyncBaseTransport | str] | None = None,
    policies: Policies | None = None,
    connect_timeout: float = 5.0,
) -> Config:
    """One OpenAI provider per model name, all on the mock, chained in order.

    ``failover``: the primary fails every request and must be tried every time, as LiteLLM is
    configured for the same run: no retry of the same provider, and the primary never benched.
    """
    providers = []
    for i, model in enumerate(models):
        transport: httpx.AsyncBaseTransport | str = transports[i] if transports else "h11"
        client = OpenAIClient(
            base_url=f"{url}/v1",
            api_key=API_KEY,
            max_connections=concurrency,
            connect_timeout=connect_timeout,
            transport=transport,
        )
        providers.append(
            ProviderConfig(
                name=f"p{i}",
                client=client,
                model=model,
                max_concurrency=concurrency,
                inbox_size=max(256, concurrency),
                exempt=failover and i == 0,
                budgets=budgets or Budgets(),
            )
        )
    if policies is None:
        policies = Policies(retry=RetryPolicy(enabled=False)) if failover else Policies()
    return Config(
        providers=providers,
        routes=[Route(model=ROUTE, chain=[p.name for p in providers])],
        policies=policies,
    )


def relay_request(
    sup: Supervisor, stream: bool, *, on_first: Callable[[], None] | None = None
) -> OneRequest:
    request = Request(ROUTE, MESSAGES)

    async def one() -> float | None:
        if not stream:
            reply = await sup.complete(request)
            if not reply.text:
                raise BenchFailure("empty answer")
            return None
        first: float | None = None
        async with sup.stream(request) as s:
            async for _delta in s:
                if first is None:
                    first = time.perf_counter()
                    if on_first is not None:
                        on_first()
        if not s.reply.text:
            raise BenchFailure("empty answer")
        return first

    return one


# --- jobs ---------------------------------------------------------------------------------------


async def load_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Workload 2 (and the httpx reference): one peer, one mode, one concurrency."""
    peer, mode = job["peer"], job["mode"]
    requests, concurrency, chunks = job["requests"], job["concurrency"], job["chunks"]
    primary, secondary = models_for(mode, chunks, job["tag"])
    stream = mode == "stream"
    warmup = job.get("warmup", min(50, max(5, requests // 5)))
    if peer == "httpx":
        async with httpx_client(concurrency) as client:
            one = httpx_request(client, url, primary, secondary, stream)
            await drive(one, warmup, concurrency)
            result = await drive(one, requests, concurrency)
    else:
        config = relay_config(url, [primary, secondary], concurrency, failover=mode == "failover")
        async with open_supervisor(config) as sup:
            one = relay_request(sup, stream)
            await drive(one, warmup, concurrency)
            result = await drive(one, requests, concurrency)
    result["upstream"] = {
        "primary": await upstream_count(url, primary),
        "secondary": await upstream_count(url, secondary),
        "warmup": warmup,
    }
    return result


def scraped(one: OneRequest, metrics: Metrics, every: int) -> OneRequest:
    """``one``, and a scrape of ``metrics`` (``generate_latest``) once per ``every`` calls."""
    count = 0

    async def wrapped() -> float | None:
        nonlocal count
        count += 1
        if count % every == 0:
            metrics.render()
        return await one()

    return wrapped


async def overhead_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Workload 1: supervisor vs bare httpx in one process, at concurrency 1, interleaved in
    rounds so that drifting noise hits both alike; per-round figures, the caller takes medians.

    A third peer, ``metrics``, is the supervisor again with a ``Metrics`` observer and one
    scrape per round (so every round pays it alike): what the metrics cost (issue #14). A
    scrape's own CPU is measured apart (``scrape_cpu_us``), to rescale to any interval."""
    requests, rounds, chunks = job["requests"], job["rounds"], job["chunks"]
    per_round = max(1, requests // rounds)
    out: dict[str, Any] = {"rounds": rounds, "requests_per_round": per_round}
    for mode in ("complete", "stream"):
        stream = mode == "stream"
        primary, secondary = models_for(mode, chunks, f"{job['tag']}-{mode}")
        config = relay_config(url, [primary, secondary], 1)
        metrics_config = relay_config(url, [primary, secondary], 1)
        metrics = Metrics()
        samples: dict[str, list[dict[str, Any]]] = {"httpx": [], "relayrace": [], "metrics": []}
        async with (
            httpx_client(1) as client,
            open_supervisor(config) as sup,
            open_supervisor(metrics_config, observers=[metrics]) as observed,
        ):
            peers = {
                "httpx": httpx_request(client, url, primary, secondary, stream),
                "relayrace": relay_request(sup, stream),
                "metrics": scraped(relay_request(observed, stream), metrics, per_round),
            }
            for one in peers.values():
                await drive(one, max(20, per_round // 4), 1)  # warm up every peer
            for r in range(rounds):
                names = list(peers)  # rotated: each peer runs first, middle and last
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    samples[name].append(await drive(peers[name], per_round, 1))
            cpu = time.process_time()
            for _ in range(10):
                metrics.render()
            out[f"{mode}_scrape_cpu_us"] = (time.process_time() - cpu) / 10 * 1e6
        out[mode] = samples
    return out


async def scale_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Workload 4: ``streams`` slow streams in flight at once; the RSS delta per stream in
    flight, and that every stream completes.

    RSS is sampled once every stream has its first delta (or as soon as the first one ends,
    whichever comes first: then only the streams still running count).
    """
    peer, n, chunks = job["peer"], job["streams"], job["chunks"]
    # Streams must outlast the ramp-up (opening n connections), so that all are in flight.
    duration = max(2.0, n * job.get("seconds_per_stream", 0.01))
    primary, secondary = models_for("stream", chunks, job["tag"], delay=duration / chunks)
    counts = {"started": 0, "finished": 0, "complete": 0}
    sample_now = trio.Event()
    errors: dict[str, int] = {}

    def on_first() -> None:
        counts["started"] += 1
        if counts["started"] == n:
            sample_now.set()

    async def run_all(one: OneRequest, warm: OneRequest) -> dict[str, Any]:
        async def stream_one() -> None:
            try:
                await one()
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            else:
                counts["complete"] += 1
            finally:
                counts["finished"] += 1
                sample_now.set()

        # Warm the code paths (and one pooled connection) before the baseline.
        await drive(warm, 3, 1)
        gc.collect()
        base = rss_bytes()
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(stream_one)
            await sample_now.wait()
            peak = rss_bytes()
            in_flight = counts["started"] - counts["finished"]
            sampled_at = time.perf_counter() - started
        elapsed = time.perf_counter() - started
        delta = peak - base if peak is not None and base is not None else None
        return {
            "peer": peer,
            "streams": n,
            "chunks": chunks,
            "pool_shard": shard if n > shard > 0 else None,
            "stream_seconds": duration,
            "rss_base_bytes": base,
            "rss_peak_bytes": peak,
            "in_flight_at_sample": in_flight,
            "sampled_at_s": round(sampled_at, 3),
            "bytes_per_stream": delta / in_flight if delta is not None and in_flight else None,
            "completed": counts["complete"],
            "all_completed": counts["complete"] == n,
            "errors": errors,
            "wall_s": elapsed,
        }

    fast, _ = models_for("stream", chunks, job["tag"] + "-warm")
    shard = job.get("shard", POOL_SHARD)
    if peer == "httpx":
        async with httpx_client(n, transport=sharded(n, shard)) as client:
            warm = httpx_request(client, url, fast, fast, True)
            one = httpx_request(client, url, primary, secondary, True, on_first=on_first)
            return await run_all(one, warm)
    budgets = Budgets(connect=120.0, first_token=300.0, idle=120.0, attempt=600.0)
    config = relay_config(
        url,
        [primary, secondary],
        n,
        budgets=budgets,
        connect_timeout=120.0,
    )
    warm_config = relay_config(url, [fast, fast], 1)
    async with open_supervisor(config) as sup, open_supervisor(warm_config) as warm_sup:
        # The warm-up goes through a twin supervisor on a fast model: same code paths.
        return await run_all(relay_request(sup, True, on_first=on_first), relay_request(warm_sup, True))


async def faults_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Workload 5: three providers; ``p0`` fails half its requests (a 500, at random), ``p1``
    is down for the first ``down`` seconds (503: it gets benched, probed, and recovers), ``p2``
    is healthy. Default policies, except a shorter cooldown so that a short run sees the
    recovery. Runs for ``seconds`` at ``concurrency``."""
    concurrency, seconds, stream = job["concurrency"], job["seconds"], job["stream"]
    down = job.get("down", seconds * 0.3)
    rng = random.Random(job.get("seed", 6))
    tag = job["tag"]
    models = [f"ok,chunks={job['chunks']},tag={tag}-{i}" for i in range(3)]
    epoch = [math.inf]

    def half_failing() -> str | None:
        return "server-error" if rng.random() < 0.5 else None

    def down_then_up() -> str | None:
        return "unavailable" if time.perf_counter() - epoch[0] < down else None

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transports: list[httpx.AsyncBaseTransport | str] = [
        FaultInjector(httpx.AsyncHTTPTransport(limits=limits), half_failing),
        FaultInjector(httpx.AsyncHTTPTransport(limits=limits), down_then_up),
        "h11",
    ]
    policies = Policies(health=HealthPolicy(cooldown_base=max(0.5, down / 3)))
    config = relay_config(url, models, concurrency, transports=transports, policies=policies)
    events: dict[str, dict[str, int]] = {}
    latencies: list[float] = []
    outcome = {"ok": 0, "failed": 0}
    served_by: dict[str, int] = {}
    attempts: dict[str, dict[str, int]] = {}
    async with open_supervisor(config) as sup:
        await drive(relay_request(sup, stream), 20, 4)  # warm up, before the faults start

        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with sup.subscribe(buffer=1 << 16) as channel:
                task_status.started()
                async for event in channel:
                    if event.actor and event.kind in (
                        EventKind.ACTOR_BENCHED,
                        EventKind.ACTOR_PROBING,
                        EventKind.ACTOR_RECOVERED,
                    ):
                        per = events.setdefault(event.actor, {})
                        per[event.kind.value] = per.get(event.kind.value, 0) + 1

        request = Request(ROUTE, MESSAGES)
        stop_at = [math.inf]

        async def worker() -> None:
            while time.perf_counter() < stop_at[0]:
                started = time.perf_counter()
                try:
                    if stream:
                        async with sup.stream(request) as s:
                            async for _ in s:
                                pass
                        reply = s.reply
                    else:
                        reply = await sup.complete(request)
                except Exception as exc:
                    outcome["failed"] += 1
                    for a in getattr(exc, "attempts", ()):
                        per = attempts.setdefault(a.actor, {})
                        per[a.outcome.value] = per.get(a.outcome.value, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)
                outcome["ok"] += 1
                served_by[reply.provider] = served_by.get(reply.provider, 0) + 1
                for a in reply.attempts:
                    per = attempts.setdefault(a.actor, {})
                    per[a.outcome.value] = per.get(a.outcome.value, 0) + 1

        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            epoch[0] = time.perf_counter()
            stop_at[0] = epoch[0] + seconds
            cpu = time.process_time()
            async with trio.open_nursery() as workers:
                for _ in range(concurrency):
                    workers.start_soon(worker)
            wall = time.perf_counter() - epoch[0]
            cpu = time.process_time() - cpu
            nursery.cancel_scope.cancel()
        stats = sup.statistics()
        health = {name: snap.state.value for name, snap in sup.health().items()}
    total = outcome["ok"] + outcome["failed"]
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "stream": stream,
        "down_s": down,
        "requests": total,
        "ok": outcome["ok"],
        "failed": outcome["failed"],
        "success_share": outcome["ok"] / total if total else None,
        "throughput_rps": outcome["ok"] / wall if wall > 0 else None,
        "cpu_us_per_request": cpu / total * 1e6 if total else None,
        "latency_ms": summarise_ms(latencies),
        "served_by": served_by,
        "attempts": attempts,
        "health_events": events,
        "health_at_end": health,
        "retries": stats.retries,
        "failovers": stats.failovers,
        "wall_s": wall,
    }


@attrs.define(eq=False)
class FaultInjector(httpx.AsyncBaseTransport):
    """Sends a request to the mock with an ``x-mock-scenario`` header (a fault the mock really
    answers with) whenever ``pick`` names one; otherwise untouched."""

    inner: httpx.AsyncBaseTransport
    pick: Callable[[], str | None]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scenario = self.pick()
        if scenario is not None:
            request.headers["x-mock-scenario"] = scenario
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


JOBS: dict[str, Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "load": load_job,
    "overhead": overhead_job,
    "scale": scale_job,
    "faults": faults_job,
    "routing": routing_job,
}


def run_job(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh trio loop."""
    return trio.run(JOBS[job["kind"]], url, job)
