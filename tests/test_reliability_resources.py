"""Exhausted resources (issue #11): ``relayrace serve`` as a user runs it (a child process with a
TOML config, so that its descriptors and memory are its own and measured from ``/proc``), under

- a flood of TCP connections to both ports that never finish a handshake, and
- hostile upstreams (a 2 GiB body, a gzip bomb, an endless SSE line) beside a healthy one,

while normal streamed requests run over HTTP and the websocket against the mock provider. The
normal requests all succeed and keep their p99 under 3× their unloaded p99 (measured first, in
the same test), the gateway's peak RSS stays under ``RSS_BOUND``, its descriptors return to
their baseline, and no actor gives up.

The default run is small (500 idle connections per port, a 64 MiB alarm on the hostile server);
``--chaos`` runs 20 000 per port and lets the hostile bodies run to gigabytes. The figures are
printed (``-s``), the p99s per surface too. ``--chaos`` floods the websocket port alone and both
ports.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from relayrace.actors import OpenAIClient
from relayrace.testing import SCRIPTED_ANSWER, serve_mock_provider

from .hostile_upstream import GiB, MiB
from .reliability import (
    MESSAGES,
    hostile_upstream_process,
    idle_connections,
    percentile,
    process_fds,
    process_memory,
    run_gateway_process,
)
from .test_provider_limits import KEY, Sink, call, fail

#: The gateway's peak resident set may not pass this.
RSS_BOUND = 300 * MiB
#: Loaded p99 ≤ this × unloaded p99 …
SLOWDOWN = 3.0
#: … or, in the small default run on a shared machine, this much over it (seconds): its p99 of
#: a few dozen samples moves by more than 3× with any neighbour's burst, but a stalled event loop
#: (issue #11 saw 6 s) still fails it. ``--chaos`` has no floor.
FLOOR = 1.0
#: The codes of an attempt refused by a provider limit.
LIMIT_CODES = {"response_too_large", "sse_line_too_long", "event_too_large"}

HEALTHY = """
[server]
http_port = 0
ws_port = 0

[[providers]]
name = "good"
kind = "mock"
base_url = "{mock}/v1"
model = "ok,chunks=4"
max_concurrency = 64

[[providers]]
name = "spare"
kind = "mock"
base_url = "{mock}/v1"
model = "ok,chunks=4"

[[routes]]
model = "chat"
chain = ["good", "spare"]
"""

HOSTILE = (
    HEALTHY
    + """
[[providers]]
name = "{name}"
kind = "openai"
base_url = "{hostile}"
api_key_env = "RR_RESOURCES_KEY"
model = "{model}"
exempt = true

[[routes]]
model = "{model}"
chain = ["{name}", "good"]
"""
)
BEHAVIOURS = {"huge": "huge-body", "bomb": "gzip-bomb", "line": "endless-line"}


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


async def http_stream(client: httpx.AsyncClient, model: str = "chat") -> float:
    """One streamed request over HTTP; its duration. Fails unless the whole answer came."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    start = time.perf_counter()
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert "error" not in chunk, chunk
        text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    assert "".join(text) == SCRIPTED_ANSWER
    return time.perf_counter() - start


async def ws_stream(ws: WebSocketConnection, n: int, model: str = "chat") -> tuple[float, Any]:
    """One streamed request on a websocket; its duration and its ``done`` frame."""
    start = time.perf_counter()
    frame = {"type": "request", "id": f"r{n}", "model": model, "messages": MESSAGES}
    await ws.send_message(json.dumps(frame))
    while (reply := json.loads(await ws.get_message()))["type"] == "delta":
        pass
    assert reply["type"] == "done", reply
    return time.perf_counter() - start, reply


@attrs.define
class Durations:
    """The normal requests' durations (seconds), by surface, filled in as they come."""

    http: list[float] = attrs.Factory(list)
    websocket: list[float] = attrs.Factory(list)

    @property
    def every(self) -> list[float]:
        return self.http + self.websocket


