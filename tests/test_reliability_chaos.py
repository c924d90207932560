"""Chaos: many concurrent requests through the supervisor (in-process, over the websocket, over
HTTP) against real provider clients talking to the mock, whose faults are drawn at random from
its whole catalogue.

Whatever the providers do, every request ends exactly once, with a reply or an error; a reply
carries the whole answer the mock sent (never a truncated one presented as complete); a stream
that broke after text was released ends with ``stream_error``; and what the replies and errors
say about their attempts agrees with the mock's log. Nothing is left behind.

``--chaos`` multiplies the sizes (thousands of requests) and prints the throughput.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url

from relayrace import Category, Config, Request, RequestFailed, Supervisor, open_supervisor
from relayrace.server import Server, ServerSettings, serve
from relayrace.testing import MockProvider, serve_mock_provider

from .reliability import (
    MESSAGES,
    agree_with_the_mock,
    chaos_config,
    describe,
    expected_text,
    live_tasks,
    open_sockets,
)


def sizes(chaos: bool) -> tuple[int, int]:
    """(requests, websocket connections)."""
    return (3000, 16) if chaos else (200, 4)


def inboxes(chaos: bool) -> int:
    """Inbox size per actor: with --chaos, room for every request, so that the run exercises
    the faults rather than mostly refusing at the inboxes (overload has its own tests)."""
    return 4096 if chaos else 64


@asynccontextmanager
async def chaos_world(
    seed: int, *, server: bool = False, inbox_size: int = 64
) -> AsyncIterator[tuple[MockProvider, Config, Supervisor, Server | None, random.Random]]:
    """The mock, a chaos config drawn from ``seed``, its supervisor and (optionally) both
    endpoints; on the way out, checks that nothing is left: no task, no socket, no upstream
    connection, no error inside the mock."""
    tasks_before = live_tasks()
    sockets_before = open_sockets()
    rng = random.Random(seed)
    async with serve_mock_provider() as mock:
        mock.reset()
        cfg = chaos_config(mock, rng, inbox_size=inbox_size)
        async with open_supervisor(cfg) as sup:
            if server:
                async with trio.open_nursery() as nursery:
                    settings = ServerSettings(
                        ws_port=0, http_port=0, max_in_flight_per_connection=10_000
                    )
                    srv = await nursery.start(serve, sup, settings)
                    yield mock, cfg, sup, srv, rng
                    nursery.cancel_scope.cancel()
            else:
                yield mock, cfg, sup, None, rng
            assert sup.statistics().in_flight == 0
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0, describe(cfg)
        assert mock.errors == []
    assert live_tasks() == tasks_before
    assert open_sockets() == sockets_before


def report(surface: str, n: int, started: float, endings: dict[Any, Any]) -> None:
    elapsed = time.perf_counter() - started
    replies = sum(1 for e in endings.values() if e[0] == "reply")
    print(
        f"\n{surface}: {n} requests in {elapsed:.2f} s real ({n / elapsed:.0f}/s), "
        f"{replies} replies, {n - replies} errors"
    )


# --- in-process -----------------------------------------------------------------------------------


async def test_in_process_every_request_ends_exactly_once(autojump_clock, chaos, seed):
    n, _ = sizes(chaos)
    endings: dict[int, list[Any]] = {}
    attempts: list[Any] = []
    started = time.perf_counter()
    async with chaos_world(seed, inbox_size=inboxes(chaos)) as (mock, cfg, sup, _, rng):
        routes = [r.model for r in cfg.routes]

        async def one(i: int, route: str, streaming: bool) -> None:
            request = Request(route, MESSAGES)
            released: list[str] = []
            try:
                if streaming:
                    async with sup.stream(request) as s:
                        async for delta in s:
                            assert delta.seq == len(released)
                            released.append(delta.text)
                    reply = s.reply
                    assert "".join(released) == reply.text
                else:
                    reply = await sup.complete(request)
            except RequestFailed as exc:
                ending: tuple[Any, ...] = ("error", exc.failure.category, bool(released))
                attempts.extend(exc.attempts)
            else:
                ending = ("reply", reply.provider, reply.text)
                attempts.extend(reply.attempts)
            assert i not in endings, f"request {i} ended twice"
            endings[i] = list(ending)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i, rng.choice(routes), rng.random() < 0.5)
        models = {p.name: p.model for p in cfg.providers}
        await trio.testing.wait_all_tasks_blocked()
        agree_with_the_mock(mock, cfg, attempts)
    report(f"in-process seed {seed}", n, started, endings)

    assert sorted(endings) == list(range(n))
    for kind, *rest in endings.values():
        if kind == "reply":
            provider, text = rest
            assert text == expected_text(models[provider]), describe(cfg)
        else:
            category, released = rest
            if released:
                assert category is Category.STREAM_ERROR, describe(cfg)


# --- over the websocket ---------------------------------------------------------------------------


async def ws_client(
    url: str, requests: list[tuple[int, str]], endings: dict[int, list[Any]], attempts: list[Any]
) -> None:
    """Sends every request at once on one connection, then reads until each has ended."""
    async with open_websocket_url(url) as ws:
        for i, route in requests:
            frame = {"type": "request", "id": i, "model": route, "messages": MESSAGES, "text": True}
            await ws.send_message(json.dumps(frame))
        texts: dict[int, list[str]] = {i: [] for i, _ in requests}
        pending = set(texts)
        while pending:
            frame = json.loads(await ws.get_message())
            rid = frame["id"]
            if frame["type"] == "delta":
                assert rid in pending
                assert frame["seq"] == len(texts[rid])
                texts[rid].append(frame["text"])
                continue
            assert frame["type"] in ("done", "error"), frame
            assert rid in pending and rid not in endings, f"a second ending for {rid}: {frame}"
            pending.discard(rid)
            attempts.extend(frame["attempts"])
            if frame["type"] == "done":
                assert "".join(texts[rid]) == frame["text"]
                endings[rid] = ["reply", frame["provider"], frame["text"]]
            else:
                endings[rid] = ["error", Category(frame["category"]), bool(texts[rid])]
        await _close(ws)


async def _close(ws: WebSocketConnection) -> None:
    await ws.aclose()
    # trio-websocket's client may leave its TCP socket to the server's close (see
    # tests/test_server_websocket.py): close it ourselves so the socket count is exact.
    await ws._stream.aclose()


async def test_websocket_every_request_ends_exactly_once(autojump_clock, chaos, seed):
    n, connections = sizes(chaos)
    endings: dict[int, list[Any]] = {}
    attempts: list[Any] = []
    started = time.perf_counter()
    async with chaos_world(seed, server=True, inbox_size=inboxes(chaos)) as (
        mock,
        cfg,
        sup,
        server,
        rng,
    ):
        assert server is not None and server.ws_url is not None
        routes = [r.model for r in cfg.routes]
        batches: list[list[tuple[int, str]]] = [[] for _ in range(connections)]
        for i in range(n):
            batches[i % connections].append((i, rng.choice(routes)))
        async with trio.open_nursery() as nursery:
            for batch in batches:
                nursery.start_soon(ws_client, server.ws_url, batch, endings, attempts)
        await trio.testing.wait_all_tasks_blocked()
        agree_with_the_mock(mock, cfg, attempts)
        models = {p.name: p.model for p in cfg.providers}
    report(f"websocket seed {seed}", n, started, endings)

    assert sorted(endings) == list(range(n))
    for kind, *rest in endings.values():
        if kind == "reply":
            provider, text = rest
            assert text == expected_text(models[provider]), describe(cfg)
        elif rest[1]:
            assert rest[0] is Category.STREAM_ERROR, describe(cfg)


# --- over HTTP ------------------------------------------------------------------------------------


async def http_one(
    http: httpx.AsyncClient,
    i: int,
    route: str,
    streaming: bool,
    endings: dict[int, list[Any]],
    attempts: list[Any],
) -> None:
    body = {"model": route, "messages": MESSAGES, "stream": streaming}
    if not streaming:
        response = await http.post("/v1/chat/completions", json=body)
        data = response.json()
        if response.status_code == 200:
            trace = data["relayrace"]
            text = data["choices"][0]["message"]["content"]
            assert response.headers["x-relayrace-provider"] == trace["provider"]
            ending = ["reply", trace["provider"], text]
        else:
            trace = data["relayrace"]
            ending = ["error", Category(trace["category"]), False]
        attempts.extend(trace["attempts"])
    else:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                trace = json.loads(await response.aread())["relayrace"]
                ending = ["error", Category(trace["category"]), False]
            else:
                events = [
                    line.removeprefix("data: ")
                    async for line in response.aiter_lines()
                    if line.startswith("data: ")
                ]
                parsed = [json.loads(e) for e in events if e != "[DONE]"]
                text = "".join(
                    c["choices"][0]["delta"].get("content", "") for c in parsed if c.get("choices")
                )
                if events[-1] == "[DONE]":
                    # The chunk with the finish reason carries the trace.
                    (trace,) = [c["relayrace"] for c in parsed if "relayrace" in c]
                    ending = ["reply", trace["provider"], text]
                else:
                    # A failure after the first delta: one error event, and no [DONE].
                    assert "error" in parsed[-1] and "[DONE]" not in events
                    trace = parsed[-1]["relayrace"]
                    ending = ["error", Category(trace["category"]), bool(text)]
        attempts.extend(trace["attempts"])
    assert i not in endings
    endings[i] = ending


async def test_http_every_request_ends_exactly_once(autojump_clock, chaos, seed):
    n, _ = sizes(chaos)
    endings: dict[int, list[Any]] = {}
    attempts: list[Any] = []
    started = time.perf_counter()
    async with chaos_world(seed, server=True, inbox_size=inboxes(chaos)) as (
        mock,
        cfg,
        sup,
        server,
        rng,
    ):
        assert server is not None and server.http_url is not None
        routes = [r.model for r in cfg.routes]
        # Several clients, each never asked for more requests than its pool has connections:
        # httpx's pool gets slow (quadratic) with hundreds of requests queued in one pool.
        clients, per_client = (8, 32) if chaos else (4, 32)
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        async with contextlib.AsyncExitStack() as stack:
            pool = [
                (
                    await stack.enter_async_context(
                        httpx.AsyncClient(base_url=server.http_url, timeout=None, limits=limits)
                    ),
                    trio.CapacityLimiter(per_client),
                )
                for _ in range(clients)
            ]

            async def limited(i: int, route: str, streaming: bool) -> None:
                http, limiter = pool[i % clients]
                async with limiter:
                    await http_one(http, i, route, streaming, endings, attempts)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(limited, i, rng.choice(routes), rng.random() < 0.5)
        await trio.testing.wait_all_tasks_blocked()
        agree_with_the_mock(mock, cfg, attempts)
        models = {p.name: p.model for p in cfg.providers}
    report(f"http seed {seed}", n, started, endings)

    assert sorted(endings) == list(range(n))
    for kind, *rest in endings.values():
        if kind == "reply":
            provider, text = rest
            assert text == expected_text(models[provider]), describe(cfg)
        elif rest[1]:
            assert rest[0] is Category.STREAM_ERROR, describe(cfg)
