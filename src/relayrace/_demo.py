"""The built-in demo: a supervisor over scripted providers, showing failover as it happens.

Runs in-process with no network and no API keys. Each scene prints what the caller saw: the
provider that served, the text, and every decision with the rule that made it.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ._config import Budgets, Config, ProviderConfig, Route
from ._errors import BadRequest
from ._failure import Category
from ._policy import MidStream, Policies, RetryPolicy, StreamPolicy
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


def main() -> None:
    trio.run(run_demo)