@asynccontextmanager
async def normal_traffic(
    gateway: Any, stop: trio.Event | None, count: int, go: trio.Event | None = None
) -> AsyncIterator[Durations]:
    """Two HTTP and two websocket callers, each on its own connection, sending streamed
    requests one after another: ``count`` each, or (``stop`` given) until it is set. With
    ``go``, the callers connect (and send one request) at once, then wait for ``go`` before
    the requests that count. Yields the durations, filled in as they come; the block's end
    waits for the callers."""
    durations = Durations()

    def more(n: int) -> bool:
        return n < count if stop is None else not stop.is_set()

    async def over_http() -> None:
        async with httpx.AsyncClient(base_url=gateway.http_url, timeout=60) as client:
            if go is not None:
                await http_stream(client)
                await go.wait()
            n = 0
            while more(n):
                durations.http.append(await http_stream(client))
                n += 1

    async def over_websocket() -> None:
        async with open_websocket_url(gateway.ws_url) as ws:
            if go is not None:
                await ws_stream(ws, -1)
                await go.wait()
            n = 0
            while more(n):
                took, done = await ws_stream(ws, n)
                assert done["provider"] == "good", done
                durations.websocket.append(took)
                n += 1

    async with trio.open_nursery() as nursery:
        for caller in (over_http, over_http, over_websocket, over_websocket):
            nursery.start_soon(caller)
        yield durations


def p99_figures(unloaded: Durations, loaded: Durations) -> str:
    """The p99s, unloaded and loaded, of every request and of each surface, for the output."""
    figures = []
    for name in ("every", "http", "websocket"):
        before, after = getattr(unloaded, name), getattr(loaded, name)
        if before and after:
            p99_before, p99_after = percentile(before, 0.99), percentile(after, 0.99)
            figures.append(
                f"{name} {len(before)} unloaded p99 {p99_before * 1000:.1f} ms, {len(after)} "
                f"loaded p99 {p99_after * 1000:.1f} ms (×{p99_after / p99_before:.2f})"
            )
    return "; ".join(figures)


