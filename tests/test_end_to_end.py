"""The whole chain over real sockets: a client → the gateway (websocket or HTTP) → the
supervisor → a real HTTP provider client → the mock provider."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url

from relayrace import Budgets, Config, Policies, ProviderConfig, RetryPolicy, Route, open_supervisor
from relayrace.actors import OpenAIClient, State
from relayrace.server import Server, ServerSettings, serve
from relayrace.testing import SCRIPTED_ANSWER, MockProvider, serve_mock_provider

MESSAGES = [{"role": "user", "content": "hi"}]
SLOW = "ok,chunks=40,delay=0.1"


@asynccontextmanager
async def gateway(
    primary: str, backup: str = "ok,chunks=5", **settings: Any
) -> AsyncIterator[tuple[MockProvider, Any, Server]]:
    async with serve_mock_provider() as mock:
        config = Config(
            providers=[
                ProviderConfig(
                    name=name,
                    client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8),
                    model=model,
                    budgets=Budgets(first_token=5.0, idle=5.0),
                )
                for name, model in (("primary", primary), ("backup", backup))
            ],
            routes=[Route(model="chat", chain=["primary", "backup"])],
            policies=Policies(retry=RetryPolicy(max_attempts=1)),
        )
        async with open_supervisor(config) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(
                serve, sup, ServerSettings(ws_port=0, http_port=0, **settings)
            )
            yield mock, sup, server
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()  # let the mock see the last closes
        assert mock.open_connections == 0
        assert mock.errors == []


@asynccontextmanager
async def websocket(server: Server) -> AsyncIterator[WebSocketConnection]:
    assert server.ws_url is not None
    async with open_websocket_url(server.ws_url) as ws:
        yield ws


async def send(ws: WebSocketConnection, **frame: Any) -> None:
    await ws.send_message(json.dumps(frame))


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_websocket_multiplexes_requests_with_failover_end_to_end(autojump_clock):
    async with gateway("unavailable", "ok,chunks=5,delay=0.05") as (mock, sup, server):
        async with websocket(server) as ws:
            for i in range(6):
                await send(ws, type="request", id=f"r{i}", model="chat", messages=MESSAGES)
            texts: dict[str, list[str]] = {f"r{i}": [] for i in range(6)}
            endings: dict[str, dict[str, Any]] = {}
            while len(endings) < 6:
                frame = await receive(ws)
                if frame["type"] == "delta":
                    assert frame["seq"] == len(texts[frame["id"]])
                    texts[frame["id"]].append(frame["text"])
                else:
                    assert frame["id"] not in endings
                    endings[frame["id"]] = frame
    for rid, frame in endings.items():
        assert frame["type"] == "done", frame
        assert "".join(texts[rid]) == SCRIPTED_ANSWER and "text" not in frame
        assert frame["model"] == "ok,chunks=5,delay=0.05"
        actors = [a["actor"] for a in frame["attempts"]]
        assert actors[-1] == "backup" and frame["provider"] == "backup"
    # What the replies say agrees with what the provider saw.
    tried_primary = sum(
        1 for f in endings.values() for a in f["attempts"] if a["actor"] == "primary"
    )
    assert tried_primary == len(mock.attempts("unavailable"))
    assert len(mock.attempts("ok,chunks=5,delay=0.05")) == 6


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
async def test_websocket_cancel_and_disconnect_close_the_upstream_call(autojump_clock, how):
    async with gateway(SLOW) as (mock, sup, server):
        async with websocket(server) as ws:
            await send(ws, type="request", id="x", model="chat", messages=MESSAGES)
            for _ in range(3):
                assert (await receive(ws))["type"] == "delta"
            left_at = trio.current_time()
            if how == "cancel":
                await send(ws, type="cancel", id="x")
                while (frame := await receive(ws))["type"] == "delta":
                    pass
                assert frame["type"] == "error" and frame["category"] == "cancelled"
        await settle()
        (attempt,) = mock.attempts(SLOW)
        assert attempt.outcome == "cancelled"
        assert attempt.client_closed_at is not None
        assert attempt.client_closed_at - left_at < 0.05
        assert attempt.chunks < 40
        snap = sup.health()["primary"]
        assert snap.state is State.OK and snap.consecutive_failures == 0 and snap.in_flight == 0
        assert mock.attempts("ok,chunks=5") == []  # no failover for a caller that left


async def test_http_client_disconnect_mid_stream_closes_the_upstream_call(autojump_clock):
    async with gateway(SLOW) as (mock, sup, server):
        # A raw socket, so that closing it mid-body is all the client does.
        body = json.dumps({"model": "chat", "messages": MESSAGES, "stream": True}).encode()
        assert server.http_port is not None
        async with await trio.open_tcp_stream("127.0.0.1", server.http_port) as stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            received = b""
            while received.count(b"data: ") < 3:
                received += await stream.receive_some()
            assert received.startswith(b"HTTP/1.1 200")
            assert b"x-relayrace-provider: primary" in received.lower()
        left_at = trio.current_time()
        await settle()
        (attempt,) = mock.attempts(SLOW)
        assert attempt.outcome == "cancelled"
        assert attempt.client_closed_at is not None
        assert attempt.client_closed_at - left_at < 0.05
        assert sup.health()["primary"].consecutive_failures == 0


async def test_http_stream_that_breaks_after_text_ends_with_an_error_event(autojump_clock):
    async with gateway("cut,after=2", "ok") as (mock, sup, server):
        body = {"model": "chat", "messages": MESSAGES, "stream": True}
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] != "data: [DONE]"
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"] and last["relayrace"]["category"] == "stream_error"
    assert mock.attempts("ok") == []  # mid-stream policy "error": no failover after text


async def test_graceful_shutdown_finishes_requests_in_flight(autojump_clock):
    async with gateway("ok,chunks=10,delay=0.2", shutdown_grace=10.0) as (mock, sup, server):
        async with websocket(server) as ws:
            await send(ws, type="request", id="a", model="chat", messages=MESSAGES, text=True)
            assert (await receive(ws))["type"] == "delta"
            server.shutdown()
            frames = []
            while (frame := await receive(ws))["type"] == "delta":
                frames.append(frame)
            assert frame["type"] == "done" and frame["text"] == SCRIPTED_ANSWER
        (attempt,) = mock.attempts("ok,chunks=10,delay=0.2")
        assert attempt.outcome == "ok"
