"""The built-in demos; no network beyond loopback, no API keys.

``run_gateway_demo`` (``relayrace demo``): mock providers (one flapping, one rate-limited, one
healthy) behind a real HTTP server, the gateway serving them, and a stream of requests over its
websocket endpoint, narrated (``_narration``): a legend of the providers and their faults, who
answered each request and why not the ones before it, the benches and recoveries as they
happen, and a summary that counts requests apart from attempts.

``run_demo`` (``relayrace demo --in-process``): a supervisor over scripted providers, scene by
scene: the provider that served, the text, and every decision with the rule that made it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

import trio

from ._config import Budgets, Config, ProviderConfig, Route
from ._errors import BadRequest
from ._failure import Category
from ._narration import DemoProvider, Narrator, demo_providers, legend
from ._policy import HealthPolicy, MidStream, Policies, RetryPolicy, StreamPolicy
from ._values import Reply, Request
from .supervisor import Supervisor, open_supervisor
from .testing import Answer, Fail, Hang, ScriptedClient

PROMPT = [{"role": "user", "content": "Say something about foxes."}]


def demo_config(*, first_token: float = 1.0) -> Config:
    """Three scripted providers behind one route ``chat``: an overloaded primary, a silent
    secondary (abandoned at its ``first_token`` budget) and a healthy backup; and a route ``cut``
    whose first provider cuts its stream."""
    return Config(
        providers=[
            ProviderConfig(
                name="primary",
                client=ScriptedClient(
                    [Fail(category=Category.OVERLOADED, status=503, message="overloaded")]
                ),
                priority=0,
            ),
            ProviderConfig(
                name="silent",
                client=ScriptedClient([Hang()]),
                priority=1,
                budgets=Budgets(first_token=first_token),
            ),
            ProviderConfig(
                name="backup", client=ScriptedClient([Answer(chunks=6, delay=0.02)]), priority=2
            ),
            ProviderConfig(
                name="cutter",
                client=ScriptedClient(
                    [Fail(category=Category.STREAM_ERROR, code="stream_cut", after_chunks=3)]
                ),
            ),
        ],
        routes=[
            Route(model="chat", chain=["primary", "silent", "backup"]),
            Route(model="cut", chain=["cutter", "backup"]),
        ],
        policies=Policies(
            retry=RetryPolicy(max_attempts=1), stream=StreamPolicy(mid_stream=MidStream.RESTART)
        ),
    )


def _show(reply: Reply, out: Callable[[str], None]) -> None:
    out(f"  served by {reply.provider} (model {reply.model}): {reply.text!r}")
    for attempt in reply.attempts:
        failure = f" — {attempt.failure.category.value}" if attempt.failure else ""
        out(f"  attempt on {attempt.actor}: {attempt.outcome.value}{failure}")
    for decision in reply.decisions:
        out(f"  decision: {decision.action.value} ({decision.reason}) by rule {decision.rule}")


async def run_demo(out: Callable[[str], None] = print, *, first_token: float = 1.0) -> None:
    """Play the demo scenes, writing lines through ``out``.

    Args:
        out: where lines go.
        first_token: the time-to-first-token budget of the silent provider, in seconds.
    """
    async with open_supervisor(demo_config(first_token=first_token)) as sup:
        await _scene_failover(sup, out)
        await _scene_stream(sup, out)
        await _scene_bad(sup, out)
        out("health:")
        for name, snap in sup.health().items():
            out(f"  {name}: {snap.state.value}, {snap.consecutive_failures} failure(s) in a row")


async def _scene_failover(sup: Supervisor, out: Callable[[str], None]) -> None:
    out("1. complete() on route 'chat': primary is overloaded, silent never answers")
    reply = await sup.complete(Request("chat", PROMPT))
    _show(reply, out)


async def _scene_stream(sup: Supervisor, out: Callable[[str], None]) -> None:
    out("2. stream() on route 'cut': cutter drops its stream after 3 chunks (mid_stream=restart)")
    async with sup.stream(Request("cut", PROMPT)) as stream:
        pieces = [delta.text async for delta in stream]
    out(f"  deltas received, none twice: {pieces}")
    assert stream.reply is not None
    _show(stream.reply, out)


async def _scene_bad(sup: Supervisor, out: Callable[[str], None]) -> None:
    out("3. a route nobody serves")
    try:
        await sup.complete(Request("no-such-route", PROMPT))
    except BadRequest as exc:
        out(f"  BadRequest, before any provider was called: {exc}")


# --- the gateway demo -------------------------------------------------------------------------

DEMO_HEALTH = HealthPolicy(failure_threshold=2, cooldown_base=1.0)


def gateway_config(mock_url: str, providers: tuple[DemoProvider, ...], *, seed: int) -> Config:
    """The demo's providers: OpenAI-format clients pointed at the mock provider, one route
    ``chat`` trying them in order."""
    from .actors import OpenAIClient

    return Config(
        providers=[
            ProviderConfig(
                name=p.name,
                client=OpenAIClient(base_url=f"{mock_url}/v1", max_connections=16),
                model=p.scenario,
                priority=i,
                budgets=Budgets(first_token=2.0, idle=2.0),
            )
            for i, p in enumerate(providers)
        ],
        routes=[Route(model="chat", chain=[p.name for p in providers])],
        policies=Policies(retry=RetryPolicy(max_attempts=1), health=DEMO_HEALTH),
        seed=seed,
    )


async def run_gateway_demo(
    out: Callable[[str], None] = print, *, requests: int = 40, gap: float = 0.15, seed: int = 0
) -> Narrator:
    """Play the gateway demo; return its narrator (what it counted).

    Args:
        out: where lines go.
        requests: how many requests to send.
        gap: seconds between two requests (they overlap).
        seed: picks the timing of the mock providers' faults and seeds the supervisor.
    """
    import json

    from trio_websocket import open_websocket_url

    from .server import ServerSettings, serve
    from .testing import serve_mock_provider

    providers = demo_providers(seed, DEMO_HEALTH)
    narrator = Narrator(providers)
    for line in legend(providers, seed=seed, requests=requests, gap=gap):
        out(line)
    async with serve_mock_provider() as mock:
        config = gateway_config(mock.base_url, providers, seed=seed)
        async with open_supervisor(config) as sup, trio.open_nursery() as nursery:
            server = await nursery.start(serve, sup, ServerSettings(ws_port=0, http_port=0))
            watching = trio.CancelScope()
            nursery.start_soon(_watch_health, sup, out, narrator, watching)
            assert server.ws_url is not None
            async with open_websocket_url(server.ws_url) as ws:
                pending: dict[str, float] = {}
                async with trio.open_nursery() as traffic:

                    async def send_all() -> None:
                        for n in range(1, requests + 1):
                            rid = f"r{n:02d}"
                            pending[rid] = trio.current_time()
                            request = {"type": "request", "id": rid, "model": "chat"}
                            await ws.send_message(json.dumps({**request, "messages": PROMPT}))
                            await trio.sleep(gap)

                    traffic.start_soon(send_all)
                    done = 0
                    while done < requests:
                        frame = json.loads(await ws.get_message())
                        if frame["type"] not in ("done", "error"):
                            continue
                        done += 1
                        took = (trio.current_time() - pending.pop(frame["id"])) * 1000
                        out(narrator.request_line(frame, took))
            health, now = sup.health(), trio.current_time()
            server.shutdown()
            watching.cancel()
    out("")
    for line in narrator.summary(health, now):
        out(line)
    return narrator


async def _watch_health(
    sup: Supervisor, out: Callable[[str], None], narrator: Narrator, scope: trio.CancelScope
) -> None:
    with scope:
        async with sup.subscribe() as events:
            async for event in events:
                line = narrator.event_line(event)
                if line is not None:
                    out(line)


def main(in_process: bool = False, requests: int = 40, seed: int | None = None) -> None:
    """Run a demo (``relayrace demo``); without ``seed``, a random one (printed)."""
    if in_process:
        trio.run(run_demo)
    else:
        if seed is None:
            seed = random.randrange(1000)
        trio.run(partial(run_gateway_demo, requests=requests, seed=seed))
