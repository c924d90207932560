"""The OpenAI-compatible HTTP endpoint, over real loopback sockets: with httpx, and with the
official ``openai`` SDK (which runs on trio through anyio)."""

from __future__ import annotations

import gc
import json
import logging
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import openai
import pytest
import trio
import trio.testing

from relayrace import Category, Config, Supervisor, open_supervisor
from relayrace.server import Server, ServerSettings, serve
from relayrace.testing import SCRIPTED_ANSWER, Answer, Fail, Hang, split_text

from .reliability import live_tasks
from .support import client, config, scripted_provider

C = Category
TOKEN = "http-s3cret-token"
MESSAGES = [{"role": "user", "content": "hi"}]
AUTH = {"authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def running(
    cfg: Config, **settings: Any
) -> AsyncIterator[tuple[Supervisor, Server, httpx.AsyncClient]]:
    """A supervisor for ``cfg``, the HTTP endpoint on a free loopback port, and an httpx client
    for it (no timeouts of its own: the tests' clock may jump)."""
    settings.setdefault("ws_port", None)
    settings.setdefault("tokens", [TOKEN])
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        server = await nursery.start(serve, sup, ServerSettings(http_port=0, **settings))
        assert server.http_url is not None
        async with httpx.AsyncClient(base_url=server.http_url, timeout=None, headers=AUTH) as http:
            yield sup, server, http
        nursery.cancel_scope.cancel()


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **extra}


