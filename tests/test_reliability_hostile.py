"""Hostile input, and secrets.

- Hypothesis-generated websocket frames and HTTP bodies (wrong types, huge strings, deep
  nesting, invalid UTF-8, unknown fields, negative numbers, missing messages): each gets one
  clear error, the connection (websocket) stays usable, a good request on another connection
  still works, and nothing crashes.
- Wrong and missing tokens are refused on both endpoints.
- No API key or token appears in any log line, event, error, trace, frame or response, whatever
  the providers do, including a provider that echoes the key back.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from relayrace import (
    Budgets,
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
from relayrace.actors import AnthropicClient, GeminiClient, OpenAIClient
from relayrace.server import Server, ServerSettings, serve
from relayrace.testing import SCRIPTED_ANSWER, Answer, serve_mock_provider

from .reliability import FAULTS, KEY, MESSAGES, http_client
from .support import config, scripted_provider
from .test_server_websocket import connect

TOKEN = "rr-server-token-7f3a9c2e5b1d"
HYPOTHESIS = settings(
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@asynccontextmanager
async def scripted_server(**settings_: Any) -> AsyncIterator[tuple[Supervisor, Server]]:
    cfg = config(scripted_provider("a"))
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        server = await nursery.start(
            serve, sup, ServerSettings(ws_port=0, http_port=0, **settings_)
        )
        yield sup, server
        nursery.cancel_scope.cancel()


async def good_websocket_request(server: Server) -> None:
    """A valid request on a new connection is served."""
    assert server.ws_url is not None
    async with connect(server) as ws:
        frame = {"type": "request", "id": "good", "model": "m", "messages": MESSAGES, "text": True}
        await ws.send_message(json.dumps(frame))
        while (reply := json.loads(await ws.get_message()))["type"] == "delta":
            pass
        assert reply["type"] == "done" and reply["text"] == SCRIPTED_ANSWER


def strict_json(text: str) -> Any:
    """Parse what the server sent, refusing what is not JSON (``NaN``, ``Infinity``)."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"the server sent {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


# --- strategies -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
not_a_string_or_int = json_values.filter(
    lambda v: isinstance(v, bool) or not isinstance(v, (str, int))
)
good_ids = st.text(min_size=1, max_size=20) | st.integers()
# Deeper than any recursion limit of the JSON decoder (the smallest such depth varies).
deep = st.integers(100_000, 200_000).map(lambda n: "[" * n + "]" * n)
huge = st.integers(300, 60_000).map(lambda n: "x" * n)
not_messages = (
    json_values.filter(lambda v: not isinstance(v, list) or not v)
    | st.lists(json_values.filter(lambda v: not isinstance(v, dict)), min_size=1, max_size=3)
    | st.builds(
        lambda role, content: [{"role": role, "content": content}],
        st.text(max_size=10).filter(
            lambda r: r not in ("system", "developer", "user", "assistant", "tool")
        ),
        st.text(max_size=10),
    )
    | st.builds(
        lambda content: [{"role": "user", "content": content}],
        json_values.filter(lambda c: not isinstance(c, (str, list))),
    )
)
bad_params = st.one_of(
    st.integers(-(2**40), 0).map(lambda n: {"max_tokens": n}),
    st.floats(max_value=-0.001).map(lambda x: {"temperature": x}),
    st.floats(min_value=2.001, allow_infinity=False).map(lambda x: {"temperature": x}),
    st.integers(-(2**40), -1).map(lambda n: {"seed": n}),
    not_a_string_or_int.filter(lambda v: not isinstance(v, dict) and v is not None),
)


def _request(request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"type": "request", "id": request_id, "model": "m", "messages": MESSAGES, **fields}


#: (what to send, the error code it must get): a text frame, or bytes for a binary frame.
hostile_frames = st.one_of(
    st.text(max_size=50)
    .filter(lambda t: not _is_json(t))
    .map(lambda t: (t, "invalid_json")),
    deep.map(lambda t: (t, "invalid_json")),
    st.binary(max_size=50).map(lambda b: (b, "not_text")),
    json_values.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: (json.dumps(v), "invalid_frame")
    ),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_values, max_size=3).map(
        lambda d: (json.dumps(d), "missing_type")
    ),
    not_a_string_or_int.filter(lambda v: v is not None).map(
        lambda v: (json.dumps({"type": v}), "missing_type")
    ),
    st.text(max_size=20)
    .filter(lambda t: t not in ("request", "cancel", "health"))
    .map(lambda t: (json.dumps({"type": t}), "unknown_type")),
    st.sampled_from(["request", "cancel"]).map(lambda t: (json.dumps({"type": t}), "missing_id")),
    st.tuples(st.sampled_from(["request", "cancel", "health"]), not_a_string_or_int).map(
        lambda p: (json.dumps({"type": p[0], "id": p[1]}), "invalid_id")
    ),
    huge.map(lambda s: (json.dumps(_request(s)), "invalid_id")),
    st.tuples(good_ids, st.text(min_size=1, max_size=10), json_values)
    .filter(lambda p: p[1] not in ("type", "id", "model", "messages", "params", "metadata", "events"))
    .map(lambda p: (json.dumps(_request(p[0], **{p[1]: p[2]})), "unknown_field")),
    st.tuples(good_ids, json_values.filter(lambda v: not isinstance(v, str) or not v.strip())).map(
        lambda p: (json.dumps(_request(p[0], model=p[1])), "invalid_request")
    ),
    st.tuples(good_ids, huge).map(lambda p: (json.dumps(_request(p[0], model=p[1])), "invalid_request")),
    st.tuples(good_ids, st.text(min_size=1, max_size=30).filter(lambda m: m.strip() and m != "m")).map(
        lambda p: (json.dumps(_request(p[0], model=p[1])), "invalid_request")
    ),
    st.tuples(good_ids, not_messages).map(
        lambda p: (json.dumps(_request(p[0], messages=p[1])), "invalid_request")
    ),
    good_ids.map(
        lambda i: (json.dumps({k: v for k, v in _request(i).items() if k != "messages"}), "invalid_request")
    ),
    st.tuples(good_ids, bad_params).map(
        lambda p: (json.dumps(_request(p[0], params=p[1])), "invalid_request")
    ),
    st.tuples(good_ids, json_values.filter(lambda v: not isinstance(v, bool))).map(
        lambda p: (json.dumps(_request(p[0], events=p[1])), "invalid_request")
    ),
)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# --- websocket frames -----------------------------------------------------------------------------