async def health(gateway: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def no_actor_gave_up(report: dict[str, Any]) -> None:
    states = {name: actor["state"] for name, actor in report["actors"].items()}
    assert "gave_up" not in states.values(), states


def p99_bound(unloaded: float, chaos: bool) -> float:
    return SLOWDOWN * unloaded if chaos else max(SLOWDOWN * unloaded, unloaded + FLOOR)


async def wait_for_fds(pid: int, at_most: int, seconds: float) -> int:
    """The gateway's descriptor count once it is ``at_most`` (or after ``seconds``)."""
    for _ in range(int(seconds / 0.2)):  # another process's state: polled
        if process_fds(pid) <= at_most:
            break
        await trio.sleep(0.2)
    return process_fds(pid)


@pytest.mark.parametrize(
    ("chaos_size", "flooded"),
    [
        pytest.param(False, ("websocket", "http"), id="small"),
        pytest.param(True, ("websocket",), id="full-websocket", marks=pytest.mark.chaos),
        pytest.param(True, ("websocket", "http"), id="full", marks=pytest.mark.chaos),
    ],
)
async def test_idle_connection_flood_leaves_normal_traffic_and_the_actors_alone(
    chaos_size: bool, flooded: tuple[str, ...], tmp_path: Path
) -> None:
    per_port = 20_000 if chaos_size else 500
    requests = 150 if chaos_size else 40
    hold = 3.0 if chaos_size else 1.0
    settle = 10.0 if chaos_size else 5.0  # connects still pending then are abandoned
    async with serve_mock_provider() as mock:
        path = write_config(tmp_path, HEALTHY.format(mock=mock.base_url))
        async with run_gateway_process(path) as gateway:
            async with normal_traffic(gateway, None, requests) as unloaded:
                pass
            baseline = process_fds(gateway.pid)
            ports = {
                "websocket": int(gateway.ws_url.rsplit(":", 1)[1].split("/")[0]),
                "http": int(gateway.http_url.rsplit(":", 1)[1].split("/")[0]),
            }
            stop, go = trio.Event(), trio.Event()
            # The callers' connections are open before the flood: while unfinished handshakes
            # fill ``max_connections``, a new websocket connection is refused (503).
            async with normal_traffic(gateway, stop, 0, go) as loaded:
                async with AsyncExitStack() as floods:
                    held = {
                        name: await floods.enter_async_context(
                            idle_connections(ports[name], per_port, settle=settle)
                        )
                        for name in flooded
                    }
                    # Measured once every connection is open (or waits in an accept queue): the
                    # children's start-up is the test's cost, not the gateway's.
                    peak_fds = process_fds(gateway.pid)
                    go.set()
                    for _ in range(int(hold / 0.1)):
                        await trio.sleep(0.1)
                        peak_fds = max(peak_fds, process_fds(gateway.pid))
                    during = await health(gateway)
                # The flood's sockets close (thousands of EOFs at once): the callers go on
                # through it and a second past it.
                await trio.sleep(1.0)
                stop.set()
            after = await wait_for_fds(gateway.pid, baseline + 8, 60)
            report = await health(gateway)
            rss, hwm = process_memory(gateway.pid)
    p99_unloaded = percentile(unloaded.every, 0.99)
    p99_loaded = percentile(loaded.every, 0.99)
    print(
        f"\nidle flood: {per_port} connections asked on each of {', '.join(flooded)}, held "
        + ", ".join(f"{name} {sum(counts)}" for name, counts in held.items())
        + f"; normal streams: {p99_figures(unloaded, loaded)}; gateway fds {baseline} before, "
        f"{peak_fds} peak, {after} after; RSS peak {hwm / MiB:.0f} MiB, now {rss / MiB:.0f} MiB"
    )
    assert len(loaded.every) >= 4, "no normal traffic ran during the flood"
    # Past the listener's socket cap and accept queue, connects wait (SYN dropped): a port
    # holds ~max_sockets + somaxconn at most.
    assert min(sum(counts) for counts in held.values()) >= min(per_port, 2000), "no flood"
    assert after <= baseline + 8
    assert hwm <= RSS_BOUND
    no_actor_gave_up(during)
    no_actor_gave_up(report)
    assert report["status"] == "ok", report
    assert p99_loaded <= p99_bound(p99_unloaded, chaos_size)


@pytest.mark.parametrize(
    "chaos_size", [pytest.param(False, id="small"), pytest.param(True, id="full", marks=pytest.mark.chaos)]
)
async def test_hostile_upstreams_fail_over_while_others_stream(
    chaos_size: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = 150 if chaos_size else 40
    hostile_each = 40 if chaos_size else 6
    hostile_callers = 1  # per behaviour: 3 callers beside the 4 normal ones
    monkeypatch.setenv("RR_RESOURCES_KEY", "sk-resources-0123456789")
    async with serve_mock_provider() as mock, hostile_upstream_process(alarm=3 * GiB) as hostile_url:
        text = HEALTHY.format(mock=mock.base_url) + "".join(
            HOSTILE.removeprefix(HEALTHY).format(name=name, hostile=hostile_url, model=model)
            for name, model in BEHAVIOURS.items()
        )
        path = write_config(tmp_path, text)
        async with run_gateway_process(path) as gateway:
            async with normal_traffic(gateway, None, requests) as unloaded:
                pass
            baseline = process_fds(gateway.pid)
            codes: list[str] = []

            async def whole(model: str) -> None:
                body = {"model": model, "messages": MESSAGES}
                async with httpx.AsyncClient(base_url=gateway.http_url, timeout=120) as client:
                    for _ in range(hostile_each):
                        response = await client.post("/v1/chat/completions", json=body)
                        assert response.status_code == 200, response.text
                        data = response.json()
                        assert data["choices"][0]["message"]["content"] == SCRIPTED_ANSWER
                        first, last = data["relayrace"]["attempts"]
                        assert (first["actor"], last["actor"]) == (model_actor[model], "good")
                        codes.append(first["failure"]["code"])

            async def streamed(model: str) -> None:
                async with open_websocket_url(gateway.ws_url) as ws:
                    for n in range(hostile_each):
                        _, done = await ws_stream(ws, n, model)
                        first, last = done["attempts"]
                        assert (first["actor"], last["actor"]) == (model_actor[model], "good")
                        codes.append(first["failure"]["code"])

            model_actor = {model: name for name, model in BEHAVIOURS.items()}
            stop, go = trio.Event(), trio.Event()
            async with normal_traffic(gateway, stop, 0, go) as loaded:
                await trio.sleep(0.5)  # the callers are connected
                go.set()
                async with trio.open_nursery() as attackers:
                    for _ in range(hostile_callers):
                        attackers.start_soon(whole, "huge-body")
                        attackers.start_soon(whole, "gzip-bomb")
                        attackers.start_soon(streamed, "endless-line")
                stop.set()
            after = await wait_for_fds(gateway.pid, baseline + 8, 30)
            report = await health(gateway)
            rss, hwm = process_memory(gateway.pid)
    p99_unloaded = percentile(unloaded.every, 0.99)
    p99_loaded = percentile(loaded.every, 0.99)
    print(
        f"\nhostile upstreams: {len(codes)} hostile requests failed over ({sorted(set(codes))}), "
        f"normal streams: {p99_figures(unloaded, loaded)}; gateway fds {baseline} "
        f"before, {after} after; RSS peak {hwm / MiB:.0f} MiB, now {rss / MiB:.0f} MiB"
    )
    assert len(codes) == 3 * hostile_callers * hostile_each
    assert set(codes) <= LIMIT_CODES, codes
    assert p99_loaded <= p99_bound(p99_unloaded, chaos_size)
    assert after <= baseline + 8
    assert hwm <= RSS_BOUND
    no_actor_gave_up(report)


async def test_a_compressed_body_past_the_ratio_cap_is_refused_early_within_the_size_limit() -> None:
    # 8 MiB inflated, far under the limits: refused for its ratio (~1000×) after ~1 MiB, whole
    # or streamed; a body of ordinary ratio, larger than the ratio's floor, is read.
    content = b"a" * (8 * MiB)
    whole = gzip.compress(b'{"choices":[{"message":{"content":"' + content + b'"}}]}')
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + content + b'"}}]}\n\n'
    streamed = gzip.compress(event + b"data: [DONE]\n\n")
    rng = random.Random(11)
    words = "".join(rng.choice(["fox ", "jumps ", "over ", "lazy ", "dog "]) for _ in range(600_000))
    ordinary = {"model": "gpt", "choices": [{"message": {"content": words}, "finish_reason": "stop"}]}
    packed = gzip.compress(json.dumps(ordinary).encode())
    assert len(json.dumps(ordinary)) > 2 * MiB and len(packed) > 2 * MiB // 20

    def respond(body: bytes, kind: str = "application/json") -> httpx.MockTransport:
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        headers = {"content-type": kind, "content-encoding": "gzip"}
        return httpx.MockTransport(
            lambda request: httpx.Response(200, headers=headers, stream=_Pieces(pieces))
        )

    big = {"max_body_bytes": 64 * MiB, "max_sse_line_bytes": 64 * MiB, "max_event_bytes": 64 * MiB}
    for transport, stream in ((respond(whole), False), (respond(streamed, "text/event-stream"), True)):
        error = await fail(OpenAIClient(api_key=KEY, transport=transport, **big), stream=stream)
        assert error.failure.code == "response_too_large", error.failure
        assert "inflating to more than" in error.failure.message
    client = OpenAIClient(api_key=KEY, transport=respond(packed), **big)
    sink = Sink()
    await client.call(call(), sink)
    await client.aclose()
    assert "".join(sink.deltas) == words


class _Pieces(httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    async def __aiter__(self):  # type: ignore[override]
        for piece in self.pieces:
            await trio.lowlevel.checkpoint()
            yield piece