async def events(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream (``"[DONE]"`` kept as a string)."""
    found: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            found.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return found


async def raw_request(server: Server, payload: dict[str, Any]) -> trio.SocketStream:
    """A chat completion request sent on a bare socket, which the test can close at any moment
    (httpx leaves its inner async generators for the garbage collector when a stream is left
    early, which trio reports)."""
    assert server.http_port is not None
    data = json.dumps(payload).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: relayrace\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
    )
    return stream


# --- non-streamed -----------------------------------------------------------------------------


async def test_chat_completion(autojump_clock):
    cfg = config(scripted_provider("a", Answer(model="upstream-x")))
    async with running(cfg) as (_, _, http):
        response = await http.post(
            "/v1/chat/completions", json=body(temperature=0.2, n=None, top_p=None)
        )
    assert response.status_code == 200
    assert response.headers["x-relayrace-provider"] == "a"
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["model"] == "upstream-x"  # the model that answered, not the route
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": SCRIPTED_ANSWER, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
    assert data["relayrace"]["provider"] == "a"
    assert [a["outcome"] for a in data["relayrace"]["attempts"]] == ["ok"]
    assert data["relayrace"]["decisions"] == []
    assert client(cfg, "a").calls[0].stream is False


async def test_failover_is_reported(autojump_clock):
    cfg = config(
        scripted_provider(
            "a", Fail(category=C.QUOTA_EXHAUSTED, status=429, code="insufficient_quota")
        ),
        scripted_provider("b"),
    )
    async with running(cfg) as (_, _, http):
        response = await http.post("/v1/chat/completions", json=body())
    assert response.status_code == 200
    assert response.headers["x-relayrace-provider"] == "b"
    trace = response.json()["relayrace"]
    assert [(a["actor"], a["outcome"]) for a in trace["attempts"]] == [("a", "failed"), ("b", "ok")]
    assert trace["attempts"][0]["failure"]["code"] == "insufficient_quota"
    assert trace["decisions"][0]["action"] == "failover"


# --- streamed ---------------------------------------------------------------------------------


async def test_streamed_chat_completion(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=3, delay=1.0)))
    async with running(cfg) as (_, _, http):
        async with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-relayrace-provider"] == "a"
            chunks = await events(response)
    *answer, last, done = chunks
    assert done == "[DONE]"
    assert [c["choices"][0]["delta"] for c in answer] == [
        {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        for i, piece in enumerate(split_text(SCRIPTED_ANSWER, 3))
    ]
    for chunk in chunks[:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == answer[0]["id"]
        assert chunk["model"] == "m"
        assert "usage" not in chunk  # only with stream_options.include_usage
    assert [c["choices"][0]["finish_reason"] for c in answer] == [None, None, None]
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert last["relayrace"]["provider"] == "a"
    assert client(cfg, "a").calls[0].stream is True


async def test_streamed_usage_when_asked_for(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=2)))
    async with running(cfg) as (_, _, http):
        request = body(stream=True, stream_options={"include_usage": True})
        async with http.stream("POST", "/v1/chat/completions", json=request) as response:
            chunks = await events(response)
    *answer, usage, done = chunks
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in answer)
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}


async def test_streamed_failover_before_the_first_delta_is_invisible(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.OVERLOADED, status=529)),
        scripted_provider("b", Answer(chunks=2)),
    )
    async with running(cfg) as (_, _, http):
        async with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
            assert response.headers["x-relayrace-provider"] == "b"
            chunks = await events(response)
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == SCRIPTED_ANSWER
    )
    trace = chunks[-2]["relayrace"]
    assert [a["actor"] for a in trace["attempts"]] == ["a", "b"]


async def test_a_stream_broken_midway_ends_with_an_error_event_and_no_done(autojump_clock):
    cfg = config(
        scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=500, after_chunks=2)),
        scripted_provider("b"),
    )
    async with running(cfg) as (_, _, http):
        async with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
            assert response.status_code == 200
            chunks = await events(response)
    assert "[DONE]" not in chunks
    first, second, error = chunks
    assert first["choices"][0]["delta"]["content"] + second["choices"][0]["delta"]["content"]
    assert error["error"]["type"] == "upstream_error"
    assert error["error"]["code"] == "interrupted"
    assert error["relayrace"]["category"] == "stream_error"
    assert error["relayrace"]["attempts"][0]["actor"] == "a"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("step", "status", "kind", "code"),
    [
        (
            Fail(category=C.BAD_REQUEST, status=400, code="invalid_value"),
            400,
            "invalid_request_error",
            "invalid_value",
        ),
        (
            Fail(category=C.CONTEXT_LENGTH, status=400, code="context_length_exceeded"),
            400,
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (
            Fail(category=C.CONTENT_POLICY, status=400),
            400,
            "invalid_request_error",
            "content_policy",
        ),
        (
            Fail(category=C.MODEL_NOT_FOUND, status=404),
            404,
            "invalid_request_error",
            "model_not_found",
        ),
        (
            Fail(category=C.RATE_LIMIT, status=429, retry_after=90),
            429,
            "rate_limit_error",
            "rate_limit",
        ),
        (Fail(category=C.OVERLOADED, status=529), 503, "service_unavailable_error", "overloaded"),
        (Fail(category=C.TIMEOUT), 504, "server_error", "timeout"),
        (Fail(category=C.PROVIDER_5XX, status=500), 502, "upstream_error", "provider_5xx"),
        (
            Fail(category=C.AUTH, status=401, code="invalid_api_key"),
            502,
            "upstream_error",
            "invalid_api_key",
        ),
        (Fail(category=C.QUOTA_EXHAUSTED, status=429), 502, "upstream_error", "quota_exhausted"),
        (Fail(category=C.NETWORK), 502, "upstream_error", "network"),
    ],
)
async def test_failures_map_to_openai_errors(autojump_clock, step, status, kind, code, stream):
    cfg = config(scripted_provider("a", step))
    async with running(cfg) as (_, _, http):
        response = await http.post("/v1/chat/completions", json=body(stream=stream))
    assert response.status_code == status
    data = response.json()
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == kind
    assert data["error"]["code"] == code
    assert data["error"]["message"].startswith(step.category.value)
    assert data["relayrace"]["category"] == step.category.value
    assert data["relayrace"]["attempts"][0]["actor"] == "a"
    if step.category is C.RATE_LIMIT:
        assert response.headers["retry-after"] == "90"


@pytest.mark.parametrize(
    ("payload", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1]", 400, "invalid_json", None),
        (json.dumps({"model": "m"}).encode(), 400, "invalid_request", "messages"),
        (
            json.dumps(body(messages=[{"role": "robot", "content": "x"}])).encode(),
            400,
            "invalid_request",
            "messages[0].role",
        ),
        (json.dumps(body(temperature=7)).encode(), 400, "invalid_request", "temperature"),
        (json.dumps(body(stream="yes")).encode(), 400, None, "stream"),
        (
            json.dumps(body(stream_options={"include_usage": True})).encode(),
            400,
            None,
            "stream_options",
        ),
        (json.dumps(body(model="nope")).encode(), 404, "model_not_found", "model"),
    ],
)
async def test_invalid_requests_get_openai_errors(autojump_clock, payload, status, code, param):
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, _, http):
        response = await http.post("/v1/chat/completions", content=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    assert client(cfg, "a").calls == []


async def test_n_refused_by_every_provider_is_a_400_naming_them(autojump_clock):
    from relayrace import Capabilities

    cfg = config(scripted_provider("a", capabilities=Capabilities(n=False)))
    async with running(cfg) as (_, _, http):
        for stream in (False, True):
            response = await http.post("/v1/chat/completions", json=body(n=2, stream=stream))
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == "n"
            assert "(a: default:capabilities.n=false)" in error["message"]
    assert client(cfg, "a").calls == []


async def test_the_request_body_is_limited(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, max_body_bytes=1000) as (_, _, http):
        ok = await http.post("/v1/chat/completions", json=body(user="x" * 800))
        declared = await http.post("/v1/chat/completions", json=body(user="x" * 1000))

        async def chunked() -> AsyncIterator[bytes]:
            # No content-length: the limit is enforced while reading.
            for _ in range(20):
                yield b" " * 100

        streamed = await http.post("/v1/chat/completions", content=chunked())
    assert ok.status_code == 200
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    assert len(client(cfg, "a").calls) == 1


async def test_unknown_paths_and_methods(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, _, http):
        missing = await http.get("/v1/audio/speech")
        wrong = await http.get("/v1/chat/completions")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/healthz"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {TOKEN}x", TOKEN])
async def test_a_missing_or_wrong_token_gets_401(autojump_clock, caplog, path, header):
    caplog.set_level(logging.DEBUG)
    cfg = config(scripted_provider("a"))
    headers = {} if header is None else {"authorization": header}
    async with running(cfg) as (_, server, _):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=None) as anonymous:
            response = await anonymous.request(
                "POST" if "chat" in path else "GET", path, json=body(), headers=headers
            )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"] == {
        "message": "missing or invalid bearer token",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert TOKEN not in response.text
    assert TOKEN not in caplog.text
    assert client(cfg, "a").calls == []


async def test_no_tokens_means_no_auth(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, tokens=[]) as (_, server, _):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=None) as anonymous:
            response = await anonymous.post("/v1/chat/completions", json=body())
    assert response.status_code == 200


# --- models and health ------------------------------------------------------------------------


async def test_models_lists_the_routes(autojump_clock):
    cfg = config(scripted_provider("a"), scripted_provider("b"))
    async with running(cfg) as (_, _, http):
        response = await http.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [
            {
                "id": "m",
                "object": "model",
                "created": 0,
                "owned_by": "relayrace",
                "chain": ["a", "b"],
                "strategy": "priority",
            }
        ],
    }


async def test_healthz_reports_actor_health(autojump_clock):
    cfg = config(scripted_provider("a"), scripted_provider("b"))
    async with running(cfg) as (sup, _, http):
        healthy = (await http.get("/healthz")).json()
        sup.bench("b", 30)
        degraded = await http.get("/healthz")
    assert healthy["status"] == "ok"
    assert healthy["actors"]["a"]["state"] == "ok"
    assert degraded.status_code == 200
    assert degraded.json()["status"] == "degraded"
    assert degraded.json()["actors"]["b"]["state"] == "benched"
    assert degraded.json()["actors"]["b"]["benched_until"] == 30


# --- cancellation and shutdown ----------------------------------------------------------------


async def test_a_client_leaving_a_stream_cancels_the_upstream_call(autojump_clock):
    cfg = config(scripted_provider("a", Hang(after_chunks=1)))
    async with running(cfg, tokens=[]) as (sup, server, _):
        async with await raw_request(server, body(stream=True)) as stream:
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some()
            assert received.startswith(b"HTTP/1.1 200")
        await trio.testing.wait_all_tasks_blocked()
        assert client(cfg, "a").outcomes == ["cancelled"]
        assert sup.health()["a"].consecutive_failures == 0
        assert sup.statistics().in_flight == 0
        assert trio.current_time() == 0


async def test_a_client_disconnecting_cancels_a_non_streamed_request(autojump_clock):
    cfg = config(scripted_provider("a", Hang()))
    async with running(cfg, tokens=[]) as (sup, server, _):
        async with await raw_request(server, body()):
            await trio.testing.wait_all_tasks_blocked()
            assert client(cfg, "a").in_flight == 1
        await trio.testing.wait_all_tasks_blocked()
        assert client(cfg, "a").outcomes == ["cancelled"]
        assert sup.health()["a"].consecutive_failures == 0
        assert trio.current_time() == 0


async def test_a_client_leaving_a_later_stream_of_its_connection_cancels_it(autojump_clock):
    # The connection's reader watches each request in turn (no watch task per request): on a
    # keep-alive connection, a pipelined next request sent during a stream is kept (not taken
    # for a disconnect), and the client's close then cancels the stream's upstream call.
    cfg = config(scripted_provider("a", Answer(chunks=2), Hang(after_chunks=1)))
    async with running(cfg, tokens=[]) as (sup, server, _):
        assert server.http_port is not None
        async with await trio.open_tcp_stream("127.0.0.1", server.http_port) as stream:
            await stream.send_all(post(body(stream=True)))
            received = b""
            while b"data: [DONE]" not in received:
                received += await stream.receive_some()
            await stream.send_all(post(body(stream=True)))
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some()
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked()
            assert client(cfg, "a").in_flight == 1
        await trio.testing.wait_all_tasks_blocked()
        assert client(cfg, "a").outcomes == ["ok", "cancelled"]
        assert sup.statistics().in_flight == 0
        assert trio.current_time() == 0


async def test_the_keep_alive_timeout_runs_from_the_end_of_a_slow_answer(autojump_clock):
    cfg = config(scripted_provider("a", Answer(chunks=2, first_delay=3.0)))
    async with running(cfg, tokens=[], keep_alive_timeout=7) as (_, server, _):
        received, closed = await exchange(server, post(body(stream=True)))
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"data: [DONE]" in received
    assert closed == 3 + 7


class _Spawned(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_requests_on_a_connection_spawn_no_server_task(autojump_clock):
    # The disconnect watch is the connection's reader: after the connection's own tasks, the
    # server starts none per request (a request's nursery and watch task cost ~35 µs).
    cfg = config(scripted_provider("a", Answer(chunks=2), Answer(chunks=2), Answer(), Answer()))
    async with running(cfg, tokens=[]) as (_, _, http):
        await http.post("/v1/chat/completions", json=body(stream=True))
        spawned = _Spawned()
        trio.lowlevel.add_instrument(spawned)
        try:
            for payload in (body(stream=True), body(), body()):
                response = await http.post("/v1/chat/completions", json=payload)
                assert response.status_code == 200
        finally:
            trio.lowlevel.remove_instrument(spawned)
    assert [name for name in spawned.names if "relayrace.server" in name] == []
    assert client(cfg, "a").outcomes == ["ok"] * 4


async def test_graceful_shutdown(autojump_clock):
    cfg = config(
        scripted_provider(
            "a", Answer(chunks=2, delay=4.0, first_delay=1.0), Hang(after_chunks=1), Hang()
        )
    )
    settings = ServerSettings(ws_port=None, http_port=0, shutdown_grace=10)
    results: dict[str, Any] = {}
    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            assert server.http_url is not None
            async with httpx.AsyncClient(base_url=server.http_url, timeout=None) as http:

                async def quick() -> None:
                    results["quick"] = await http.post("/v1/chat/completions", json=body())

                async def stuck_stream() -> None:
                    request = body(stream=True)
                    async with http.stream("POST", "/v1/chat/completions", json=request) as r:
                        results["stuck_stream"] = await events(r)

                async def stuck() -> None:
                    results["stuck"] = await http.post("/v1/chat/completions", json=body())

                async with trio.open_nursery() as clients:
                    for run in (quick, stuck_stream, stuck):
                        clients.start_soon(run)
                        await trio.testing.wait_all_tasks_blocked()
                    assert client(cfg, "a").in_flight == 3
                    begun = trio.current_time()
                    server.shutdown()
                    await trio.testing.wait_all_tasks_blocked()
                    with pytest.raises(httpx.ConnectError):
                        async with httpx.AsyncClient(base_url=server.http_url) as late:
                            await late.get("/healthz")
        stopped_after = trio.current_time() - begun
    assert results["quick"].status_code == 200
    assert results["quick"].json()["choices"][0]["message"]["content"] == SCRIPTED_ANSWER
    *_, error = results["stuck_stream"]
    assert error["error"]["code"] == "server_shutdown"
    assert "[DONE]" not in results["stuck_stream"]
    assert results["stuck"].status_code == 503
    assert results["stuck"].json()["error"]["code"] == "server_shutdown"
    assert stopped_after == 10
    assert sorted(client(cfg, "a").outcomes) == ["cancelled", "cancelled", "ok"]


# --- the official openai SDK ------------------------------------------------------------------
# These run on the real clock: the SDK looks up the platform in a worker thread, and a mock
# clock would jump while it runs. Nothing here waits on time.


@asynccontextmanager
async def unfinished_httpx_generators() -> AsyncIterator[None]:
    """The SDK stops reading a stream at ``[DONE]`` (or at an error event), leaving httpx's inner
    async generators suspended; trio warns when it finalizes them. Collect them here, and let
    trio's finalizer run, where that is expected, instead of in some later test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def sdk(cfg: Config) -> AsyncIterator[openai.AsyncOpenAI]:
    async with running(cfg) as (_, server, _):
        async with httpx.AsyncClient(timeout=None) as http_client:
            yield openai.AsyncOpenAI(
                base_url=f"{server.http_url}/v1",
                api_key=TOKEN,
                http_client=http_client,
                max_retries=0,
            )


async def test_openai_sdk_complete_with_failover():
    cfg = config(
        scripted_provider("a", Fail(category=C.OVERLOADED, status=529)),
        scripted_provider("b", Answer(model="upstream-b")),
    )
    async with sdk(cfg) as ai:
        raw = await ai.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        completion = raw.parse()
    assert raw.headers["x-relayrace-provider"] == "b"
    assert completion.choices[0].message.content == SCRIPTED_ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "upstream-b"
    assert completion.usage is not None and completion.usage.total_tokens == 19
    extra = completion.model_extra or {}
    assert [a["actor"] for a in extra["relayrace"]["attempts"]] == ["a", "b"]


async def test_openai_sdk_stream_with_failover():
    cfg = config(
        scripted_provider("a", Fail(category=C.OVERLOADED, status=529)),
        scripted_provider("b", Answer(chunks=4)),
    )
    async with unfinished_httpx_generators():
        async with sdk(cfg) as ai:
            stream = await ai.chat.completions.create(
                model="m",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            del stream
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPTED_ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


async def test_openai_sdk_sees_errors():
    cfg = config(scripted_provider("a", Fail(category=C.RATE_LIMIT, status=429, retry_after=90)))
    async with sdk(cfg) as ai:
        with pytest.raises(openai.RateLimitError) as caught:
            await ai.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.NotFoundError):
            await ai.chat.completions.create(model="nope", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit"


async def test_openai_sdk_sees_a_broken_stream():
    cfg = config(scripted_provider("a", Fail(category=C.PROVIDER_5XX, status=500, after_chunks=2)))
    received = []
    async with unfinished_httpx_generators():
        async with sdk(cfg) as ai:
            stream = await ai.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
            del stream
    assert len(received) == 2
    assert caught.value.code == "interrupted"


async def test_openai_sdk_with_a_wrong_key():
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, server, _):
        async with httpx.AsyncClient(timeout=None) as http_client:
            ai = openai.AsyncOpenAI(
                base_url=f"{server.http_url}/v1",
                api_key="wrong",
                http_client=http_client,
                max_retries=0,
            )
            with pytest.raises(openai.AuthenticationError):
                await ai.models.list()
            ai = openai.AsyncOpenAI(
                base_url=f"{server.http_url}/v1",
                api_key=TOKEN,
                http_client=http_client,
                max_retries=0,
            )
            models = [m.id async for m in ai.models.list()]
    assert models == ["m"]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_content_chunks_are_exactly_the_json_of_their_objects(autojump_clock, include_usage):
    # Content chunks are formatted around the encoded text, not built as a dict per delta:
    # on the wire, byte for byte what ``json.dumps`` (compact, unescaped non-ASCII) writes.
    from relayrace.server._common import dumps

    text = 'naïve "q" \\ \n\u2028 ☃ \x00 \t end'
    cfg = config(scripted_provider("a", Answer(text=text, chunks=6)))
    async with running(cfg) as (_, _, http):
        request = body(stream=True, stream_options={"include_usage": include_usage})
        async with http.stream("POST", "/v1/chat/completions", json=request) as response:
            raw = (await response.aread()).decode()
    lines = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert lines[:-1] == [dumps(chunk) for chunk in chunks]
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == text
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(("usage" in c) is include_usage for c in chunks)


async def test_deltas_that_are_ready_together_stream_intact(autojump_clock):
    # Chunks that become ready while a write is in progress go out in one body message; each
    # is still its own event, in order, and the stream ends as usual.
    cfg = config(scripted_provider("a", Answer(chunks=40)))
    async with running(cfg) as (_, _, http):
        request = body(stream=True, stream_options={"include_usage": True})
        async with http.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            chunks = await events(response)
    *answer, last, usage, done = chunks
    assert done == "[DONE]"
    assert [c["choices"][0]["delta"] for c in answer] == [
        {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        for i, piece in enumerate(split_text(SCRIPTED_ANSWER, 40))
    ]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []


async def test_http2_is_refused_and_http11_is_served(autojump_clock):
    # hypercorn would speak HTTP/2 (prior knowledge, or an h2c upgrade) on the HTTP port; only
    # HTTP/1.1 is served and tested, so an HTTP/2 request gets a clean 505.
    cfg = config(scripted_provider("a"))
    async with running(cfg) as (_, server, http):
        assert server.http_url is not None
        async with httpx.AsyncClient(base_url=server.http_url, http1=False, http2=True) as h2:
            refused = await h2.post("/v1/chat/completions", json=body())
        assert refused.http_version == "HTTP/2"
        assert refused.status_code == 505
        assert refused.json()["error"]["code"] == "http_version"
        served = await http.post("/v1/chat/completions", json=body())
        assert served.http_version == "HTTP/1.1" and served.status_code == 200


# --- the HTTP/1.1 core: what hypercorn gave us --------------------------------------------------


async def exchange(server: Server, *parts: bytes, between: float = 0) -> tuple[bytes, float]:
    """Send ``parts`` on one bare connection (``between`` seconds apart), then read until the
    server closes it: everything it answered, and when it closed (seconds after the first part)."""
    assert server.http_port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    begun = trio.current_time()
    received = b""

    async def write() -> None:
        for i, part in enumerate(parts):
            if i and between:
                await trio.sleep(between)
            try:
                await stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(write)
        with trio.fail_after(60):
            while True:
                try:
                    data = await stream.receive_some()
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                received += data
        closed = trio.current_time() - begun
        nursery.cancel_scope.cancel()
    return received, closed


def post(payload: dict[str, Any], *extra: bytes) -> bytes:
    data = json.dumps(payload).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    return head + b"".join(extra) + b"content-length: %d\r\n\r\n%s" % (len(data), data)


async def test_response_heads_carry_each_header_once_with_h11s_framing(autojump_clock):
    # The route's headers are joined into the head after the ones h11 decides (the framing, the
    # close): each once, answer after answer on one connection, and parsed by a client.
    cfg = config(scripted_provider("a", Answer(chunks=3)))
    streamed = post(body(stream=True))
    async with running(cfg, tokens=[]) as (_, server, _):
        received, _ = await exchange(
            server, streamed + post(body()) + post(body(stream=True), b"connection: close\r\n")
        )
    answers = _responses(received, streamed)
    assert len(answers) == 3
    for i, (head, data) in enumerate(answers):
        names = [name for name, _ in head.headers]
        assert len(names) == len(set(names)), names
        headers = dict(head.headers)
        assert head.status_code == 200
        assert headers[b"x-relayrace-provider"] == b"a"
        if i == 1:
            assert headers[b"content-type"] == b"application/json"
            assert headers[b"content-length"] == b"%d" % len(data)
            assert b"transfer-encoding" not in headers
        else:
            assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
            assert headers[b"cache-control"] == b"no-cache"
            assert headers[b"transfer-encoding"] == b"chunked"
            assert data.endswith(b"data: [DONE]\n\n")
    assert dict(answers[2][0].headers)[b"connection"] == b"close"
    assert b"connection" not in dict(answers[0][0].headers)


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, tokens=[]) as (_, server, _):
        pipelined = (
            b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n"
            + post(body())
            + b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
        )
        received, _ = await exchange(server, pipelined)
    assert received.count(b"HTTP/1.1 200 ") == 3
    models = received.index(b'"object":"list"')
    completion = received.index(b'"object":"chat.completion"')
    health = received.index(b'"in_flight"')
    assert models < completion < health
    assert len(client(cfg, "a").calls) == 1


async def test_a_chunked_request_body_is_read(autojump_clock):
    cfg = config(scripted_provider("a"))
    data = json.dumps(body()).encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + 7]), data[i : i + 7]) for i in range(0, len(data), 7)
    )
    async with running(cfg, tokens=[]) as (_, server, _):
        received, _ = await exchange(
            server,
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n",
            chunked + b"0\r\n\r\n",
            between=1,
        )
    assert received.startswith(b"HTTP/1.1 200 ")
    assert SCRIPTED_ANSWER.encode() in received