async def _websocket_frames(frames: list[tuple[str | bytes, str]]) -> None:
    async with scripted_server() as (sup, server):
        assert server.ws_url is not None
        async with connect(server) as ws:
            for k, (frame, code) in enumerate(frames):
                await ws.send_message(frame)
                reply = strict_json(await ws.get_message())
                assert reply["type"] == "error", (frame, reply)
                assert reply["code"] == code, (frame, reply)
                assert reply["category"] == "bad_request" and reply["message"]
                # The connection stays usable: a health frame after each one is answered.
                await ws.send_message(json.dumps({"type": "health", "id": k}))
                assert strict_json(await ws.get_message()) | {"actors": None} == {
                    "type": "health",
                    "id": k,
                    "actors": None,
                }
            await good_websocket_request(server)  # another connection is served meanwhile
        assert sup.statistics().in_flight == 0


@HYPOTHESIS
@given(frames=st.lists(hostile_frames, min_size=1, max_size=8))
def test_hostile_websocket_frames_each_get_a_clear_error(frames):
    trio.run(_websocket_frames, frames, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_health_frame_with_a_nan_id_gets_an_error_not_invalid_json(autojump_clock):
    # Found by the test above: the id was echoed back as it came, NaN included.
    async with scripted_server() as (_, server):
        assert server.ws_url is not None
        async with connect(server) as ws:
            await ws.send_message('{"type": "health", "id": NaN}')
            reply = strict_json(await ws.get_message())
            assert reply["type"] == "error" and reply["code"] == "invalid_id"


async def raw_websocket(server: Server) -> trio.SocketStream:
    """A websocket connection by hand, so that the test can send frames no library would."""
    assert server.ws_port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
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
        ],
    )
    await stream.send_all(conn.send(request))
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some()
    assert received.startswith(b"HTTP/1.1 101")
    return stream


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_invalid_utf8_in_a_text_frame_closes_that_connection_only(autojump_clock):
    async with scripted_server() as (sup, server):
        async with await raw_websocket(server) as stream:
            await stream.send_all(masked_frame(0x1, b'{"type": "health", "id": "\xff\xfe"}'))
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
            # A close frame (opcode 8) with code 1007: invalid frame payload data.
            # The connection is closed. (wsproto reads the bad payload as a close with code
            # 1007 from the peer, and trio-websocket then drops the TCP connection without a
            # close frame of its own; a close frame, if one is sent, must say 1007.)
            if received:
                assert received[0] == 0x88 and struct.unpack("!H", received[2:4])[0] == 1007
        await good_websocket_request(server)


