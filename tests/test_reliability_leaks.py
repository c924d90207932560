"""Nothing leaks, and overload is refused rather than buffered.

- A shutdown with requests in flight on every surface leaves no task, no socket and no upstream
  connection, and every request still ends once.
- Memory returns to its baseline after many requests (tracemalloc): a few thousand by default,
  100k with ``--chaos``.
- More requests than the actors' inboxes and concurrency allow: the excess is refused at once
  with ``local_capacity`` (in-process, websocket, HTTP), the rest is queued within the bound and
  served; the provider never sees more than the configured concurrency.
"""

from __future__ import annotations

import gc
import json
import math
import time
import tracemalloc
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from relayrace import (
    Action,
    Budgets,
    Category,
    Config,
    Policies,
    ProviderConfig,
    Request,
    RequestFailed,
    RetryPolicy,
    Route,
    Supervisor,
    open_supervisor,
)
from relayrace.actors import ClientCall, Completion, OpenAIClient, Sink
from relayrace.server import ServerSettings, serve
from relayrace.testing import SCRIPTED_ANSWER, Answer, MockAttempt, serve_mock_provider

from .reliability import MESSAGES, live_tasks, open_sockets
from .support import client, config, request, scripted_provider

# --- shutdown with requests in flight -------------------------------------------------------------


async def test_shutdown_with_requests_in_flight_everywhere_leaves_nothing(autojump_clock):
    tasks, sockets = live_tasks(), open_sockets()
    slow = "ok,chunks=40,delay=0.5"
    endings: dict[str, list[str]] = {}

    def ended(key: str, how: str) -> None:
        endings.setdefault(key, []).append(how)

    async with serve_mock_provider() as mock:
        config = Config(
            providers=[
                ProviderConfig(
                    name="a",
                    client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=64),
                    model=slow,
                )
            ],
            routes=[Route(model="chat", chain=["a"])],
        )

        async def in_process(i: int) -> None:
            try:
                if i % 2:
                    async with sup.stream(Request("chat", MESSAGES)) as s:
                        async for _ in s:
                            pass
                else:
                    await sup.complete(Request("chat", MESSAGES))
                ended(f"p{i}", "reply")
            except RequestFailed as exc:
                assert exc.failure.category is Category.LOCAL_CAPACITY
                ended(f"p{i}", exc.failure.code or "")

        async def over_websocket(url: str) -> None:
            async with open_websocket_url(url) as ws:
                for i in range(5):
                    frame = {"type": "request", "id": i, "model": "chat", "messages": MESSAGES}
                    await ws.send_message(json.dumps(frame))
                try:
                    while True:
                        frame = json.loads(await ws.get_message())
                        if frame["type"] != "delta":
                            ended(f"w{frame['id']}", frame.get("code", frame["type"]))
                except Exception:  # the server closed the connection
                    pass
                await ws._stream.aclose()

        async def over_http(url: str, i: int) -> None:
            body = {"model": "chat", "messages": MESSAGES, "stream": bool(i % 2)}
            async with httpx.AsyncClient(base_url=url, timeout=None) as http:
                response = await http.post("/v1/chat/completions", json=body)
                ended(f"h{i}", str(response.status_code))

        async with trio.open_nursery() as callers:
            async with open_supervisor(config) as sup:
                async with trio.open_nursery() as nursery:
                    settings = ServerSettings(ws_port=0, http_port=0, shutdown_grace=1.0)
                    server = await nursery.start(serve, sup, settings)
                    assert server.ws_url is not None and server.http_url is not None
                    for i in range(10):
                        callers.start_soon(in_process, i)
                        callers.start_soon(over_http, server.http_url, i)
                    callers.start_soon(over_websocket, server.ws_url)
                    await trio.sleep(2.0)  # every request is in flight, mid-answer
                    assert sup.statistics().in_flight == 25
                    assert mock.open_connections == 25
                    server.shutdown()  # graceful: 1 s of grace, then cancelled and told so
                # The server is down; the in-process requests are still running: leaving the
                # supervisor's block cancels them.
            assert sup.statistics().in_flight == 0
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0
        assert mock.errors == []
        assert all(a.outcome == "cancelled" for a in mock.log)
    assert sorted(endings) == sorted(
        [f"p{i}" for i in range(10)] + [f"h{i}" for i in range(10)] + [f"w{i}" for i in range(5)]
    )
    assert all(len(e) == 1 for e in endings.values()), endings
    assert set(endings[f"p{i}"][0] for i in range(10)) == {"supervisor_closed"}
    # Streamed HTTP answers had started (200, then an error event); whole ones get a 503.
    assert {endings[f"h{i}"][0] for i in range(0, 10, 2)} == {"503"}
    assert {endings[f"h{i}"][0] for i in range(1, 10, 2)} == {"200"}
    assert {endings[f"w{i}"][0] for i in range(5)} == {"server_shutdown"}
    assert live_tasks() == tasks
    assert open_sockets() == sockets