async def test_expect_100_continue_is_answered_before_the_body(autojump_clock):
    cfg = config(scripted_provider("a"))
    data = json.dumps(body()).encode()
    async with running(cfg, tokens=[]) as (_, server, _):
        assert server.http_port is not None
        async with await trio.open_tcp_stream("127.0.0.1", server.http_port) as stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(data)
            )
            interim = await stream.receive_some()
            assert interim == b"HTTP/1.1 100 \r\n\r\n"
            await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")


async def test_an_oversized_head_gets_431(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, tokens=[], max_header_bytes=4096) as (_, server, _):
        received, _ = await exchange(server, post(body(), b"x-big: " + b"y" * 5000 + b"\r\n"))
        fits, _ = await exchange(
            server, post(body(), b"x-big: " + b"y" * 3000 + b"\r\n", b"connection: close\r\n")
        )
    assert received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert fits.startswith(b"HTTP/1.1 200 ")
    assert len(client(cfg, "a").calls) == 1


@pytest.mark.parametrize(
    "framing",
    [
        b"content-length: 5\r\ntransfer-encoding: chunked\r\n",
        b"transfer-encoding: chunked\r\ncontent-length: 5\r\n",
        b"content-length: 5\r\ncontent-length: 6\r\n",
    ],
    ids=["cl-te", "te-cl", "cl-cl"],
)
async def test_conflicting_body_framing_is_refused(autojump_clock, framing):
    # Request smuggling: a request whose body length two parsers could read differently is
    # refused, and the connection closed (what follows it is never read as a request).
    cfg = config(scripted_provider("a"))
    smuggled = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
    async with running(cfg, tokens=[]) as (_, server, _):
        received, _ = await exchange(
            server,
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n"
            + framing
            + b"\r\n"
            + b"0\r\n\r\n"
            + smuggled,
        )
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert received.count(b"HTTP/1.1") == 1
    assert client(cfg, "a").calls == []


