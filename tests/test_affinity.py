"""Prompt-cache affinity: a key keeps to the deployment that served it last (a soft pin that
yields to a bench, a rate limit or a full inbox, then re-pins), through a real supervisor with
scripted providers on the MockClock, and over HTTP (the ``x-session-id`` header)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from relayrace import Action, Config, ConfigError, Request, Route, load_config
from relayrace import open_supervisor as open_sup
from relayrace.server import ServerSettings, serve
from relayrace.testing import Answer, Hang

from .support import client, scripted_provider

PIN = "config:route.affinity=user"


def config(*names: str, affinity: str | None = "user", ttl: float = 300.0, **kw: Any) -> Config:
    """Route ``m`` over ``names``, round robin (without a pin, requests rotate)."""
    return Config(
        providers=[scripted_provider(n, **kw.get(n, {})) for n in names],
        routes=[
            Route(
                model="m",
                chain=list(names),
                strategy="round_robin",
                affinity=affinity,
                affinity_ttl=ttl,
            )
        ],
    )


def ask(user: str | None = None, *, text: str = "hi", **metadata: Any) -> Request:
    params = {"user": user} if user is not None else {}
    return Request("m", [{"role": "user", "content": text}], params=params, metadata=metadata)


def rules(reply: Any) -> list[tuple[str, str | None, str]]:
    return [(d.action.value, d.actor, str(d.rule)) for d in reply.decisions]


async def test_without_affinity_round_robin_rotates(autojump_clock):
    # The control: the same user is spread over the providers when the route has no affinity.
    async with open_sup(config("a", "b", "c", affinity=None)) as sup:
        served = {(await sup.complete(ask("u1"))).provider for _ in range(3)}
    assert served == {"a", "b", "c"}


async def test_a_user_keeps_to_one_deployment_across_requests(autojump_clock):
    cfg = config("a", "b", "c")
    async with open_sup(cfg) as sup:
        first = await sup.complete(ask("u1"))
        assert first.decisions == ()  # nothing pinned yet
        served = [(await sup.complete(ask("u1"))).provider for _ in range(5)]
        assert served == [first.provider] * 5
        again = await sup.complete(ask("u1"))
        assert rules(again) == [("prefer", first.provider, PIN)]
        # Another user rotates on its own and gets its own pin.
        other = [(await sup.complete(ask("u2"))).provider for _ in range(3)]
        assert len(set(other)) == 1
    calls = sum(len(client(cfg, n).calls) for n in "abc")
    assert calls == 1 + 5 + 1 + 3


async def test_pin_breaks_on_a_bench_and_re_pins_to_whoever_serves(autojump_clock):
    cfg = config("a", "b")
    async with open_sup(cfg) as sup:
        pinned = (await sup.complete(ask("u1"))).provider
        other = "b" if pinned == "a" else "a"
        sup.bench(pinned, 30)
        moved = await sup.complete(ask("u1"))
        assert moved.provider == other
        assert ("skip", pinned, PIN) in rules(moved)
        assert any("yields: benched" in d.reason for d in moved.decisions)
        sup.unbench(pinned)
        # Re-pinned to the one that served: it stays there though the first is back.
        for _ in range(3):
            reply = await sup.complete(ask("u1"))
            assert reply.provider == other
            assert rules(reply) == [("prefer", other, PIN)]


async def test_pin_yields_to_a_full_inbox(autojump_clock):
    cfg = Config(
        providers=[
            scripted_provider("a", Answer(), Hang(), max_concurrency=1, inbox_size=0),
            scripted_provider("b"),
        ],
        routes=[Route(model="m", chain=["a", "b"], affinity="user")],
    )
    async with open_sup(cfg) as sup:
        assert (await sup.complete(ask("u1"))).provider == "a"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.complete, ask("someone else"))  # takes a's only slot: hangs
            await trio.sleep(1)
            reply = await sup.complete(ask("u1"))
            assert reply.provider == "b"
            assert ("skip", "a", PIN) in rules(reply)
            assert any("inbox is full" in d.reason for d in reply.decisions)
            nursery.cancel_scope.cancel()


async def test_pin_ends_with_its_ttl(autojump_clock):
    async with open_sup(config("a", "b", "c", ttl=10.0)) as sup:
        first = (await sup.complete(ask("u1"))).provider
        await trio.sleep(5)
        assert (await sup.complete(ask("u1"))).provider == first  # used: 10 s more
        await trio.sleep(11)
        reply = await sup.complete(ask("u1"))
        assert not any(d.action is Action.PREFER for d in reply.decisions)


async def test_header_and_prefix_keys(autojump_clock):
    cfg = Config(
        providers=[scripted_provider(n) for n in "abc"],
        routes=[
            Route(model="m", chain=list("abc"), strategy="round_robin", affinity="header:x-session-id"),
            Route(model="p", chain=list("abc"), strategy="round_robin", affinity="prefix"),
        ],
    )
    system = {"role": "system", "content": "You are a careful assistant. " * 10}
    async with open_sup(cfg) as sup:
        served = {
            (await sup.complete(ask(headers={"x-session-id": "s1"}))).provider for _ in range(4)
        }
        assert len(served) == 1
        # prefix: the same system prompt and first user message, later turns differing.
        turns = [
            Request("p", [system, {"role": "user", "content": "q"}, *extra])
            for extra in ([], [{"role": "assistant", "content": "a"}], [{"role": "user", "content": "z"}])
        ]
        assert len({(await sup.complete(r)).provider for r in turns}) == 1
        # A request without a key is routed as usual (no pin decision).
        plain = await sup.complete(ask())
        assert plain.decisions == ()


def test_affinity_is_validated_and_read_from_toml():
    with pytest.raises(ConfigError, match="affinity"):
        config("a", affinity="cookie")
    with pytest.raises(ConfigError, match="affinity_ttl"):
        config("a", ttl=0)
    cfg = load_config(
        {
            "providers": [{"name": "a", "kind": "scripted"}],
            "routes": [{"model": "m", "chain": ["a"], "affinity": "header:x-session-id"}],
        }
    )
    assert cfg.routes[0].affinity == "header:x-session-id"
    assert cfg.routes[0].affinity_ttl == 300.0


async def test_session_header_pins_over_http(autojump_clock):
    cfg = Config(
        providers=[scripted_provider(n) for n in "abc"],
        routes=[
            Route(model="m", chain=list("abc"), strategy="round_robin", affinity="header:x-session-id")
        ],
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    served = []
    async with open_sup(cfg) as sup, trio.open_nursery() as nursery:
        settings = ServerSettings(http_port=0, ws_port=None, tokens=["t0ken"])
        server = await nursery.start(serve, sup, settings)
        headers = {"authorization": "Bearer t0ken"}
        async with httpx.AsyncClient(base_url=server.http_url, timeout=None, headers=headers) as http:
            for session in ("s1", "s1", "s1", "s1", None):
                extra = {"x-session-id": session} if session else {}
                response = await http.post("/v1/chat/completions", json=body, headers=extra)
                assert response.status_code == 200, response.text
                served.append(response.headers["x-relayrace-provider"])
        nursery.cancel_scope.cancel()
    assert len(set(served[:4])) == 1
    assert served[4] != served[0]  # no session: round robin moves on
