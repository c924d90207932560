"""The websocket endpoint, over real loopback sockets, against a supervisor of scripted providers."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from relayrace import Category, Config, ConfigError, Route, Supervisor, open_supervisor
from relayrace.server import Server, ServerSettings, serve
from relayrace.server._common import dumps
from relayrace.testing import SCRIPTED_ANSWER, Answer, Fail, Hang, split_text

from .reliability import live_tasks
from .support import client, config, scripted_provider

C = Category
TOKEN = "s3cret-token-value"
MESSAGES = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def running(cfg: Config, **settings: Any) -> AsyncIterator[tuple[Supervisor, Server]]:
    """A supervisor for ``cfg`` and a websocket endpoint on a free loopback port."""
    settings.setdefault("http_port", None)
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        server = await nursery.start(serve, sup, ServerSettings(ws_port=0, **settings))
        yield sup, server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(
    server: Server, token: str | None = None, **kwargs: Any
) -> AsyncIterator[WebSocketConnection]:
    """A websocket client on a TCP stream the test owns and closes at the end.

    (trio-websocket's own client leaves its TCP socket open when the server closes first: it
    waits for the server's TCP close, then never closes its own.) Raises ``HandshakeError``
    like ``open_websocket_url`` when the connection is refused or rejected.
    """
    assert server.ws_port is not None
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    except OSError as exc:
        raise HandshakeError from exc
    try:
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, f"127.0.0.1:{server.ws_port}", "/", extra_headers=headers, **kwargs
            )
            try:
                yield ws
            finally:
                await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        rejected = group.subgroup(HandshakeError)
        if rejected is None:
            raise
        leaf: BaseException = rejected
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None


async def handshake(server: Server, *headers: tuple[str, str]) -> tuple[int, dict[str, str], bytes]:
    """A websocket opening handshake by hand: the server's status, headers and body.

    (trio-websocket's client leaves its socket open when the handshake is rejected.)
    """
    assert server.ws_port is not None
    async with await trio.open_tcp_stream("127.0.0.1", server.ws_port) as stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target="/",
            headers=[
                ("host", f"127.0.0.1:{server.ws_port}"),
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13"),
                *headers,
            ],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, response_headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, response_headers, body


async def send(ws: WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(frame))


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())


def request_frame(request_id: Any, model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"type": "request", "id": request_id, "model": model, "messages": MESSAGES, **extra}


async def until_terminal(ws: WebSocketConnection, *ids: Any) -> dict[Any, list[dict[str, Any]]]:
    """Every frame received, by id, until each of ``ids`` had its terminal frame."""
    frames: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    pending = set(ids)
    while pending:
        frame = await receive(ws)
        frames[frame.get("id")].append(frame)
        if frame["type"] in ("done", "error") and frame["id"] is not None:
            assert frame["id"] in pending, f"a second terminal frame: {frame}"
            pending.discard(frame["id"])
    return frames


async def assert_usable(ws: WebSocketConnection) -> None:
    """The connection still answers: a health frame comes back."""
    await send(ws, {"type": "health"})
    frame = await receive(ws)
    assert frame["type"] == "health"


async def test_requests_are_multiplexed_on_one_connection(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=3, delay=1.0, first_delay=1.0)))
    async with running(cfg) as (_, server), connect(server) as ws:
        start = trio.current_time()
        for request_id in ("x", "y", 7):
            await send(ws, request_frame(request_id))
        frames = await until_terminal(ws, "x", "y", 7)
        # Three answers of 3 s each, side by side: 3 s in all, not 9.
        assert trio.current_time() - start == 3.0
        await assert_usable(ws)  # and nothing else arrived for them
    for request_id in ("x", "y", 7):
        *deltas, done = frames[request_id]
        assert [d["type"] for d in deltas] == ["delta"] * 3
        assert [d["seq"] for d in deltas] == [0, 1, 2]
        assert "".join(d["text"] for d in deltas) == SCRIPTED_ANSWER
        assert done["type"] == "done"
        assert "text" not in done  # the deltas carried it: not held and sent twice
        assert done["provider"] == "a"
        assert done["model"] == "m"
        assert done["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
        assert [a["outcome"] for a in done["attempts"]] == ["ok"]
    assert len(client(cfg, "a").calls) == 3


async def test_deltas_of_concurrent_requests_interleave(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=2, delay=2.0, first_delay=1.0)))
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("first"))
        await trio.sleep(0.5)
        await send(ws, request_frame("second"))
        order = []
        pending = {"first", "second"}
        while pending:
            frame = await receive(ws)
            order.append((frame["id"], frame["type"]))
            if frame["type"] == "done":
                pending.discard(frame["id"])
    assert order == [
        ("first", "delta"),
        ("second", "delta"),
        ("first", "delta"),
        ("first", "done"),
        ("second", "delta"),
        ("second", "done"),
    ]


async def test_failover_is_reported_in_attempts_and_decisions(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.OVERLOADED, status=529)),
        scripted_provider("b", Answer(chunks=2, model="upstream-b")),
    )
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("r"))
        *deltas, done = (await until_terminal(ws, "r"))["r"]
    assert done["type"] == "done"
    assert done["provider"] == "b"
    assert done["model"] == "upstream-b"
    assert [(a["actor"], a["outcome"]) for a in done["attempts"]] == [("a", "failed"), ("b", "ok")]
    assert done["attempts"][0]["failure"]["category"] == "overloaded"
    assert done["decisions"][0]["action"] == "failover"
    assert done["decisions"][0]["rule"] == {
        "source": "default",
        "policy": "failover",
        "rule": "actions.overloaded",
        "value": "next",
    }
    assert "".join(d["text"] for d in deltas) == SCRIPTED_ANSWER


async def test_a_failed_request_ends_with_an_error_frame(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.CONTENT_POLICY, status=400, code="content_filter")),
        scripted_provider("b"),
    )
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("r"))
        (error,) = (await until_terminal(ws, "r"))["r"]
        await assert_usable(ws)
    assert error["type"] == "error"
    assert error["category"] == "content_policy"
    assert error["code"] == "content_filter"
    assert error["provider"] == "a"
    assert [a["actor"] for a in error["attempts"]] == ["a"]
    assert error["decisions"][-1]["action"] == "stop"


async def test_a_stream_broken_after_deltas_ends_with_stream_error(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=500, after_chunks=2)),
        scripted_provider("b"),
    )
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("r"))
        frames = (await until_terminal(ws, "r"))["r"]
    assert [f["type"] for f in frames] == ["delta", "delta", "error"]
    assert frames[-1]["category"] == "stream_error"


async def test_cancel_by_id_cancels_the_upstream_call_without_penalty(autojump_clock):
    cfg = config(scripted_provider("a", Hang(after_chunks=1), Answer()))
    async with running(cfg) as (sup, server), connect(server) as ws:
        await send(ws, request_frame("slow"))
        assert (await receive(ws))["type"] == "delta"  # the provider call is running
        await send(ws, {"type": "cancel", "id": "slow"})
        (error,) = (await until_terminal(ws, "slow"))["slow"]
        await trio.testing.wait_all_tasks_blocked()
        assert client(cfg, "a").outcomes == ["cancelled"]
        health = sup.health()["a"]
        assert health.state.value == "ok"
        assert health.consecutive_failures == 0
        assert health.in_flight == 0
        # Cancelling again, or cancelling an unknown id, is not an error and sends nothing.
        await send(ws, {"type": "cancel", "id": "slow"})
        await send(ws, {"type": "cancel", "id": "never-sent"})
        await send(ws, request_frame("next"))
        frames = await until_terminal(ws, "next")
        assert frames.keys() == {"next"}
        assert frames["next"][-1]["type"] == "done"
    assert error["category"] == "cancelled"
    assert error["code"] == "cancelled"
    assert trio.current_time() == 0  # cancelled at once, no budget ran out


async def test_closing_the_connection_cancels_its_requests(autojump_clock):
    cfg = config(scripted_provider("a", Hang(after_chunks=1)))
    async with running(cfg) as (sup, server):
        async with connect(server) as ws:
            await send(ws, request_frame(1))
            await send(ws, request_frame(2))
            assert (await receive(ws))["type"] == "delta"
            assert (await receive(ws))["type"] == "delta"
        await trio.testing.wait_all_tasks_blocked()
        assert client(cfg, "a").outcomes == ["cancelled", "cancelled"]
        assert client(cfg, "a").in_flight == 0
        assert sup.health()["a"].consecutive_failures == 0
        assert sup.statistics().in_flight == 0
        assert trio.current_time() == 0


async def test_a_slow_reader_slows_only_its_own_connection(autojump_clock):
    # Deltas big enough to fill the socket buffers of a client that stops reading.
    big = Answer(text="x" * (8 << 20), chunks=128)
    cfg = Config(
        providers=[
            scripted_provider("bulk", big),
            scripted_provider("small", Answer(chunks=2)),
        ],
        routes=[Route(model="bulk", chain=["bulk"]), Route(model="small", chain=["small"])],
    )
    async with running(cfg, send_queue_frames=2) as (_, server):
        # The slow client reads one frame, then nothing (its own queue holds one more).
        async with connect(server, message_queue_size=1) as slow, connect(server) as fast:
            await send(slow, request_frame("big", model="bulk"))
            assert (await receive(slow))["seq"] == 0
            await trio.testing.wait_all_tasks_blocked()
            stuck_at = client(cfg, "bulk").in_flight
            for i in range(5):
                await send(fast, request_frame(i, model="small"))
                frames = (await until_terminal(fast, i))[i]
                assert frames[-1]["type"] == "done"
            # The slow connection's provider is held back by its reader, not buffered for.
            assert stuck_at == 1
            assert client(cfg, "bulk").in_flight == 1
            assert client(cfg, "bulk").calls == []


async def test_events_are_sent_when_asked_for(autojump_clock):
    cfg = config(scripted_provider("a", Fail(category=C.OVERLOADED)), scripted_provider("b"))
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("loud", events=True))
        loud = (await until_terminal(ws, "loud"))["loud"]
        await send(ws, request_frame("quiet"))
        quiet = (await until_terminal(ws, "quiet"))["quiet"]
    assert "event" not in [f["type"] for f in quiet]
    events = [(f["kind"], f["actor"]) for f in loud if f["type"] == "event"]
    assert events == [
        ("attempt_started", "a"),
        ("attempt_failed", "a"),
        ("failover", "a"),
        ("attempt_started", "b"),
        ("completed", "b"),
    ]
    assert loud[-1]["type"] == "done"
    assert all(f["id"] == "loud" for f in loud)


async def test_health_frame(autojump_clock):
    cfg = config(scripted_provider("a"), scripted_provider("b"))
    async with running(cfg) as (sup, server), connect(server) as ws:
        sup.bench("b", 30)
        await send(ws, {"type": "health", "id": "h1"})
        frame = await receive(ws)
    assert frame["type"] == "health"
    assert frame["id"] == "h1"
    assert frame["actors"]["a"]["state"] == "ok"
    assert frame["actors"]["b"]["state"] == "benched"
    assert frame["actors"]["b"]["benched_until"] == 30


# --- protocol errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "request_id"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_frame", None),
        ('{"id": 1}', "missing_type", None),
        ('{"type": "subscribe", "id": 1}', "unknown_type", None),
        ('{"type": "request", "model": "m", "messages": []}', "missing_id", None),
        ('{"type": "request", "id": true, "model": "m"}', "invalid_id", None),
        ('{"type": "request", "id": [1], "model": "m"}', "invalid_id", None),
        ('{"type": "cancel"}', "missing_id", None),
        ('{"type": "request", "id": "r", "model": "m", "messages": []}', "invalid_request", "r"),
        (
            '{"type": "request", "id": "r", "model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            "invalid_request",
            "r",
        ),
        (
            '{"type": "request", "id": "r", "model": "m", "messages": [{"role": "x", "content": "x"}]}',
            "invalid_request",
            "r",
        ),
        (
            '{"type": "request", "id": "r", "model": "m", "messages": [{"role": "user", "content": "x"}], "params": {"temperature": 9}}',
            "invalid_request",
            "r",
        ),
        (
            '{"type": "request", "id": "r", "model": "m", "messages": [{"role": "user", "content": "x"}], "param": {}}',
            "unknown_field",
            "r",
        ),
        (
            '{"type": "request", "id": "r", "model": "m", "messages": [{"role": "user", "content": "x"}], "events": "yes"}',
            "invalid_request",
            "r",
        ),
    ],
)
async def test_malformed_frames_get_an_error_frame_and_the_connection_stays(
    autojump_clock, raw, code, request_id
):
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, server), connect(server) as ws:
        await ws.send_message(raw)
        frame = await receive(ws)
        await assert_usable(ws)
        await send(ws, request_frame("after"))
        assert (await until_terminal(ws, "after"))["after"][-1]["type"] == "done"
    assert frame["type"] == "error"
    assert frame["category"] == "bad_request"
    assert frame["code"] == code
    assert frame["id"] == request_id
    assert frame["message"]
    assert client(cfg, "a").calls[0].messages == tuple(MESSAGES)  # only the valid request ran


async def test_error_frames_name_the_problem(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, server), connect(server) as ws:
        bad_role = request_frame("r", messages=[{"role": "robot", "content": "x"}])
        await send(ws, bad_role)
        role = await receive(ws)
        await send(ws, request_frame("q", model="nope"))
        route = await receive(ws)
        await ws.send_message(b'{"type": "health"}')
        binary = await receive(ws)
    assert role["field"] == "messages[0].role"
    assert "messages[0].role" in role["message"]
    assert route["field"] == "model"
    assert "no route named 'nope'" in route["message"]
    assert binary["code"] == "not_text"


async def test_a_duplicate_in_flight_id_is_refused_and_the_first_request_goes_on(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=2, delay=1.0)))
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("r"))
        await send(ws, request_frame("r"))
        frames = await until_terminal(ws, "r")
        # Once the first one has ended, the id may be used again.
        await send(ws, request_frame("r"))
        again = await until_terminal(ws, "r")
    (duplicate,) = frames[None]
    assert duplicate["code"] == "duplicate_id"
    assert duplicate["category"] == "bad_request"
    assert "'r'" in duplicate["message"]
    assert [f["type"] for f in frames["r"]] == ["delta", "delta", "done"]
    assert again["r"][-1]["type"] == "done"
    assert len(client(cfg, "a").calls) == 2


# --- limits and auth ------------------------------------------------------------------------


async def test_requests_in_flight_per_connection_are_limited(autojump_clock):
    cfg = config(scripted_provider("a", Hang(after_chunks=1)))
    async with running(cfg, max_in_flight_per_connection=2) as (_, server):
        async with connect(server) as ws, connect(server) as other:
            await send(ws, request_frame(1))
            await send(ws, request_frame(2))
            await send(ws, request_frame(3))
            frames = await until_terminal(ws, 3)
            # Another connection has its own allowance.
            await send(other, request_frame(1))
            assert (await receive(other))["type"] == "delta"
            await send(ws, {"type": "cancel", "id": 1})
            await until_terminal(ws, 1)
            await send(ws, request_frame(4))
            first_piece = split_text(SCRIPTED_ANSWER, 10)[0]
            assert (await receive(ws)) == {"type": "delta", "id": 4, "seq": 0, "text": first_piece}
    (refused,) = [f for f in frames[3] if f["type"] == "error"]
    assert refused["category"] == "local_capacity"
    assert refused["code"] == "too_many_requests"


async def test_connections_are_limited(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, max_connections=1) as (_, server):
        async with connect(server) as ws:
            status, _, body = await handshake(server)
            await assert_usable(ws)
        assert status == 503
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        await trio.testing.wait_all_tasks_blocked()
        async with connect(server) as ws:
            await assert_usable(ws)


async def test_a_frame_over_the_size_limit_closes_the_connection(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, max_frame_bytes=1000) as (_, server), connect(server) as ws:
        await send(ws, request_frame("ok", metadata={"pad": "x" * 800}))
        assert (await until_terminal(ws, "ok"))["ok"][-1]["type"] == "done"
        await send(ws, request_frame("big", metadata={"pad": "x" * 1000}))
        with pytest.raises(ConnectionClosed) as caught:
            await receive(ws)
    assert caught.value.reason.code == 1009


@pytest.mark.parametrize(
    "header",
    [None, f"Bearer wrong-{TOKEN}", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN[:-1]}"],
)
async def test_a_missing_or_wrong_token_is_refused_at_the_handshake(autojump_clock, caplog, header):
    caplog.set_level(logging.DEBUG)
    cfg = config(scripted_provider("a"))
    headers = [] if header is None else [("authorization", header)]
    async with running(cfg, tokens=[TOKEN, "another-token"]) as (_, server):
        status, response_headers, body = await handshake(server, *headers)
        async with connect(server, TOKEN) as ws:
            await assert_usable(ws)
        async with connect(server, "another-token") as ws:
            await assert_usable(ws)
    assert status == 401
    assert response_headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert TOKEN[:-1].encode() not in body
    assert TOKEN[:-1] not in caplog.text
    assert "another-token" not in caplog.text
    assert client(cfg, "a").calls == []


def test_settings_validate_and_never_show_tokens():
    settings = ServerSettings(tokens=[TOKEN])
    assert TOKEN not in repr(settings)
    assert settings.tokens == frozenset({TOKEN})
    with pytest.raises(ConfigError, match="ws_port"):
        ServerSettings(ws_port=70000)
    with pytest.raises(ConfigError, match="max_in_flight_per_connection"):
        ServerSettings(max_in_flight_per_connection=0)
    with pytest.raises(ConfigError, match="tokens") as caught:
        ServerSettings(tokens=TOKEN)
    assert TOKEN not in str(caught.value)
    with pytest.raises(ConfigError, match="tokens") as caught:
        ServerSettings(tokens=[f"{TOKEN} "])
    assert TOKEN not in str(caught.value)


# --- graceful shutdown ----------------------------------------------------------------------


async def test_graceful_shutdown_lets_requests_finish_then_cancels_the_rest(autojump_clock):
    cfg = config(
        scripted_provider("a", Answer(chunks=2, delay=3.0, first_delay=1.0), Hang(after_chunks=1))
    )
    settings = ServerSettings(ws_port=0, http_port=None, shutdown_grace=10)
    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            async with connect(server) as ws:
                await send(ws, request_frame("quick"))
                await send(ws, request_frame("stuck"))
                seen = [await receive(ws), await receive(ws)]
                assert sorted(f["id"] for f in seen) == ["quick", "stuck"]
                begun = trio.current_time()
                server.shutdown()
                await trio.testing.wait_all_tasks_blocked()
                # New connections are refused at once: the listener is closed.
                with pytest.raises(HandshakeError):
                    async with connect(server):
                        pass  # pragma: no cover
                # A new request on an open connection is refused; those in flight go on.
                await send(ws, request_frame("late"))
                frames = await until_terminal(ws, "quick", "stuck", "late")
                cancelled_after = trio.current_time() - begun
                # Then the server closes the connection: going away.
                with pytest.raises(ConnectionClosed) as caught:
                    await receive(ws)
        # ``serve`` has returned.
        stopped_after = trio.current_time() - begun
        assert sup.statistics().in_flight == 0
    quick, stuck, late = frames["quick"][-1], frames["stuck"][-1], frames["late"][-1]
    assert quick["type"] == "done"
    assert (late["category"], late["code"]) == ("local_capacity", "server_shutdown")
    assert (stuck["category"], stuck["code"]) == ("cancelled", "server_shutdown")
    assert cancelled_after == 10  # exactly the grace
    assert stopped_after == 10
    assert caught.value.reason.code == 1001
    assert client(cfg, "a").outcomes == ["ok", "cancelled"]


async def test_graceful_shutdown_with_nothing_in_flight_is_immediate(autojump_clock):
    cfg = config(scripted_provider("a"))
    settings = ServerSettings(ws_port=0, http_port=None, shutdown_grace=10)
    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            async with connect(server) as ws:
                await send(ws, request_frame("r"))
                await until_terminal(ws, "r")
                server.shutdown()
                with pytest.raises(ConnectionClosed) as caught:
                    await receive(ws)
        assert trio.current_time() == 0
    assert caught.value.reason.code == 1001


async def test_graceful_shutdown_closes_sockets_that_sent_nothing_at_once(autojump_clock):
    cfg = config(scripted_provider("a"))
    settings = ServerSettings(ws_port=0, http_port=None, shutdown_grace=10)
    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            async with await idle_socket(server) as idle:
                await trio.testing.wait_all_tasks_blocked()
                server.shutdown()
                assert await idle.receive_some() == b""
        assert trio.current_time() == 0


async def test_frames_are_exactly_the_json_of_their_objects(autojump_clock):
    # Delta frames are formatted around the encoded text rather than built as a dict and
    # encoded: byte for byte what ``json.dumps`` writes (compact, unescaped non-ASCII).
    text = 'naïve "quoted" \\ back\nslash \u2028 ☃ \x00 \t end'
    cfg = config(scripted_provider("a", Answer(text=text, chunks=7)))
    async with running(cfg) as (_, server), connect(server) as ws:
        for request_id in ('r"1é', 7):
            await send(ws, request_frame(request_id))
            raw: list[str] = []
            while not raw or json.loads(raw[-1])["type"] == "delta":
                message = await ws.get_message()
                assert isinstance(message, str)
                raw.append(message)
            frames = [json.loads(message) for message in raw]
            assert raw == [dumps(frame) for frame in frames]
            *deltas, done = frames
            assert done["type"] == "done"
            assert [list(d) for d in deltas] == [["type", "id", "seq", "text"]] * len(deltas)
            assert [d["id"] for d in deltas] == [request_id] * len(deltas)
            assert [d["seq"] for d in deltas] == list(range(len(deltas)))
            assert "".join(d["text"] for d in deltas) == text


async def test_the_writer_can_batch_frames(autojump_clock):
    # The writer encodes a batch of frames with trio-websocket's own wsproto state and writes
    # them at once. Without these internals it falls back to one ``send_message`` per frame:
    # still correct, but slower, so an upgrade of trio-websocket that removes them fails here.
    cfg = config(scripted_provider("a", Answer(chunks=40)))
    async with running(cfg, send_queue_frames=4) as (_, server), connect(server) as ws:
        for i in range(8):
            await send(ws, request_frame(i))
        frames = await until_terminal(ws, *range(8))
    for i in range(8):
        *deltas, done = frames[i]
        assert done["type"] == "done"
        assert [d["seq"] for d in deltas] == list(range(40))
        assert "".join(d["text"] for d in deltas) == SCRIPTED_ANSWER


# --- the text of the answer in the done frame -----------------------------------------------------


async def test_the_done_frame_carries_the_text_only_when_asked_or_not_sent_as_deltas(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=4), Answer(chunks=4), Answer(text="")))
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("plain"))
        await send(ws, request_frame("asked", text=True))
        frames = await until_terminal(ws, "plain", "asked")
        await send(ws, request_frame("empty"))
        (empty,) = (await until_terminal(ws, "empty"))["empty"]
        await send(ws, request_frame("bad", text="yes"))
        (bad,) = (await until_terminal(ws, "bad"))["bad"]
    for request_id in ("plain", "asked"):
        *deltas, done = frames[request_id]
        assert "".join(d["text"] for d in deltas) == SCRIPTED_ANSWER
    assert "text" not in frames["plain"][-1]
    assert frames["asked"][-1]["text"] == SCRIPTED_ANSWER
    assert empty["type"] == "done" and empty["text"] == ""  # no delta carried it
    assert (bad["type"], bad["field"]) == ("error", "text")


# --- connection limits ----------------------------------------------------------------------------


async def handshake_status(server: Server) -> int:
    """The status line's code of a websocket opening handshake (101 when accepted)."""
    assert server.ws_port is not None
    async with await trio.open_tcp_stream("127.0.0.1", server.ws_port) as stream:
        await stream.send_all(
            b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n" not in head:
            chunk = await stream.receive_some()
            assert chunk, "closed before the status line"
            head += chunk
        return int(head.split(b" ", 2)[1])


async def idle_socket(server: Server) -> trio.SocketStream:
    assert server.ws_port is not None
    return await trio.open_tcp_stream("127.0.0.1", server.ws_port)


async def test_an_unfinished_handshake_is_closed_at_the_handshake_timeout(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, handshake_timeout=3.0) as (_, server):
        start = trio.current_time()
        async with await idle_socket(server) as idle:
            await idle.send_all(b"GET / HTTP/1.1\r\n")  # and never the rest
            assert await idle.receive_some() == b""  # closed by the server
        assert trio.current_time() - start == 3.0
        async with connect(server) as ws:  # the server goes on
            await assert_usable(ws)


async def test_unfinished_handshakes_count_against_max_connections(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, max_connections=2) as (_, server):
        first, second = await idle_socket(server), await idle_socket(server)
        async with first, second:
            await trio.testing.wait_all_tasks_blocked()
            status, _, body = await handshake(server)
            assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
        await trio.testing.wait_all_tasks_blocked()
        assert await handshake_status(server) == 101


async def test_sockets_over_the_cap_wait_in_the_accept_queue(autojump_clock):
    # Two idle sockets hold the listener's two places: a third connection is accepted only when
    # the handshake timeout has closed them, and is then served.
    cfg = config(scripted_provider("a"))
    async with running(cfg, max_sockets=2, handshake_timeout=5.0) as (_, server):
        first, second = await idle_socket(server), await idle_socket(server)
        async with first, second:
            start = trio.current_time()
            assert await handshake_status(server) == 101
            assert trio.current_time() - start == 5.0


async def test_an_idle_socket_costs_one_task_until_it_sends_a_byte(autojump_clock):
    # A flood of sockets that never send a byte (issue #11) must cost the event loop as little
    # as possible: no websocket connection (its reader task, channels, events) is built for
    # them, and their timeout or close is one ``close``. The handshake still works when the
    # first bytes come alone, and the timeout counts from the accept.
    cfg = config(scripted_provider("a"))
    async with running(cfg, handshake_timeout=5.0) as (_, server):
        await trio.testing.wait_all_tasks_blocked()
        before = len(live_tasks())
        idle = [await idle_socket(server) for _ in range(50)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(live_tasks()) - before == 50  # one per socket: its connection's task
        start = trio.current_time()
        async with idle[0] as slow:
            await trio.sleep(4.0)
            await slow.send_all(b"G")  # a byte, then the rest within the handshake timeout
            await trio.sleep(0.5)
            await slow.send_all(
                b"ET / HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"sec-websocket-version: 13\r\n\r\n"
            )
            assert (await slow.receive_some()).startswith(b"HTTP/1.1 101 ")
            for sock in idle[1:]:
                assert await sock.receive_some() == b""  # closed by the handshake timeout
                await sock.aclose()
            assert trio.current_time() - start == 5.0
        await trio.testing.wait_all_tasks_blocked()
        assert len(live_tasks()) == before
        async with connect(server) as ws:  # the server goes on
            await assert_usable(ws)


async def test_a_handshake_longer_than_one_read_arrives_whole(autojump_clock):
    # The first bytes (here 9 KiB at once) are read before trio-websocket reads in 4 KiB steps.
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, server):
        async with await idle_socket(server) as stream:
            await stream.send_all(
                b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"sec-websocket-version: 13\r\nx-padding: " + b"p" * 9000 + b"\r\n\r\n"
            )
            assert (await stream.receive_some()).startswith(b"HTTP/1.1 101 ")


async def test_max_sockets_and_handshake_timeout_are_checked():
    with pytest.raises(ConfigError):
        ServerSettings(max_sockets=0)
    with pytest.raises(ConfigError):
        ServerSettings(handshake_timeout=-1)
    assert ServerSettings().handshake_timeout == 10.0
    assert ServerSettings().max_sockets is None


async def test_tool_calls_ride_on_delta_and_done_frames(autojump_clock):
    from relayrace import ToolCall, Usage

    calls = (
        ToolCall(0, "call_a", "get_weather", '{"city": "Oslo"}'),
        ToolCall(1, "call_b", "get_time", "{}"),
    )
    usage = Usage(prompt_tokens=12, completion_tokens=5, cached_tokens=8, reasoning_tokens=2)
    answer = Answer(text="", tool_calls=calls, finish_reason="tool_calls", usage=usage)
    cfg = config(scripted_provider("a", answer))
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("get_weather", "get_time")
    ]
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("t", params={"tools": tools}))
        *deltas, done = (await until_terminal(ws, "t"))["t"]
    fragments = [f for d in deltas for f in d.get("tool_calls", [])]
    assert [d["type"] for d in deltas] == ["delta"] * len(deltas) and fragments
    opened = [(f["index"], f["id"], f["function"]["name"]) for f in fragments if "id" in f]
    assert opened == [(0, "call_a", "get_weather"), (1, "call_b", "get_time")]
    arguments = ["".join(f["function"]["arguments"] for f in fragments if f["index"] == i) for i in (0, 1)]
    assert arguments == ['{"city": "Oslo"}', "{}"]
    assert done["type"] == "done"
    assert done["tool_calls"] == [c.to_dict() for c in calls]
    assert done["finish_reason"] == "tool_calls"
    assert done["refusal"] is None
    assert done["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    assert done["attempts"][0]["usage"] == done["usage"]


@pytest.mark.parametrize(
    ("params", "messages", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, MESSAGES, "params.tools[0].function.parameters"),
        ({"tool_choice": "sometimes"}, MESSAGES, "params.tool_choice"),
        ({}, [*MESSAGES, {"role": "tool", "tool_call_id": "call_x", "content": "{}"}], "messages[1].tool_call_id"),
    ],
    ids=["schema", "choice", "tool_call_id"],
)
async def test_bad_agent_input_is_refused_naming_the_field(autojump_clock, params, messages, field):
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, server), connect(server) as ws:
        await send(ws, request_frame("b", params=params, messages=messages))
        frame = await receive(ws)
    assert (frame["type"], frame["id"], frame["code"]) == ("error", "b", "invalid_request")
    assert frame["field"] == field
    assert client(cfg, "a").calls == []