async def test_a_slow_head_or_body_is_cut_at_the_read_timeout(autojump_clock):
    # Slowloris: a byte now and then keeps no connection open past the read timeout.
    cfg = config(scripted_provider("a"))
    head = post(body())
    async with running(cfg, tokens=[], read_timeout=3) as (_, server, _):
        slow_head, head_closed = await exchange(
            server, *(head[i : i + 1] for i in range(40)), between=1
        )
        slow_body, body_closed = await exchange(
            server,
            head[:-10],
            *(head[i : i + 1] for i in range(len(head) - 10, len(head))),
            between=1,
        )
    assert slow_head == b""
    assert head_closed == 3
    assert slow_body == b""
    assert body_closed == 3
    assert client(cfg, "a").calls == []


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(autojump_clock):
    cfg = config(scripted_provider("a"))
    async with running(cfg, tokens=[], keep_alive_timeout=7) as (_, server, _):
        received, closed = await exchange(server, post(body()))
    assert received.startswith(b"HTTP/1.1 200 ")
    assert closed == 7


# --- an idle-connection flood (issue #11) -------------------------------------------------------


async def idle_socket(server: Server) -> trio.SocketStream:
    assert server.http_port is not None
    return await trio.open_tcp_stream("127.0.0.1", server.http_port)


