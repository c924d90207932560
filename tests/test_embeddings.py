"""Embeddings with failover: the wire formats, ``Supervisor.embed`` over real HTTP to the mock
provider (OpenAI and Gemini formats), and ``POST /v1/embeddings`` with the official ``openai``
SDK."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from relayrace import (
    Action,
    BadRequest,
    Budgets,
    Category,
    Config,
    EmbedRequest,
    RequestFailed,
    Route,
    Supervisor,
    open_supervisor,
)
from relayrace.providers import MalformedStream, UpstreamErrorBody, embeddings
from relayrace.server import ServerSettings, serve
from relayrace.testing import (
    MOCK_DIMENSIONS,
    Answer,
    MockProvider,
    ScriptedClient,
    mock_vector,
    serve_mock_provider,
)

from .support import mock_client, mock_config

KEY = "sk-mock-0123456789abcdef"
TOKEN = "embed-s3cret-token"
BUDGETS = Budgets(connect=1.0, first_token=3.0, idle=2.0, attempt=30.0)


# --- the wire formats (pure) ----------------------------------------------------------------


def test_openai_payload_and_reply() -> None:
    assert embeddings.openai_payload(["a b", "c"], model="text-embedding-3-small", dimensions=2) == {
        "model": "text-embedding-3-small",
        "input": ["a b", "c"],
        "encoding_format": "float",
        "dimensions": 2,
    }
    packed = base64.b64encode(struct.pack("<2f", 0.5, -0.25)).decode()
    body = {
        "object": "list",
        # Out of order, one of them base64: read by index, decoded.
        "data": [
            {"object": "embedding", "index": 1, "embedding": packed},
            {"object": "embedding", "index": 0, "embedding": [1, 0.125]},
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    vectors, model, usage = embeddings.openai_reply(body, count=2, dimensions=2)
    assert vectors == ((1.0, 0.125), (0.5, -0.25))
    assert model == "text-embedding-3-small"
    assert usage is not None and usage.prompt_tokens == 3
    # Written back, as numbers and as base64, it reads the same.
    for encoding in ("float", "base64"):
        again = embeddings.openai_embeddings(vectors, model="x", usage=usage, encoding_format=encoding)
        assert embeddings.openai_reply(again, count=2)[0] == vectors


@pytest.mark.parametrize(
    "body",
    [
        {"data": [{"index": 0, "embedding": [1.0, 2.0]}]},  # one vector for two inputs
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]},
        {"data": [{"index": 0, "embedding": [1.0, 2.0]}, {"index": 0, "embedding": [1.0, 2.0]}]},
        {"data": [{"index": 0, "embedding": ["1", 2.0]}, {"index": 1, "embedding": [1.0, 2.0]}]},
        {"data": "nope"},
        [],
    ],
)
def test_openai_replies_that_cannot_be_read(body: Any) -> None:
    with pytest.raises(MalformedStream) as caught:
        embeddings.openai_reply(body, count=2, dimensions=2)
    assert caught.value.code == "malformed_response"


def test_an_error_in_a_200_is_an_upstream_error() -> None:
    body = {"error": {"message": "no", "type": "invalid_request_error"}}
    with pytest.raises(UpstreamErrorBody):
        embeddings.openai_reply(body, count=1)
    with pytest.raises(UpstreamErrorBody):
        embeddings.gemini_reply(body, count=1)


def test_gemini_batch_payload_and_reply() -> None:
    assert embeddings.gemini_path("gemini-embedding-001") == (
        "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    )
    assert embeddings.gemini_payload(["a", "b"], model="gemini-embedding-001", dimensions=3) == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": text}]},
                "outputDimensionality": 3,
            }
            for text in ("a", "b")
        ]
    }
    body = {"embeddings": [{"values": [0.0, 1.0, 2.0]}, {"values": [3, 4, 5]}]}
    vectors, model, usage = embeddings.gemini_reply(body, count=2, dimensions=3)
    assert vectors == ((0.0, 1.0, 2.0), (3.0, 4.0, 5.0))
    assert (model, usage) == (None, None)
    with pytest.raises(MalformedStream):
        embeddings.gemini_reply({"embeddings": [{"values": [0.0, 1.0, 2.0]}]}, count=2)


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("", "a"), {}, "model"),
        (("r", []), {}, "input"),
        (("r", 7), {}, "input"),
        (("r", ["a", ""]), {}, "input[1]"),
        (("r", ["a", [1, 2]]), {}, "input[1]"),
        (("r", "a"), {"dimensions": 0}, "dimensions"),
        (("r", "a"), {"dimensions": True}, "dimensions"),
        (("r", "a"), {"encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_requests_name_the_field(args: Any, kwargs: Any, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        EmbedRequest(*args, **kwargs)
    assert caught.value.field == field


# --- the supervisor over real HTTP to the mock provider ----------------------------------------


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as provider:
        yield provider
        await wait_all_tasks_blocked()
        assert provider.open_connections == 0
        assert provider.errors == []


def client_for(mock: MockProvider, fmt: str) -> Any:
    return mock_client(mock, fmt) if fmt in ("openai", "anthropic", "gemini") else ScriptedClient([Answer()] * 4)


def config(mock: MockProvider, *providers: tuple[str, str, str]) -> Config:
    """Providers ``(name, format, mock model)``, one route ``m`` over them in order."""
    return mock_config(mock, *providers, budgets=BUDGETS, client=client_for)


@pytest.mark.parametrize("fmt", ["openai", "gemini"])
async def test_vectors_come_back_in_input_order(mock: MockProvider, fmt: str) -> None:
    async with open_supervisor(config(mock, ("p", fmt, "ok"))) as sup:
        reply = await sup.embed(EmbedRequest("m", ["the quick fox", "a lazy dog"]))
        sized = await sup.embed(EmbedRequest("m", "one", dimensions=3))
    assert reply.provider == "p"
    assert reply.vectors == (mock_vector("the quick fox"), mock_vector("a lazy dog"))
    assert len(reply.vectors[0]) == MOCK_DIMENSIONS
    assert reply.model == "ok,tag=p"
    assert sized.vectors == (mock_vector("one", 3),)
    if fmt == "openai":
        assert reply.usage is not None and reply.usage.prompt_tokens == 6
    else:
        assert reply.usage is None  # Gemini reports none


async def test_gemini_gets_its_batch_format(mock: MockProvider) -> None:
    async with open_supervisor(config(mock, ("g", "gemini", "ok"))) as sup:
        await sup.embed(EmbedRequest("m", ["a", "b"], dimensions=4))
    [attempt] = mock.log
    assert attempt.path == "/v1beta/models/ok%2Ctag%3Dg:batchEmbedContents"
    assert attempt.request == {
        "requests": [
            {
                "model": "models/ok,tag=g",
                "content": {"parts": [{"text": text}]},
                "outputDimensionality": 4,
            }
            for text in ("a", "b")
        ]
    }


@pytest.mark.parametrize("fault", ["server-error", "malformed", "rate-limit"])
async def test_failover_from_a_failing_provider(mock: MockProvider, fault: str) -> None:
    cfg = config(mock, ("bad", "openai", fault), ("good", "gemini", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.embed(EmbedRequest("m", ["x"]))
    assert reply.provider == "good"
    assert reply.vectors == (mock_vector("x"),)
    assert [a.actor for a in reply.attempts] == ["bad", "good"]
    assert reply.attempts[0].failure is not None
    assert reply.decisions[-1].action is Action.FAILOVER


async def test_a_provider_without_embeddings_is_skipped(mock: MockProvider) -> None:
    cfg = config(mock, ("claude", "anthropic", "ok"), ("o", "openai", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.embed(EmbedRequest("m", "x"))
    assert reply.provider == "o"
    skip = reply.decisions[0]
    assert (skip.action, skip.actor) == (Action.SKIP, "claude")
    assert "embeddings" in skip.reason
    assert (skip.rule.rule, skip.rule.value) == ("embeddings", "false")
    assert [a.path for a in mock.log] == ["/v1/embeddings"]  # no call to Anthropic


async def test_a_route_that_cannot_embed_is_a_bad_request_before_any_call(
    mock: MockProvider,
) -> None:
    async with open_supervisor(config(mock, ("claude", "anthropic", "ok"))) as sup:
        with pytest.raises(BadRequest) as caught:
            await sup.embed(EmbedRequest("m", "x"))
        with pytest.raises(BadRequest):
            await sup.embed(EmbedRequest("nope", "x"))
    assert caught.value.field == "model"
    assert "claude: default:capabilities.embeddings=false" in str(caught.value)
    assert mock.log == []


async def test_a_client_that_answers_like_chat_fails_over(mock: MockProvider) -> None:
    # A scripted client declares every capability but gives no vectors.
    cfg = config(mock, ("scripted", "scripted", "ok"), ("o", "openai", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.embed(EmbedRequest("m", "x"))
    assert reply.provider == "o"
    assert reply.attempts[0].actor == "scripted"
    decision = reply.decisions[0]
    assert decision.action is Action.FAILOVER
    assert "stream_error" in decision.reason


async def test_every_provider_failing_is_a_request_failed(mock: MockProvider) -> None:
    cfg = config(mock, ("a", "openai", "unavailable"), ("b", "gemini", "server-error"))
    async with open_supervisor(cfg) as sup:
        with pytest.raises(RequestFailed) as caught:
            await sup.embed(EmbedRequest("m", "x"))
    assert caught.value.failure.category is Category.PROVIDER_5XX
    assert [a.actor for a in caught.value.attempts] == ["a", "b"]


# --- POST /v1/embeddings ----------------------------------------------------------------------


@asynccontextmanager
async def gateway(cfg: Config) -> AsyncIterator[tuple[Supervisor, str]]:
    async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
        settings = ServerSettings(http_port=0, ws_port=None, tokens=[TOKEN])
        server = await nursery.start(serve, sup, settings)
        assert server.http_url is not None
        yield sup, server.http_url
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def sdk(cfg: Config) -> AsyncIterator[openai.AsyncOpenAI]:
    async with gateway(cfg) as (_, url), httpx.AsyncClient(timeout=None) as http_client:
        yield openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=TOKEN, http_client=http_client, max_retries=0
        )


# These run on the real clock (the SDK looks up the platform in a worker thread).


async def test_openai_sdk_embeddings_with_failover(mock: MockProvider) -> None:
    cfg = config(mock, ("claude", "anthropic", "ok"), ("bad", "openai", "overloaded"), ("o", "openai", "ok"))
    async with sdk(cfg) as ai:
        raw = await ai.embeddings.with_raw_response.create(
            model="m", input=["alpha beta", "gamma"]
        )
        many = raw.parse()
        one = await ai.embeddings.create(model="m", input="alpha beta", encoding_format="float")
        sized = await ai.embeddings.create(model="m", input=["delta"], dimensions=5)
    assert raw.headers["x-relayrace-provider"] == "o"
    # The SDK asks for base64 by default and decodes it: the same floats either way.
    assert [d.embedding for d in many.data] == [
        list(mock_vector("alpha beta")),
        list(mock_vector("gamma")),
    ]
    assert [d.index for d in many.data] == [0, 1]
    assert many.model == "ok,tag=o"
    assert many.usage.prompt_tokens == 3
    assert one.data[0].embedding == list(mock_vector("alpha beta"))
    assert sized.data[0].embedding == list(mock_vector("delta", 5))
    trace = (many.model_extra or {})["relayrace"]
    assert trace["provider"] == "o"
    assert [a["actor"] for a in trace["attempts"]] == ["bad", "o"]
    assert [d["action"] for d in trace["decisions"]][0] == "skip"
    # The one provider that failed sent an overloaded error per request that reached it.
    assert [a.model for a in mock.log].count("overloaded,tag=bad") >= 1


async def test_openai_sdk_sees_embedding_errors(mock: MockProvider) -> None:
    cfg = config(mock, ("a", "openai", "rate-limit,retry_after=30"))
    async with sdk(cfg) as ai:
        with pytest.raises(openai.RateLimitError) as caught:
            await ai.embeddings.create(model="m", input="x")
        with pytest.raises(openai.NotFoundError):
            await ai.embeddings.create(model="nope", input="x")
    assert caught.value.response.headers["retry-after"] == "30"
    assert caught.value.body is not None


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"model": "m", "input": []}, 400, "input"),
        ({"model": "m", "input": ["a", 3]}, 400, "input[1]"),
        ({"model": "m", "input": "a", "dimensions": -1}, 400, "dimensions"),
        ({"model": "m", "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "m", "input": "a", "temperature": 1}, 400, "temperature"),
        ({"input": "a"}, 400, "model"),
        ({"model": "nope", "input": "a"}, 404, "model"),
        ({"model": "claude-only", "input": "a"}, 400, "model"),
    ],
)
async def test_bad_input_is_refused_before_any_provider_call(
    autojump_clock: Any, mock: MockProvider, payload: dict[str, Any], status: int, param: str
) -> None:
    cfg = config(mock, ("claude", "anthropic", "ok"), ("o", "openai", "ok"))
    cfg = Config(
        providers=cfg.providers,
        routes=[*cfg.routes, Route(model="claude-only", chain=["claude"])],
        policies=cfg.policies,
    )
    async with gateway(cfg) as (_, url):
        async with httpx.AsyncClient(timeout=None) as http:
            response = await http.post(
                f"{url}/v1/embeddings",
                json=payload,
                headers={"authorization": f"Bearer {TOKEN}"},
            )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert mock.log == []


async def test_a_failed_request_carries_its_trace(autojump_clock: Any, mock: MockProvider) -> None:
    cfg = config(mock, ("a", "openai", "server-error"), ("b", "gemini", "unavailable"))
    async with gateway(cfg) as (_, url):
        async with httpx.AsyncClient(timeout=None) as http:
            response = await http.post(
                f"{url}/v1/embeddings",
                json={"model": "m", "input": "x"},
                headers={"authorization": f"Bearer {TOKEN}"},
            )
    assert response.status_code == 502
    body = response.json()
    assert body["error"]["type"] == "upstream_error"
    assert [a["actor"] for a in body["relayrace"]["attempts"]] == ["a", "b"]
    assert KEY not in response.text


async def test_a_client_disconnecting_cancels_the_upstream_call(
    autojump_clock: Any, mock: MockProvider
) -> None:
    cfg = config(mock, ("o", "openai", "hang"))
    async with gateway(cfg) as (sup, url):
        port = int(url.rsplit(":", 1)[1])
        data = b'{"model": "m", "input": "x"}'
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /v1/embeddings HTTP/1.1\r\nhost: relayrace\r\n"
                b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (TOKEN.encode(), len(data), data)
            )
            await wait_all_tasks_blocked()
            assert [a.outcome for a in mock.log] == ["pending"]  # the mock hangs
        await wait_all_tasks_blocked()
        assert [a.outcome for a in mock.log] == ["hang"]
        # The upstream connection was closed at once, and it is nobody's failure.
        assert mock.log[0].client_closed_at == 0
        assert sup.health()["o"].consecutive_failures == 0
        assert trio.current_time() == 0