async def test_a_frame_over_the_limit_closes_that_connection_only(autojump_clock):
    async with scripted_server() as (sup, server):
        assert server.ws_url is not None
        async with connect(server) as ws:
            with pytest.raises(ConnectionClosed) as info:
                # The server may close while the frame is still being sent.
                await ws.send_message(json.dumps(_request("r", model="x" * (1 << 21))))
                await ws.get_message()
            assert info.value.reason.code == 1009
        await good_websocket_request(server)


# --- HTTP bodies ----------------------------------------------------------------------------------


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **fields}


#: (the body's bytes, the status it must get)
hostile_bodies = st.one_of(
    st.binary(max_size=50).filter(lambda b: not _is_json_bytes(b)).map(lambda b: (b, 400)),
    st.binary(min_size=1, max_size=20).map(lambda b: (b'{"model": "' + b"\xff" + b + b'"}', 400)),
    deep.map(lambda t: (t.encode(), 400)),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: (json.dumps(v).encode(), 400)),
    json_values.filter(lambda v: v is not None and not (isinstance(v, str) and v.strip())).map(
        lambda v: (json.dumps(_body(model=v)).encode(), 400)
    ),
    huge.map(lambda s: (json.dumps(_body(model=s)).encode(), 400)),
    st.text(min_size=1, max_size=30)
    .filter(lambda m: m.strip() and m != "m")
    .map(lambda m: (json.dumps(_body(model=m)).encode(), 404)),
    not_messages.map(lambda m: (json.dumps(_body(messages=m)).encode(), 400)),
    st.just((json.dumps({"model": "m"}).encode(), 400)),
    json_values.filter(lambda v: not isinstance(v, bool) and v is not None).map(
        lambda v: (json.dumps(_body(stream=v)).encode(), 400)
    ),
    # n is served where the route's providers declare it (the scripted one does): only a value
    # that is not a count is refused.
    json_values.filter(
        lambda v: v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    ).map(lambda v: (json.dumps(_body(n=v)).encode(), 400)),
    bad_params.filter(lambda p: isinstance(p, dict)).map(
        lambda p: (json.dumps(_body(**p)).encode(), 400)
    ),
)