def h11_connections() -> int:
    """How many ``h11.Connection`` objects are alive (the HTTP server's per-connection state)."""
    gc.collect()
    return sum(isinstance(thing, h11.Connection) for thing in gc.get_objects())


async def test_an_idle_socket_costs_one_task_until_it_sends_a_byte(autojump_clock):
    # A flood of sockets that never send a byte must cost the event loop as little as possible:
    # nothing is built nor read for them, and their first request's idle deadline (from the
    # accept) ends them. One that sends a request in time is served.
    cfg = config(scripted_provider("a"))
    async with running(cfg, tokens=[], keep_alive_timeout=5.0) as (_, server, _):
        await trio.testing.wait_all_tasks_blocked()
        before = len(live_tasks())
        idle = [await idle_socket(server) for _ in range(50)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(live_tasks()) - before == 50  # one per socket: its connection's task
        assert h11_connections() == 0  # nothing built for them
        start = trio.current_time()
        async with idle[0] as late:
            await trio.sleep(4.5)
            await late.send_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            answer = b""
            while data := await late.receive_some():
                answer += data
            assert answer.startswith(b"HTTP/1.1 200 ") and b'"object":"list"' in answer
            for sock in idle[1:]:
                assert await sock.receive_some() == b""  # closed at the idle deadline
                await sock.aclose()
            assert trio.current_time() - start == 5.0
        await trio.testing.wait_all_tasks_blocked()
        assert len(live_tasks()) == before
        received, _ = await exchange(server, b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 ")


async def test_graceful_shutdown_closes_http_sockets_that_sent_nothing_at_once(autojump_clock):
    cfg = config(scripted_provider("a"))
    settings = ServerSettings(ws_port=None, http_port=0, shutdown_grace=10)
    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, settings)
            async with await idle_socket(server) as idle:
                await trio.testing.wait_all_tasks_blocked()
                server.shutdown()
                assert await idle.receive_some() == b""
        assert trio.current_time() == 0


async def test_http_sockets_over_the_cap_wait_in_the_accept_queue(autojump_clock):
    # Two idle sockets hold the listener's two places: a third connection is accepted (and
    # answered) only when the idle deadline has closed them.
    cfg = config(scripted_provider("a"))
    async with running(cfg, tokens=[], max_sockets=2, keep_alive_timeout=5.0) as (_, server, _):
        first, second = await idle_socket(server), await idle_socket(server)
        async with first, second:
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            received, _ = await exchange(
                server, b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
            )
            assert received.startswith(b"HTTP/1.1 200 ")
            assert trio.current_time() - start == 5.0


def _responses(received: bytes, request: bytes) -> list[tuple[h11.Response, bytes]]:
    """The responses in ``received`` (to requests like ``request``, up to the server's close),
    read by h11 as a client would: each head and its whole body."""
    conn = h11.Connection(h11.CLIENT)
    found: list[tuple[h11.Response, bytes]] = []
    conn.receive_data(received)
    conn.receive_data(b"")  # the server closed
    while True:
        conn.send(h11.Request(method="POST", target="/", headers=[(b"host", b"t")]))
        conn.send(h11.EndOfMessage())
        head, data = None, b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return found
        assert head is not None
        found.append((head, data))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return found
        conn.start_next_cycle()


def _sse(data: bytes) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in data.decode().split("\n\n") if line]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


