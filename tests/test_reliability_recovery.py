"""Recovery within seconds: a primary down for 60 s, then healthy, at default health settings.

Through ``open_supervisor`` with real HTTP clients against the mock (``flapping,down=60``), on
MockClock. While it is down the primary is probed at most once per ``probe_interval`` (4 s),
counted at the mock's log, by the actor itself (``probe = "completion"``) or by a caller's
request (``probe = "off"``, passive; ``"models"``, whose model list answers while the model
is down, so the next request decides). After it recovers, the first healthy request goes to it
within 5 s of its recovery.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from relayrace import (
    Category,
    Config,
    EventKind,
    HealthPolicy,
    Policies,
    ProviderConfig,
    ProviderError,
    Request,
    RequestFailed,
    RetryPolicy,
    Route,
    State,
    open_supervisor,
)
from relayrace.actors import AnthropicClient, GeminiClient, OpenAIClient
from relayrace.testing import Answer, Fail, MockAttempt, ScriptedClient, serve_mock_provider

from .reliability import BUDGETS, MESSAGES, live_tasks, open_sockets

DOWN = 60.0
PRIMARY = f"flapping,down={DOWN:g},tag=primary"
BACKUP = "ok,tag=backup"
INTERVAL = HealthPolicy().probe_interval
RECOVERY = 5.0  # the bound: back on the primary within 5 s of its recovery


def make_config(base_url: str, probe: str) -> Config:
    return Config(
        providers=[
            ProviderConfig(
                name=name,
                client=OpenAIClient(base_url=f"{base_url}/v1", max_connections=8, probe=probe),  # type: ignore[arg-type]
                model=model,
                budgets=BUDGETS,
            )
            for name, model in (("primary", PRIMARY), ("backup", BACKUP))
        ],
        routes=[Route(model="chat", chain=["primary", "backup"])],
        policies=Policies(),  # every default: the point of the test
    )


def probing_requests(outage: list[MockAttempt]) -> list[list[MockAttempt]]:
    """The attempts that reached the primary after its first bench ended, grouped by probing
    request: a probe and the retries its request made at once (within a second) are one.

    Asserts that the groups never overlap in time and start at least ``INTERVAL`` apart: a
    provider that stays down is probed at most once per probe interval.
    """
    later = sorted((a for a in outage if a.started_at >= INTERVAL), key=lambda a: a.started_at)
    assert later, "the primary was never probed during the outage"
    groups: list[list[MockAttempt]] = []
    for a in later:
        if groups and a.started_at - groups[-1][0].started_at < 1.0:
            groups[-1].append(a)
        else:
            groups.append([a])
    starts = [g[0].started_at for g in groups]
    print(
        "GROUPS",
        [[(round(a.started_at, 3), a.request.get("max_tokens")) for a in g] for g in groups],
    )
    assert all(b - a >= INTERVAL - 1e-9 for a, b in zip(starts, starts[1:], strict=False))
    assert len(groups) <= DOWN / INTERVAL
    spans = sorted((a.started_at, a.ended_at or 0.0) for a in later)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False))  # one at a time
    return groups


@pytest.mark.parametrize("probe", ["completion", "models", "off"])
async def test_a_60s_outage_under_steady_traffic_recovers_within_5s(
    autojump_clock: trio.abc.Clock, probe: str
) -> None:
    tasks, sockets = live_tasks(), open_sockets()
    served: list[tuple[float, float, str]] = []
    recovered: list[tuple[float, str | None]] = []
    async with serve_mock_provider() as mock:
        async with open_supervisor(make_config(mock.base_url, probe)) as sup:
            mock.reset()  # the outage starts now

            async def watch() -> None:
                async with sup.subscribe() as events:
                    async for event in events:
                        if event.kind is EventKind.ACTOR_RECOVERED and event.actor == "primary":
                            recovered.append((event.time, event.detail))

            async def client(tick: float) -> None:
                # Steady traffic: together, a request every half second.
                while tick < DOWN + 15.0:
                    await trio.sleep_until(tick)
                    start = trio.current_time()
                    reply = await sup.complete(Request("chat", MESSAGES))  # never fails
                    served.append((start, trio.current_time(), reply.provider))
                    while tick <= trio.current_time():
                        tick += 1.0

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as clients:
                    for tick in (0.0, 0.5):
                        clients.start_soon(client, tick)
                nursery.cancel_scope.cancel()
            assert sup.health()["primary"].state is State.OK
        await trio.testing.wait_all_tasks_blocked()
        primary = mock.attempts(PRIMARY)
    assert live_tasks() == tasks and open_sockets() == sockets

    outage = [a for a in primary if a.started_at < DOWN]
    assert outage and all(a.status == 503 for a in outage)
    groups = probing_requests(outage)
    assert len(groups) >= DOWN / (INTERVAL + 1.0) - 1  # it kept being probed
    # A caller's request that is the probe may be retried once (retry.max_attempts = 2, and a
    # retry goes to the actor the policy chose whatever its health); the actor's own probe is
    # never retried: after the first bench, one attempt per interval.
    assert all(len(g) <= 2 for g in groups)
    if probe == "completion":
        assert all(len(g) == 1 for g in groups[1:])
    # Back on the primary within 5 s of its recovery, and every request after on it.
    first_on_primary = min(start for start, _, provider in served if provider == "primary")
    assert DOWN <= first_on_primary <= DOWN + RECOVERY
    assert all(p == "primary" for start, _, p in served if start > first_on_primary)
    assert all(p == "backup" for start, _, p in served if start < DOWN)
    # Who saw it recover: the actor's own probe (completion), or the request that probed it.
    ((at, detail),) = recovered
    assert DOWN <= at <= DOWN + RECOVERY
    assert detail == ("probe" if probe == "completion" else None)


async def test_with_no_traffic_an_active_probe_brings_the_primary_back_within_5s(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serve_mock_provider() as mock:
        async with open_supervisor(make_config(mock.base_url, "completion")) as sup:
            mock.reset()
            # One burst of requests benches the primary; then nobody calls for the whole outage.
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(sup.complete, Request("chat", MESSAGES))
            assert sup.health()["primary"].state is State.BENCHED
            await trio.sleep_until(DOWN + RECOVERY)
            # The actor probed it on its own and found it healthy: no caller had to.
            snap = sup.health()["primary"]
            assert snap.state is State.OK and snap.bench_count == 0
            reply = await sup.complete(Request("chat", MESSAGES))
            assert reply.provider == "primary" and not reply.attempts[0].probe
        primary = mock.attempts(PRIMARY)
    outage = [a for a in primary if a.started_at < DOWN]
    groups = probing_requests(outage)
    # The actor's own one-token completions, not streamed, exactly one every interval.
    assert [len(g) for g in groups] == [1] * int(DOWN / INTERVAL - 1)
    assert all(not g[0].stream and g[0].request["max_tokens"] == 1 for g in groups)
    healed = [a for a in primary if a.outcome == "ok"][0]
    assert DOWN <= healed.started_at <= DOWN + RECOVERY
    assert healed.request["max_tokens"] == 1  # the probe, not a caller, saw it first


async def test_without_a_probe_method_the_next_request_is_the_probe(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``ScriptedClient`` has no ``probe``: passive probing, as before, at the capped curve."""
    script = [Fail(category=Category.PROVIDER_5XX, status=503)] * 6 + [Answer()]
    primary = ScriptedClient(script)
    cfg = Config(
        providers=[
            ProviderConfig(name="primary", client=primary),
            ProviderConfig(name="backup", client=ScriptedClient()),
        ],
        routes=[Route(model="chat", chain=["primary", "backup"])],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )
    async with open_supervisor(cfg) as sup:
        providers = []
        for _ in range(30):
            providers.append((await sup.complete(Request("chat", MESSAGES))).provider)
            await trio.sleep(1.0)
    starts = [c.started_at for c in primary.calls]
    # Three failures bench it (at 2 s, for 5 s); then the request after each bench is the
    # probe, every 4 s (probe_interval); the sixth call fails, the seventh (at 19 s) answers
    # and the primary serves from then on.
    assert starts[:8] == [0.0, 1.0, 2.0, 7.0, 11.0, 15.0, 19.0, 20.0]
    assert providers[19:] == ["primary"] * 11
    assert set(providers[:19]) == {"backup"}


