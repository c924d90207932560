"""Cancellation reaches upstream: a caller that cancels (in-process), sends ``cancel``, or drops
its websocket or HTTP connection mid-answer makes the mock provider see its connection closed
within 50 ms; the provider is not penalised and no other provider is tried; nothing is left
running or open.

On the ``autojump_clock`` the latency is exact (and zero). ``--chaos`` adds the real-clock runs
(wall time, loopback sockets, this machine's scheduling: too noisy for the default run), which
measure the distribution (p50 / p99 / max) over many cancellations of each kind.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from relayrace import (
    Budgets,
    Config,
    Policies,
    ProviderConfig,
    Request,
    RetryPolicy,
    Route,
    Supervisor,
    open_supervisor,
)
from relayrace.actors import OpenAIClient, State
from relayrace.server import Server, ServerSettings, serve
from relayrace.testing import MockAttempt, MockProvider, serve_mock_provider

from .reliability import MESSAGES, live_tasks, open_sockets, percentile

#: 40 chunks, 0.1 s apart: the mock waits on the socket between chunks, so it sees a close at
#: once. (A mock that is busy writing would only notice at its next write.)
SLOW = "ok,chunks=40,delay=0.1"
BOUND = 0.05


@asynccontextmanager
async def world(slow: str = SLOW) -> AsyncIterator[tuple[MockProvider, Supervisor, Server]]:
    """The mock, a supervisor whose primary answers slowly and whose backup is healthy, both
    endpoints; checks on the way out that nothing is left."""
    tasks, sockets = live_tasks(), open_sockets()
    async with serve_mock_provider() as mock:
        config = Config(
            providers=[
                ProviderConfig(
                    name=name,
                    client=OpenAIClient(base_url=f"{mock.base_url}/v1", max_connections=8),
                    model=model,
                    budgets=Budgets(first_token=10.0, idle=10.0),
                )
                for name, model in (("primary", slow), ("backup", "ok"))
            ],
            routes=[Route(model="chat", chain=["primary", "backup"])],
            policies=Policies(retry=RetryPolicy(max_attempts=1)),
        )
        async with open_supervisor(config) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, ServerSettings(ws_port=0, http_port=0))
            yield mock, sup, server
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert mock.open_connections == 0
        assert mock.errors == []
    assert live_tasks() == tasks
    assert open_sockets() == sockets


# --- the ways a caller leaves; each returns the time it left ---------------------------------------


async def leave_stream(sup: Supervisor, server: Server, mock: MockProvider) -> float:
    async with sup.stream(Request("chat", MESSAGES)) as s:
        async for delta in s:
            if delta.seq == 2:
                break
        return trio.current_time()


async def cancel_complete(sup: Supervisor, server: Server, mock: MockProvider) -> float:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.complete, Request("chat", MESSAGES))
            await reached(mock)
            left_at = trio.current_time()
            scope.cancel()
    return left_at


@asynccontextmanager
async def open_ws(server: Server) -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A websocket to the server over a TCP stream this test owns, so that it can drop the
    connection without a closing handshake, and closes it on the way out (trio-websocket's
    client leaves its socket open when the server closes the websocket first)."""
    assert server.ws_port is not None
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
        try:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{server.ws_port}", "/")
            try:
                yield ws, stream
            finally:
                await ws.aclose()
        finally:
            await stream.aclose()


async def ws_cancel(sup: Supervisor, server: Server, mock: MockProvider) -> float:
    async with open_ws(server) as (ws, _):
        frame = {"type": "request", "id": "x", "model": "chat", "messages": MESSAGES}
        await ws.send_message(json.dumps(frame))
        for _ in range(3):
            assert json.loads(await ws.get_message())["type"] == "delta"
        left_at = trio.current_time()
        await ws.send_message(json.dumps({"type": "cancel", "id": "x"}))
        while (last := json.loads(await ws.get_message()))["type"] == "delta":
            pass
        assert last["type"] == "error" and last["code"] == "cancelled"
    return left_at


async def ws_drop(sup: Supervisor, server: Server, mock: MockProvider) -> float:
    async with open_ws(server) as (ws, stream):
        frame = {"type": "request", "id": "x", "model": "chat", "messages": MESSAGES}
        await ws.send_message(json.dumps(frame))
        for _ in range(3):
            assert json.loads(await ws.get_message())["type"] == "delta"
        # Drop the TCP connection without a closing handshake.
        left_at = trio.current_time()
        await stream.aclose()
    return left_at


async def reached(mock: MockProvider) -> None:
    """Wait until the request has reached the mock (a non-streamed answer gives no sign of
    life before it is whole), and a little more."""
    await until(lambda: bool(mock.log))
    await trio.sleep(0.02)


async def until(done: Callable[[], bool]) -> None:
    """Poll ``done``: the mock and the actors have no event to wait for."""
    while not done():  # noqa: ASYNC110
        await trio.sleep(0.005)


async def _raw_post(server: Server, stream_answer: bool) -> trio.SocketStream:
    assert server.http_port is not None
    body = json.dumps({"model": "chat", "messages": MESSAGES, "stream": stream_answer}).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return stream