async def test_streamed_bodies_are_framed_for_each_client(autojump_clock):
    # The content chunks of a stream are framed by the server (not an h11 event each) once
    # h11 has shown it frames the body in chunks: the bytes must stay exactly what a client
    # parses, answer after answer on one keep-alive connection; an HTTP/1.0 client gets the
    # body delimited by the close (through h11).
    cfg = config(scripted_provider("a", Answer(chunks=7)))
    request = body(stream=True)
    async with running(cfg, tokens=[]) as (_, server, _):
        keep_alive, _ = await exchange(
            server, post(request) + post(request) + post(request, b"connection: close\r\n")
        )
        data = json.dumps(request).encode()
        old, _ = await exchange(
            server,
            b"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%s"
            % (len(data), data),
        )
    expected = split_text(SCRIPTED_ANSWER, 7)
    answers = _responses(keep_alive, post(request))
    assert len(answers) == 3
    for head, data in answers:
        assert head.status_code == 200
        assert (b"transfer-encoding", b"chunked") in head.headers
        *chunks, last, done = _sse(data)
        assert [c["choices"][0]["delta"]["content"] for c in chunks] == expected
        assert last["choices"][0]["finish_reason"] == "stop"
        assert done == "[DONE]"
    assert old.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in old.lower()
    *chunks, _, done = _sse(old.partition(b"\r\n\r\n")[2])
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == expected
    assert done == "[DONE]"