# --- no start-up cost on the request path ------------------------------------------------------


class CountingClient(OpenAIClient):
    """An ``OpenAIClient`` that notes each connection pool it builds (through ``open``, the one
    place a client builds its ``httpx`` client and, the first time, its TLS context), and
    whether the supervisor had started by then."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.started = False
        self.built: list[str] = []

    def open(self) -> None:
        before = self.http_client
        super().open()
        if self.http_client is not before:
            self.built.append("request path" if self.started else "start")


async def test_every_client_is_built_when_the_supervisor_starts_not_on_a_first_request(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serve_mock_provider() as mock:
        streamer = CountingClient(base_url=f"{mock.base_url}/v1")
        # Never used until the stream below is in flight; https: its TLS context loads the CA
        # bundle (~20-100 ms of synchronous work, which would freeze every task).
        fresh = CountingClient(base_url=mock.base_url.replace("http://", "https://") + "/v1")
        plain = CountingClient(base_url=f"{mock.base_url}/v1")
        cfg = Config(
            providers=[
                ProviderConfig(name="streamer", client=streamer, model="ok,chunks=20,delay=0.01"),
                ProviderConfig(name="fresh", client=fresh, model="ok"),
                ProviderConfig(name="plain", client=plain, model="ok"),
            ],
            routes=[
                Route(model="chat", chain=["streamer"]),
                Route(model="cold", chain=["fresh"]),
                Route(model="plain", chain=["plain"]),
            ],
            policies=Policies(retry=RetryPolicy(max_attempts=1)),
        )
        clients = (streamer, fresh, plain)
        assert all(c.http_client is None for c in clients)
        async with open_supervisor(cfg) as sup:
            assert all(c.http_client is not None for c in clients)
            for c in clients:
                c.started = True
            texts = []
            async with sup.stream(Request("chat", MESSAGES)) as s:
                async for delta in s:
                    texts.append(delta.text)
                    if len(texts) == 5:  # mid-stream: the two never-used providers' first calls
                        with pytest.raises(RequestFailed):
                            await sup.complete(Request("cold", MESSAGES))  # TLS to an http port
                        assert (await sup.complete(Request("plain", MESSAGES))).provider == "plain"
            assert len(texts) == 20
        assert all(c.http_client is None for c in clients)  # closed with the supervisor
    assert [c.built for c in clients] == [["start"]] * 3


# --- what each client's probe sends -------------------------------------------------------------


def recording(status: int, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "down", "type": "server"}})
        if request.method == "POST":
            return httpx.Response(200, json=OPENAI_ANSWER)
        return httpx.Response(200, json={"data": []})

    return httpx.MockTransport(handle)


HTTPClient = OpenAIClient | AnthropicClient | GeminiClient

OPENAI_ANSWER = {
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "p"}, "finish_reason": "length"}
    ],
}
KEY = "sk-probe-0123456789abcdef"


@pytest.mark.parametrize(
    ("cls", "base_url", "model", "url"),
    [
        (OpenAIClient, "https://api.example/v1", "gpt", "https://api.example/v1/models?v=1"),
        (AnthropicClient, "https://api.example", "claude", "https://api.example/v1/models?v=1"),
        (
            GeminiClient,
            "https://api.example",
            "models/gemini-x",
            "https://api.example/v1beta/models/gemini-x?v=1",
        ),
        (GeminiClient, "https://api.example", None, "https://api.example/v1beta/models?v=1"),
    ],
)
async def test_a_models_probe_gets_the_model_list_with_the_key_and_proves_only_reachability(
    cls: type[HTTPClient], base_url: str, model: str | None, url: str
) -> None:
    seen: list[httpx.Request] = []
    client = cls(base_url=base_url, api_key=KEY, query={"v": "1"}, transport=recording(200, seen))
    assert client.probes(model)
    assert await client.probe(model=model, actor="a") is False  # reachable, not proven
    ((request,),) = [seen]
    assert (request.method, str(request.url)) == ("GET", url)
    assert KEY in " ".join(request.headers.values())
    await client.aclose()


async def test_a_failed_probe_is_a_classified_provider_error_without_the_key() -> None:
    seen: list[httpx.Request] = []
    client = OpenAIClient(
        base_url="https://api.example/v1", api_key=KEY, transport=recording(503, seen)
    )
    with pytest.raises(ProviderError) as info:
        await client.probe(model="gpt", actor="a")
    assert info.value.failure.category is Category.PROVIDER_5XX
    assert info.value.failure.provider == "a"
    assert KEY not in str(info.value.failure)
    await client.aclose()


async def test_a_completion_probe_asks_the_model_for_one_token_and_proves_the_deployment() -> None:
    seen: list[httpx.Request] = []
    client = OpenAIClient(
        base_url="https://api.example/v1", probe="completion", transport=recording(200, seen)
    )
    assert client.probes("gpt") and not client.probes(None)  # passed through: no model to ask
    assert await client.probe(model="gpt", actor="a") is True
    ((request,),) = [seen]
    assert str(request.url) == "https://api.example/v1/chat/completions"
    body = json.loads(request.content)
    assert (body["model"], body["max_tokens"], body.get("stream", False)) == ("gpt", 1, False)
    assert await client.probe(model=None, actor="a") is None and len(seen) == 1
    await client.aclose()


async def test_probe_off_sends_nothing() -> None:
    seen: list[httpx.Request] = []
    client = OpenAIClient(
        base_url="https://api.example/v1", probe="off", transport=recording(200, seen)
    )
    assert not client.probes("gpt")
    assert await client.probe(model="gpt", actor="a") is None
    assert seen == []
    await client.aclose()


# --- an active probe that hangs or crashes --------------------------------------------------------


class ProbingScript(ScriptedClient):
    """A scripted client with an active probe that does what ``probe_step`` says."""

    def __init__(self, script: list[Any], probe_step: str) -> None:
        super().__init__(script)
        self.probe_step = probe_step
        self.probed_at: list[float] = []

    def probes(self, model: str | None) -> bool:
        return True

    async def probe(self, *, model: str | None, actor: str) -> bool | None:
        self.probed_at.append(trio.current_time())
        if self.probe_step == "hang":
            await trio.sleep_forever()
        if self.probe_step == "crash" and len(self.probed_at) == 1:
            raise RuntimeError("a bug in the probe")
        return True


def probing_config(primary: ScriptedClient) -> Config:
    return Config(
        providers=[
            ProviderConfig(name="primary", client=primary),
            ProviderConfig(name="backup", client=ScriptedClient()),
        ],
        routes=[Route(model="chat", chain=["primary", "backup"])],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
    )


async def test_a_hanging_active_probe_is_cut_at_probe_timeout_and_rebenches(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ProbingScript([Fail(category=Category.PROVIDER_5XX, status=503)], "hang")
    async with open_supervisor(probing_config(primary)) as sup:
        for _ in range(3):
            await sup.complete(Request("chat", MESSAGES))  # benched at 0 until 5
        await trio.sleep(6.0)
        # The probe is in flight: requests go around it, not into it.
        assert sup.health()["primary"].probe_in_flight
        assert (await sup.complete(Request("chat", MESSAGES))).provider == "backup"
        await trio.sleep_until(15.5)  # cut at 5 + probe_timeout (10 s); benched for 4 s more
        snap = sup.health()["primary"]
        assert snap.state is State.BENCHED and snap.benched_until == 19.0
        assert not snap.probe_in_flight
        await trio.sleep_until(20.0)
    assert primary.probed_at == [5.0, 19.0]
    assert len(primary.calls) == 3  # no caller reached it


async def test_an_active_probe_that_crashes_restarts_the_actor_and_leaves_no_probe_marked(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ProbingScript(
        [Fail(category=Category.PROVIDER_5XX, status=503)] * 3 + [Answer()], "crash"
    )
    async with open_supervisor(probing_config(primary)) as sup:
        async with sup.subscribe() as events:
            for _ in range(3):
                await sup.complete(Request("chat", MESSAGES))
            await trio.sleep(6.0)
            while events.receive_nowait().kind is not EventKind.ACTOR_RESTARTED:
                pass  # (receive_nowait raises if the actor was never restarted)
        snap = sup.health()["primary"]
        assert snap.state is State.PROBING and not snap.probe_in_flight
        # The next request is the probe, passively, and the primary answers it.
        reply = await sup.complete(Request("chat", MESSAGES))
        assert reply.provider == "primary" and reply.attempts[0].probe
        assert sup.health()["primary"].state is State.OK
    assert primary.probed_at == [5.0]