async def http_drop_stream(sup: Supervisor, server: Server, mock: MockProvider) -> float:
    # A raw socket, so that closing it mid-body is all the client does.
    async with await _raw_post(server, True) as stream:
        received = b""
        while received.count(b"data: ") < 3:
            received += await stream.receive_some()
        assert received.startswith(b"HTTP/1.1 200")
    return trio.current_time()


async def http_drop_complete(sup: Supervisor, server: Server, mock: MockProvider) -> float:
    async with await _raw_post(server, False):
        await reached(mock)  # the whole answer takes 39 chunk delays: still in flight
        assert sup.health()["primary"].in_flight == 1
    return trio.current_time()


#: Each takes the supervisor, the server and the mock; each returns the time the caller left.
LEAVES: dict[str, Callable[[Supervisor, Server, MockProvider], Awaitable[float]]] = {
    "in-process stream left early": leave_stream,
    "in-process complete cancelled": cancel_complete,
    "websocket cancel frame": ws_cancel,
    "websocket dropped": ws_drop,
    "http stream dropped": http_drop_stream,
    "http complete dropped": http_drop_complete,
}


def check_attempt(mock: MockProvider, sup: Supervisor, model: str = SLOW) -> MockAttempt:
    (attempt,) = mock.attempts(model)
    assert attempt.outcome == "cancelled"
    assert attempt.client_closed_at is not None
    assert attempt.chunks < 40
    snap = sup.health()["primary"]
    assert snap.state is State.OK and snap.consecutive_failures == 0 and snap.in_flight == 0
    assert mock.attempts("ok") == []  # no failover for a caller that left
    return attempt


@pytest.mark.parametrize("how", list(LEAVES))
async def test_cancellation_reaches_upstream_at_once(autojump_clock, how):
    async with world() as (mock, sup, server):
        left_at = await LEAVES[how](sup, server, mock)
        await trio.testing.wait_all_tasks_blocked()  # let the mock see the close
        attempt = check_attempt(mock, sup)
        assert attempt.client_closed_at is not None
        # The mock clock only moves when every task waits: the close reached the provider
        # before any time passed.
        assert attempt.client_closed_at - left_at < BOUND
        assert attempt.client_closed_at == left_at
        assert sup.statistics().in_flight == 0


async def measure(samples: int) -> dict[str, list[float]]:
    """Cancel ``samples`` requests of each kind on the real clock; the latencies, by kind, net
    of any garbage-collector pause inside the measured window.

    A full (generation 2) collection stops the whole process for ~40-55 ms on this machine, and
    lands inside a window now and then whatever the code under test does; such samples are
    counted and reported apart, and their raw latency is bounded more loosely.
    """
    # Faster chunks, so that the runs take little wall time: 10 ms apart.
    fast = "ok,chunks=40,delay=0.01"
    pauses: list[tuple[float, float]] = []  # (start, duration) of each collection
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(trio.current_time())
        elif started:
            at = started.pop()
            pauses.append((at, trio.current_time() - at))

    results: dict[str, list[float]] = {}
    raw: list[float] = []
    hit = 0
    gc.callbacks.append(on_gc)
    try:
        for how, leave in LEAVES.items():
            latencies = results[how] = []
            async with world(fast) as (mock, sup, server):
                for _ in range(samples):
                    mock.reset()
                    left_at = await leave(sup, server, mock)
                    # Wait (on the real clock) until the mock and the actor are done with it.
                    with trio.move_on_after(1) as waited:
                        await until(
                            lambda: bool(
                                (a := mock.attempts(fast))
                                and a[0].outcome != "pending"
                                and sup.health()["primary"].in_flight == 0
                            )
                        )
                    assert not waited.cancelled_caught, (how, mock.log, sup.health())
                    attempt = check_attempt(mock, sup, fast)
                    closed_at = attempt.client_closed_at
                    assert closed_at is not None
                    paused = sum(d for at, d in pauses if left_at <= at <= closed_at)
                    hit += paused > 0
                    raw.append(closed_at - left_at)
                    latencies.append(closed_at - left_at - paused)
    finally:
        gc.callbacks.remove(on_gc)
    print("\ncancellation latency, caller leaves -> mock sees the close (real clock, ms):")
    for how, latencies in results.items():
        print(
            f"  {how:30s} n={len(latencies)} p50={percentile(latencies, 0.5) * 1e3:.2f} "
            f"p99={percentile(latencies, 0.99) * 1e3:.2f} max={max(latencies) * 1e3:.2f}"
        )
    print(
        f"  {hit} of {len(raw)} samples had a garbage-collector pause inside their window; "
        f"raw max {max(raw) * 1e3:.2f} ms"
    )
    # The claim: within 50 ms. A full collection on top may add as much again.
    assert max(raw) < 2 * BOUND
    return results


@pytest.mark.chaos
async def test_cancellation_latency_on_the_real_clock_small():
    """A few cancellations of each kind on the real clock (wall time, loopback sockets, this
    machine's scheduling): each reaches the provider within the bound."""
    results = await measure(5)
    assert max(max(latencies) for latencies in results.values()) < BOUND


@pytest.mark.chaos
async def test_cancellation_latency_on_the_real_clock():
    """The distribution over many cancellations of each kind, on the real clock."""
    results = await measure(300)
    assert max(max(latencies) for latencies in results.values()) < BOUND