def _is_json_bytes(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


async def _http_bodies(bodies: list[tuple[bytes, int]]) -> None:
    async with scripted_server() as (sup, server):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=None) as http:
            for body, status in bodies:
                response = await http.post(
                    "/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                assert response.status_code == status, (body[:200], response.text[:500])
                error = strict_json(response.text)["error"]
                assert error["message"] and error["type"] == "invalid_request_error"
                assert error["code"] or error["param"]  # what is wrong, or which field
            good = await http.post("/v1/chat/completions", json=_body())
            assert good.status_code == 200
            assert good.json()["choices"][0]["message"]["content"] == SCRIPTED_ANSWER
        assert sup.statistics().in_flight == 0


@HYPOTHESIS
@given(bodies=st.lists(hostile_bodies, min_size=1, max_size=8))
def test_hostile_http_bodies_each_get_a_clear_error(bodies):
    trio.run(_http_bodies, bodies, clock=trio.testing.MockClock(autojump_threshold=0))


# --- tokens ---------------------------------------------------------------------------------------

WRONG = [
    [],
    [("authorization", "Bearer not-the-token")],
    [("authorization", f"Basic {TOKEN}")],
    [("authorization", f"Bearer {TOKEN}x")],
    [("authorization", f"Bearer {TOKEN[:-1]}")],
    [("authorization", "Bearer")],
]


@pytest.mark.parametrize("headers", WRONG)
async def test_wrong_and_missing_tokens_are_refused_on_both_endpoints(autojump_clock, headers):
    async with scripted_server(tokens=[TOKEN]) as (sup, server):
        assert server.ws_port is not None
        async with await trio.open_tcp_stream("127.0.0.1", server.ws_port) as stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target="/",
                headers=[
                    ("host", "relayrace"),
                    ("upgrade", "websocket"),
                    ("connection", "Upgrade"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("sec-websocket-version", "13"),
                    *headers,
                ],
            )
            await stream.send_all(conn.send(request))
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some()
            assert received.startswith(b"HTTP/1.1 401")
        async with httpx.AsyncClient(base_url=server.http_url, timeout=None) as http:
            for method, path in (
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/models"),
                ("GET", "/healthz"),
            ):
                body = _body() if method == "POST" else None
                response = await http.request(method, path, json=body, headers=dict(headers))
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert sup.statistics().requests == 0


# --- secrets --------------------------------------------------------------------------------------


def echo_transport(how: str) -> httpx.MockTransport:
    """A provider that puts the credentials it received where they may travel on: its error
    body, an error event inside a 200 stream, the text of a connection error."""

    def credential(request: httpx.Request) -> str:
        return " ".join(
            request.headers.get(name, "")
            for name in ("authorization", "x-api-key", "x-goog-api-key")
        )

    def handler(request: httpx.Request) -> httpx.Response:
        seen = credential(request)
        if how == "status":
            return httpx.Response(
                401,
                json={"error": {"message": f"Incorrect API key provided: {seen}", "code": seen}},
                headers={"x-echo": seen},
            )
        if how == "event":
            event = {"error": {"message": f"key {seen} was revoked", "type": "server_error"}}
            return httpx.Response(
                200,
                content=b"data: " + json.dumps(event).encode() + b"\n\n",
                headers={"content-type": "text/event-stream"},
            )
        raise httpx.ConnectError(f"cannot connect using {seen}", request=request)

    return httpx.MockTransport(handler)


def secrets_config(base_url: str) -> Config:
    """One route per fault of the mock, in each wire format, and three echoing providers."""
    providers: list[ProviderConfig] = []
    routes: list[Route] = []
    for i, fault in enumerate(f for f in FAULTS if not f.startswith("ok")):
        fmt = ("openai", "anthropic", "gemini")[i % 3]
        providers.append(
            ProviderConfig(
                name=f"f{i}",
                client=http_client(base_url, fmt),
                model=f"{fault},tag=f{i}",
                budgets=Budgets(first_token=2.0, idle=2.0, attempt=10.0),
            )
        )
        routes.append(Route(model=f"f{i}", chain=[f"f{i}"]))
    for how, cls in (("status", OpenAIClient), ("event", AnthropicClient), ("raise", GeminiClient)):
        base = "http://echo.invalid" + ("/v1" if cls is OpenAIClient else "")
        providers.append(
            ProviderConfig(
                name=f"echo-{how}",
                client=cls(base_url=base, api_key=KEY, transport=echo_transport(how)),
            )
        )
        routes.append(Route(model=f"echo-{how}", chain=[f"echo-{how}"]))
    return Config(
        providers=providers,
        routes=routes,
        policies=Policies(retry=RetryPolicy(max_attempts=2)),
    )


async def test_no_key_or_token_in_logs_events_errors_traces_or_responses(autojump_clock, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []  # every text that left relayrace, to scan
    async with serve_mock_provider() as mock:
        cfg = secrets_config(mock.base_url)
        routes = [r.model for r in cfg.routes]
        async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
            settings_ = ServerSettings(ws_port=0, http_port=0, tokens=[TOKEN])
            server = await nursery.start(serve, sup, settings_)
            assert server.ws_url is not None and server.http_url is not None

            async def collect_events() -> None:
                async with sup.subscribe(buffer=100_000) as events:
                    async for event in events:
                        seen.append(repr(event))
                        seen.append(json.dumps(event.to_dict()))

            nursery.start_soon(collect_events)
            async with connect(server, TOKEN) as ws:
                async with httpx.AsyncClient(
                    base_url=server.http_url, timeout=None, headers={"authorization": f"Bearer {TOKEN}"}
                ) as http:
                    for route in routes:
                        # In-process, whole and streamed.
                        for streaming in (False, True):
                            try:
                                if streaming:
                                    async with sup.stream(Request(route, MESSAGES)) as s:
                                        async for delta in s:
                                            seen.append(delta.text)
                                    reply = s.reply
                                else:
                                    reply = await sup.complete(Request(route, MESSAGES))
                                seen.append(repr(reply))
                                seen.append(json.dumps([a.to_dict() for a in reply.attempts]))
                                seen.append(json.dumps([d.to_dict() for d in reply.decisions]))
                            except RequestFailed as exc:
                                seen.extend([str(exc), repr(exc), repr(exc.failure)])
                                seen.append(json.dumps(exc.failure.to_dict()))
                                seen.append(json.dumps([a.to_dict() for a in exc.attempts]))
                                seen.append(json.dumps([d.to_dict() for d in exc.decisions]))
                        # Over the websocket, with its events.
                        frame = {
                            "type": "request",
                            "id": route,
                            "model": route,
                            "messages": MESSAGES,
                            "events": True,
                        }
                        await ws.send_message(json.dumps(frame))
                        while True:
                            text = await ws.get_message()
                            seen.append(text)
                            if json.loads(text)["type"] in ("done", "error"):
                                break
                        # Over HTTP, whole and streamed.
                        for streaming in (False, True):
                            async with http.stream(
                                "POST",
                                "/v1/chat/completions",
                                json={"model": route, "messages": MESSAGES, "stream": streaming},
                            ) as response:
                                seen.append((await response.aread()).decode())
                                seen.append(repr(response.headers.multi_items()))
                    health = await http.get("/healthz")
                    seen.append(health.text)
                    # Wrong tokens, presented and refused.
                    for wrong in (f"{TOKEN}x", KEY):
                        refused = await http.get("/healthz", headers={"authorization": f"Bearer {wrong}"})
                        assert refused.status_code == 401
                        seen.append(refused.text)
            seen.append(repr(sup.health()))
            seen.append(repr(cfg))
            seen.append(repr(settings_))
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    records = [
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    ]
    assert any("echo" in text and "REDACTED" in text for text in seen)  # they did echo
    assert len(seen) > 500 and len(records) > 10
    for secret in (KEY, TOKEN, KEY[3:], TOKEN[:-1]):
        for text in seen + records:
            assert secret not in text, text[:1000]


# --- strings no encoder can write, and faults inside one request ----------------------------------

hostile_text = st.one_of(
    st.sampled_from(["\ud800", "\udfff", "a\ud800b", "\x00", "x" * 70_000, "é\udc80"]),
    st.text(st.characters(categories=("Cs", "Cc", "Lo")), min_size=1, max_size=4),
)


def _place(where: str, text: str) -> dict[str, Any]:
    """A request with ``text`` in the field ``where`` (a key, when ``where`` says so)."""
    frame: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
    }
    if where == "model":
        frame["model"] = text
    elif where == "content":
        frame["messages"][0]["content"] = text
    elif where == "role":
        frame["messages"][0]["role"] = text
    elif where == "param key":
        frame["params"] = {text: 1}
    elif where == "param value":
        frame["params"] = {"user": text}
    elif where == "metadata":
        frame["metadata"] = {text: text}
    elif where == "unknown field":
        frame[text] = 1
    return frame


WHERE = ["id", "type", "health id", "model", "content", "role", "param key", "param value",
         "metadata", "unknown field"]  # fmt: skip


async def _hostile_strings(cases: list[tuple[str, str]]) -> None:
    async with scripted_server() as (sup, server):
        async with connect(server) as ws, connect(server) as other:
            for k, (where, text) in enumerate(cases):
                if where == "health id":
                    frame: dict[str, Any] = {"type": "health", "id": text}
                elif where == "type":
                    frame = {"type": text, "id": k}
                else:
                    frame = {"type": "request", "id": text if where == "id" else k}
                    frame |= _place(where, text)
                # ``json.dumps`` escapes a lone surrogate (``"\ud800"``): valid JSON, valid UTF-8.
                await ws.send_message(json.dumps(frame))
                while (reply := strict_json(await ws.get_message()))["type"] == "delta":
                    pass
                assert reply["type"] in ("error", "done", "health"), reply
                if reply["type"] == "error":
                    assert reply["category"] == "bad_request", reply
                await ws.send_message(json.dumps({"type": "health", "id": "probe"}))
                assert strict_json(await ws.get_message())["id"] == "probe"
            await other.send_message(json.dumps({"type": "health", "id": "other"}))
            assert strict_json(await other.get_message())["id"] == "other"
        await good_websocket_request(server)
        assert server.http_url is not None
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            for where, text in cases:
                if where in ("id", "type", "health id"):
                    continue
                body = _place(where, text)
                content = json.dumps(body)  # a lone surrogate, escaped
                response = await http.post(
                    "/v1/chat/completions",
                    content=content,
                    headers={"content-type": "application/json"},
                )
                assert response.status_code in (200, 400, 404), (where, response.text)
                strict_json(response.text)
            good = await http.post("/v1/chat/completions", json=_body())
            assert good.status_code == 200
        # No caller's string ever reached a provider as a fault of its own.
        assert all(h.state.value == "ok" for h in sup.health().values())


@HYPOTHESIS
@given(cases=st.lists(st.tuples(st.sampled_from(WHERE), hostile_text), min_size=1, max_size=6))
def test_hostile_strings_in_any_field_end_no_connection_and_bench_no_provider(cases):
    trio.run(_hostile_strings, cases, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_lone_surrogate_id_gets_an_error_with_id_null(autojump_clock):
    async with scripted_server() as (_, server), connect(server) as ws:
        for frame in ('{"type": "health", "id": "\\ud800"}', '{"type": "request", "id": "\\ud800"}'):
            await ws.send_message(frame)
            reply = strict_json(await ws.get_message())
            assert (reply["type"], reply["id"], reply["field"]) == ("error", None, "id")
        await ws.send_message('{"type": "request", "id": "r", "model": "m", "messages": '
                              '[{"role": "user", "content": "\\udfff"}]}')
        reply = strict_json(await ws.get_message())
        assert (reply["id"], reply["code"], reply["field"]) == ("r", "invalid_text", "messages[0].content")


def _raising_encoder(value: Any) -> str:
    """``dumps``, except for the frames and bodies of the request with the id/model ``boom``."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, dict) and (value.get("id") == "boom" or value.get("model") == "boom"):
        raise RuntimeError("the encoder broke")
    return text


async def test_a_raising_encoder_ends_only_its_own_request(autojump_clock, caplog):
    cfg = config(scripted_provider("a"))
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        settings_ = ServerSettings(ws_port=0, http_port=0)
        server = await nursery.start(partial(serve, sup, settings_, encode_json=_raising_encoder))
        async with connect(server) as ws, connect(server) as other:
            await ws.send_message(json.dumps(_request("boom")))
            while (reply := strict_json(await ws.get_message()))["type"] == "delta":
                pass
            assert (reply["type"], reply["id"], reply["code"]) == ("error", "boom", "internal_error")
            for conn in (ws, other):  # both connections go on
                await conn.send_message(json.dumps(_request("fine")))
                while (reply := strict_json(await conn.get_message()))["type"] == "delta":
                    pass
                assert (reply["type"], reply["id"]) == ("done", "fine")
        assert server.http_url is not None
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            # The model ``boom`` is the provider's model in the replies: their encoding raises.
            whole = await http.post("/v1/chat/completions", json=_body(model="m") | {"user": "x"})
            assert whole.status_code == 200
            cfg_boom = config(scripted_provider("a", model="boom"))
            async with open_supervisor(cfg_boom) as sup2:
                server2 = await nursery.start(
                    partial(serve, sup2, ServerSettings(ws_port=None, http_port=0),
                            encode_json=_raising_encoder)
                )
                assert server2.http_url is not None
                async with httpx.AsyncClient(base_url=server2.http_url) as http2:
                    failed = await http2.post("/v1/chat/completions", json=_body())
                    assert failed.status_code == 500
                    assert failed.json()["error"]["code"] == "internal_error"
                    async with http2.stream(
                        "POST", "/v1/chat/completions", json=_body(stream=True)
                    ) as response:
                        assert response.status_code == 200
                        text = (await response.aread()).decode()
                    assert "internal_error" in text and "[DONE]" not in text
                    assert (await http2.get("/healthz")).status_code == 200
                server2.shutdown()
        nursery.cancel_scope.cancel()
    assert "the encoder broke" in caplog.text  # logged with its traceback


async def test_a_provider_text_no_encoder_can_write_ends_only_that_request(autojump_clock):
    cfg = config(scripted_provider("a", Answer(text="ab\ud800cd", chunks=2), Answer()))
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        server = await nursery.start(serve, sup, ServerSettings(ws_port=0, http_port=None))
        async with connect(server) as ws:
            await ws.send_message(json.dumps(_request("bad")))
            while (reply := strict_json(await ws.get_message()))["type"] == "delta":
                pass
            assert (reply["type"], reply["code"]) == ("error", "internal_error")
            await ws.send_message(json.dumps(_request("next")))
            while (reply := strict_json(await ws.get_message()))["type"] == "delta":
                pass
            assert (reply["type"], reply["id"]) == ("done", "next")
        nursery.cancel_scope.cancel()