async def test_complete_calls_in_flight_or_queued_end_at_once_when_the_supervisor_closes(
    autojump_clock,
):
    """``complete`` waits in its caller's task: at shutdown it must not fail over to an actor
    that is gone, nor wait in the inbox of one, until the request's budget runs out."""
    cfg = config(
        scripted_provider("a", Answer(chunks=5, delay=10.0), max_concurrency=1),
        scripted_provider("b", Answer(chunks=5, delay=10.0)),
    )
    ended: list[tuple[float, RequestFailed]] = []

    async def one(sup: Supervisor) -> None:
        with pytest.raises(RequestFailed) as info:
            await sup.complete(request())
        ended.append((trio.current_time(), info.value))

    async with trio.open_nursery() as callers:
        async with open_supervisor(cfg) as sup:
            callers.start_soon(one, sup)  # runs on a
            callers.start_soon(one, sup)  # queued in a's inbox behind it
            await trio.sleep(1.0)
            assert sup.statistics().in_flight == 2
    assert [at for at, _ in ended] == [1.0, 1.0]
    for _, exc in ended:
        assert exc.failure.category is Category.LOCAL_CAPACITY
        assert exc.failure.code == "supervisor_closed"
        assert all(d.action is not Action.FAILOVER for d in exc.decisions)
    assert client(cfg, "b").calls == []
    assert sup.statistics().failovers == 0


# --- memory ---------------------------------------------------------------------------------------


class Lean:
    """A provider client that answers at once in a few chunks and remembers nothing (the
    ``ScriptedClient`` records every call, which a memory test must not count)."""

    async def call(self, call: ClientCall, sink: Sink) -> Completion:
        for word in SCRIPTED_ANSWER.split(" "):
            await sink.delta(word + " ")
        return Completion(model=call.upstream_model, usage=None, finish_reason="stop")


async def test_memory_returns_to_baseline_after_many_requests(autojump_clock, chaos):
    requests = 100_000 if chaos else 1_000
    batch = 100
    config = Config(
        providers=[ProviderConfig(name="a", client=Lean()), ProviderConfig(name="b", client=Lean())],
        routes=[Route(model="m", chain=["a", "b"])],
    )

    async with open_supervisor(config) as sup:

        async def one(i: int) -> None:
            if i % 2:
                async with sup.stream(Request("m", MESSAGES)) as s:
                    async for _ in s:
                        pass
            else:
                await sup.complete(Request("m", MESSAGES))

        async def run(n: int) -> None:
            for start in range(0, n, batch):
                async with trio.open_nursery() as nursery:
                    for i in range(start, start + batch):
                        nursery.start_soon(one, i)

        async def settle() -> None:
            # Let every deadline of the finished attempts pass (the mock clock jumps): trio
            # drops them from its deadline heap, which would otherwise hold up to ~1000 stale
            # entries (~120 KiB) while the clock stands still.
            await trio.sleep(3600)
            gc.collect()

        # Traced from before the warm-up: a container that grows during the warm-up (the sets
        # of trio's tasks and scopes, sized for a batch) would otherwise count as new memory.
        tracemalloc.start()
        try:
            await run(500)  # warm-up: caches, interned strings, the retry budget's buckets
            await settle()
            baseline = tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            await run(requests)
            elapsed = time.perf_counter() - started
            await settle()
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        stats = sup.statistics()
    growth = after - baseline
    print(
        f"\nmemory: {requests} requests (half streamed, {batch} at a time) in {elapsed:.1f} s "
        f"under tracemalloc ({requests / elapsed:.0f}/s); traced memory grew by "
        f"{growth / 1024:+.1f} KiB ({growth / requests:.1f} B per request), peak "
        f"{peak / 1024:.0f} KiB"
    )
    assert stats.completed == requests + 500 and stats.failed == 0
    # Loose, for the allocators' own slack: a leak of even 10 bytes per request breaks it by
    # default, and of a fraction of a byte per request with --chaos.
    assert growth < 16 * 1024


# --- overload -------------------------------------------------------------------------------------


def overloaded_config(base_url: str) -> Config:
    """Two actors, each running 4 attempts at once with 8 more queued."""
    return Config(
        providers=[
            ProviderConfig(
                name=name,
                client=OpenAIClient(base_url=f"{base_url}/v1", max_connections=4),
                model=f"ok,chunks=5,delay=1,tag={name}",
                max_concurrency=4,
                inbox_size=8,
                budgets=Budgets(first_token=60.0, idle=60.0),
            )
            for name in ("a", "b")
        ],
        routes=[Route(model="chat", chain=["a", "b"])],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )


CAPACITY = 2 * (4 + 8)


async def test_overload_in_process_is_refused_at_once_or_queued_within_the_bound(autojump_clock):
    offered = 100
    served: list[float] = []
    refused: list[tuple[float, RequestFailed]] = []
    async with serve_mock_provider() as mock:
        config = overloaded_config(mock.base_url)
        async with open_supervisor(config) as sup:

            async def one() -> None:
                try:
                    reply = await sup.complete(Request("chat", MESSAGES))
                    assert reply.text == SCRIPTED_ANSWER
                    served.append(trio.current_time())
                except RequestFailed as exc:
                    refused.append((trio.current_time(), exc))

            async with trio.open_nursery() as nursery:
                for _ in range(offered):
                    nursery.start_soon(one)
                await trio.testing.wait_all_tasks_blocked()
                # Within the bound: what runs is the concurrency, what waits fits the inboxes.
                in_flight = sup.statistics().in_flight
                assert 2 * 8 <= in_flight <= CAPACITY
                assert mock.open_connections == 8
                assert all(s.in_flight == 4 for s in sup.health().values())
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0
        assert len(mock.log) == in_flight  # the refused ones never reached the provider
        for name in ("a", "b"):
            assert max_overlap(mock.attempts(f"ok,chunks=5,delay=1,tag={name}")) == 4
    assert len(served) == in_flight
    assert len(refused) == offered - in_flight
    for at, exc in refused:
        assert at == 0  # refused at once, no waiting
        assert exc.failure.category is Category.LOCAL_CAPACITY and exc.failure.code == "inbox_full"
        assert [a.failure.code for a in exc.attempts if a.failure] == ["inbox_full"] * 2
    # The queued ones ran after the first ones: 4 at a time per actor, 4 s each.
    assert set(served) <= {4.0, 8.0, 12.0}


def max_overlap(attempts: list[MockAttempt]) -> int:
    """The most attempts the mock was answering at once."""
    edges = sorted(
        [(a.started_at, 1) for a in attempts] + [(a.ended_at or math.inf, -1) for a in attempts],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


async def test_overload_over_http_and_websocket_is_refused_at_once(autojump_clock):
    async with serve_mock_provider() as mock:
        config = overloaded_config(mock.base_url)
        async with open_supervisor(config) as sup, trio.open_nursery() as nursery:
            settings = ServerSettings(ws_port=0, http_port=0, max_in_flight_per_connection=10)
            server = await nursery.start(serve, sup, settings)
            assert server.http_url is not None and server.ws_url is not None
            statuses: list[tuple[float, int, Any]] = []

            async def post(http: httpx.AsyncClient) -> None:
                body = {"model": "chat", "messages": MESSAGES}
                response = await http.post("/v1/chat/completions", json=body)
                statuses.append((trio.current_time(), response.status_code, response.json()))

            limits = httpx.Limits(max_connections=40)
            async with (
                httpx.AsyncClient(base_url=server.http_url, timeout=None, limits=limits) as http,
                trio.open_nursery() as posts,
            ):
                for _ in range(40):
                    posts.start_soon(post, http)
            served = [s for s in statuses if s[1] == 200]
            refused = [s for s in statuses if s[1] != 200]
            assert 2 * 8 <= len(served) <= CAPACITY and len(refused) == 40 - len(served)
            for at, status, data in refused:
                assert at == 0 and status == 503
                assert data["relayrace"]["category"] == "local_capacity"
                assert data["error"]["type"] == "service_unavailable_error"

            # One websocket connection may have 10 requests in flight: the 11th is refused.
            async with open_websocket_url(server.ws_url) as ws:
                for i in range(11):
                    frame = {"type": "request", "id": i, "model": "chat", "messages": MESSAGES}
                    await ws.send_message(json.dumps(frame))
                frames: list[dict[str, Any]] = []
                while len([f for f in frames if f["type"] in ("done", "error")]) < 11:
                    frames.append(json.loads(await ws.get_message()))
                    if frames[-1]["type"] == "error":
                        assert trio.current_time() == 12.0  # at once, after the HTTP part
                (error,) = [f for f in frames if f["type"] == "error"]
                assert error["id"] == 10 and error["category"] == "local_capacity"
                assert error["code"] == "too_many_requests"
                assert len([f for f in frames if f["type"] == "done"]) == 10
                await ws.aclose()
                await ws._stream.aclose()
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0

