"""Hot reload: ``Supervisor.reload`` in process (on MockClock), ``POST /admin/reload`` and SIGHUP
over real HTTP in front of a real mock provider."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import trio

from relayrace import Config, EventKind, Route, open_supervisor
from relayrace.testing import Answer, Hang

from .operating import CHAT, ENV, SECRETS, gateway, gateway_file
from .support import client, config, request, scripted_provider


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


# --- in process -----------------------------------------------------------------------------------


async def test_reload_keeps_unchanged_actors_and_their_health(autojump_clock) -> None:
    cfg = config(scripted_provider("a", Answer()), scripted_provider("b", Answer()))
    async with open_supervisor(cfg) as sup:
        sup.bench("a", 300)
        new = Config(
            providers=[*cfg.providers, scripted_provider("c", Answer())],
            routes=[Route(model="m", chain=["a", "b", "c"])],
        )
        reloaded = await sup.reload(new)
        assert sorted(reloaded.added) == ["c"] and sorted(reloaded.kept) == ["a", "b"]
        assert reloaded.removed == () and reloaded.replaced == ()
        assert sup.health()["a"].manual  # kept: its health with it
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert list(sup.routes) == ["m"]


async def test_removed_actors_drain_then_close_and_new_requests_use_the_new_config(
    autojump_clock,
) -> None:
    cfg = config(scripted_provider("a", Answer(chunks=5, delay=1.0)), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        events: list[tuple[EventKind, str | None]] = []
        async with trio.open_nursery() as nursery, sup.subscribe() as stream:

            async def listen() -> None:
                async for event in stream:
                    events.append((event.kind, event.detail))

            nursery.start_soon(listen)
            in_flight = []

            async def old_request() -> None:
                in_flight.append(await sup.complete(request()))

            nursery.start_soon(old_request)
            await trio.sleep(1.5)  # a's answer is half sent
            b_only = Config(providers=[cfg.providers[1]], routes=[Route(model="m", chain=["b"])])
            reloaded = await sup.reload(b_only)
            assert reloaded.removed == ("a",) and reloaded.kept == ("b",)
            assert "a" not in sup.health()
            reply = await sup.complete(request())
            assert reply.provider == "b"
            await trio.sleep(10)
            assert [r.provider for r in in_flight] == ["a"]  # finished on the old config
            sup.record_admin("reload")
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        assert (EventKind.ADMIN_ACTION, "reload") in events
        assert client(cfg, "a").calls and len(client(cfg, "a").calls) == 1


async def test_a_changed_provider_is_replaced_with_fresh_health(autojump_clock) -> None:
    cfg = config(scripted_provider("a", Hang()), scripted_provider("b"))
    async with open_supervisor(cfg) as sup:
        sup.bench("a", 300)
        changed = Config(
            providers=[scripted_provider("a", Answer(), max_concurrency=2), cfg.providers[1]],
            routes=[Route(model="m", chain=["a", "b"])],
        )
        reloaded = await sup.reload(changed)
        assert reloaded.replaced == ("a",)
        assert not sup.health()["a"].manual
        assert (await sup.complete(request())).provider == "a"


async def test_reload_of_a_draining_supervisor_is_refused(autojump_clock) -> None:
    cfg = config(scripted_provider("a"))
    async with open_supervisor(cfg) as sup:
        await sup.drain()
        with pytest.raises(RuntimeError, match="draining"):
            await sup.reload(cfg)


# --- over HTTP ------------------------------------------------------------------------------------


async def test_reload_adds_a_provider_while_50_streams_are_in_flight(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve_mock() as mock:
        slow = "ok,chunks=8,delay=0.05"
        text = gateway_file(mock.base_url, {"a": slow})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            started = trio.Semaphore(0)
            texts: list[str] = []

            async def one_stream() -> None:
                body = {**CHAT, "stream": True}
                async with gw.api.stream("POST", "/v1/chat/completions", json=body) as s:
                    assert s.status_code == 200
                    parts = []
                    first = True
                    async for line in s.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line.removeprefix("data: "))
                            for choice in chunk.get("choices", []):
                                parts.append(choice["delta"].get("content") or "")
                            if first:
                                first = False
                                started.release()
                    assert line == "" or line == "data: [DONE]"
                    texts.append("".join(parts))

            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(one_stream)
                for _ in range(50):
                    await started.acquire()  # every stream has its first delta
                await trio.Path(gw.path).write_text(
                    gateway_file(mock.base_url, {"a": slow, "fresh": "ok,chunks=2"})
                )
                answer = await gw.admin.post("/admin/reload")
            assert answer.status_code == 200, answer.text
            assert answer.json()["added"] == ["fresh"] and answer.json()["kept"] == ["a"]
            assert answer.json()["restart_needed"] == []
            assert len(texts) == 50 and len(set(texts)) == 1 and texts[0]  # all complete
            providers = (await gw.admin.get("/admin/providers")).json()
            assert [p["name"] for p in providers["providers"]] == ["a", "fresh"]
            assert providers["routes"] == {"chat": ["a", "fresh"]}
            await gw.admin.post("/admin/providers/a/bench")
            reply = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert reply.headers["x-relayrace-provider"] == "fresh"
    for secret in SECRETS:
        assert secret not in caplog.text and secret not in answer.text


async def test_a_broken_reload_changes_nothing_and_names_the_key(tmp_path) -> None:
    async with serve_mock() as mock:
        text = gateway_file(mock.base_url, {"a": "ok", "b": "ok"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            await gw.admin.post("/admin/providers/a/bench")
            broken = gateway_file(
                mock.base_url,
                {"a": "ok", "b": "ok", "c": "ok"},
                extra={"b": "max_concurrency = 0", "c": "colour = 1"},
            ).replace('http_port = 0', 'http_port = 1')
            await trio.Path(gw.path).write_text(broken)
            answer = await gw.admin.post("/admin/reload")
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert error["code"] == "invalid_config"
            problems = error["problems"]
            assert any(p.startswith("providers[1].max_concurrency") for p in problems), problems
            assert any("providers[2].colour" in p for p in problems), problems
            providers = (await gw.admin.get("/admin/providers")).json()
            assert [p["name"] for p in providers["providers"]] == ["a", "b"]
            assert providers["providers"][0]["state"] == "benched"

            # A good file whose [server] differs: swapped in, the listener settings reported.
            good = gateway_file(mock.base_url, {"b": "ok"}).replace(
                "shutdown_grace = 5", "shutdown_grace = 7"
            )
            await trio.Path(gw.path).write_text(good)
            answer = await gw.admin.post("/admin/reload")
            assert answer.status_code == 200, answer.text
            assert answer.json()["removed"] == ["a"]
            assert answer.json()["restart_needed"] == ["shutdown_grace"]
            scrape = await gw.anonymous.get(gw.running.metrics_url)
            assert 'relayrace_admin_actions_total{action="reload_refused"} 1.0' in scrape.text
            assert 'relayrace_admin_actions_total{action="reload"} 1.0' in scrape.text


async def test_a_command_line_override_is_not_reported_as_a_change(tmp_path) -> None:
    async with serve_mock() as mock:
        text = gateway_file(mock.base_url, {"a": "ok"})
        async with gateway(tmp_path / "gw.toml", text, {"log_format": "text"}) as gw:
            answer = await gw.admin.post("/admin/reload")
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "added": [],
                "removed": [],
                "replaced": [],
                "kept": ["a"],
                "restart_needed": [],
            }
            await trio.Path(gw.path).write_text(text + '\n[policies.stream]\nkeep_text = 10\n')
            answer = await gw.admin.post("/admin/reload")
            assert answer.json()["kept"] == ["a"]  # a stream policy keeps the actors


async def test_sighup_reloads_the_file(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with serve_mock() as mock:
        text = gateway_file(mock.base_url, {"a": "ok"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            sup = gw.running.sup
            async with sup.subscribe() as events:
                actions = []
                for content in (gateway_file(mock.base_url, {"b": "ok"}), "[[providers]]\nname = 1\n"):
                    await trio.Path(gw.path).write_text(content)
                    os.kill(os.getpid(), signal.SIGHUP)
                    with trio.fail_after(10):
                        async for event in events:
                            if event.kind is EventKind.ADMIN_ACTION:
                                actions.append(event.detail)
                                break
                    if len(actions) == 1:
                        reply = await gw.api.post("/v1/chat/completions", json=CHAT)
                        assert reply.headers["x-relayrace-provider"] == "b"
            assert actions == ["reload", "reload_refused"]
            assert list(sup.health()) == ["b"]
    assert "reload refused, nothing changed" in caplog.text
    assert "providers[0].name: expected a non-empty string" in caplog.text


def serve_mock():  # type: ignore[no-untyped-def]
    from relayrace.testing import serve_mock_provider

    return serve_mock_provider()
