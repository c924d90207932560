"""The admin API, the probes and the metrics of ``relayrace serve`` (``run_gateway``), over real
HTTP in front of a real mock provider."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from relayrace.testing import serve_mock_provider

from .operating import CHAT, ENV, SECRETS, gateway, gateway_file


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def _providers(answer: httpx.Response) -> dict[str, dict]:
    assert answer.status_code == 200, answer.text
    return {p["name"]: p for p in answer.json()["providers"]}


async def test_bench_through_the_admin_api_and_the_next_request_skips_it(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"a": "ok,chunks=2", "b": "ok,chunks=2"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            first = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert first.headers["x-relayrace-provider"] == "a"

            benched = await gw.admin.post("/admin/providers/a/bench", json={"seconds": 600})
            assert benched.status_code == 200, benched.text
            view = benched.json()["provider"]
            assert view["state"] == "benched" and view["manual"] is True
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", view["benched_until"])

            reply = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200
            assert reply.headers["x-relayrace-provider"] == "b"
            trace = reply.json()["relayrace"]
            assert [a["actor"] for a in trace["attempts"]] == ["b"]
            assert any(d["action"] == "skip" and d["actor"] == "a" for d in trace["decisions"])

            providers = _providers(await gw.admin.get("/admin/providers"))
            assert providers["a"]["state"] == "benched"
            assert providers["b"]["state"] == "ok" and providers["b"]["queued"] == 0

            endless = await gw.admin.post("/admin/providers/b/bench")
            assert endless.json()["provider"]["bench_endless"] is True
            assert (await gw.admin.post("/admin/providers/a/unbench")).status_code == 200
            assert (await gw.admin.post("/admin/providers/b/unbench")).status_code == 200
            again = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert again.headers["x-relayrace-provider"] == "a"

            scrape = await gw.anonymous.get(gw.running.metrics_url)
            assert 'relayrace_admin_actions_total{action="bench"} 2.0' in scrape.text
            assert 'relayrace_admin_actions_total{action="unbench"} 2.0' in scrape.text
    admin_lines = [r.getMessage() for r in caplog.records if r.name == "relayrace.admin"]
    assert "admin: benched provider a for 600s" in admin_lines
    everything = caplog.text + benched.text + first.text
    for secret in SECRETS:
        assert secret not in everything


async def test_admin_errors_name_the_problem(tmp_path) -> None:
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"a": "ok"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            assert (await gw.api.get("/admin/providers")).status_code == 401  # an API token
            assert (await gw.anonymous.get("/admin/providers")).status_code == 401
            unknown = await gw.admin.post("/admin/providers/ghost/bench")
            assert unknown.status_code == 404 and "ghost" in unknown.json()["error"]["message"]
            bad = await gw.admin.post("/admin/providers/a/bench", json={"seconds": -1})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_seconds"
            assert (await gw.admin.get("/admin/providers/a/bench")).status_code == 405
            assert (await gw.admin.get("/admin/nothing")).status_code == 404
            assert (await gw.admin.get("/admin/providers")).json()["providers"][0]["name"] == "a"


async def test_the_admin_api_is_refused_entirely_without_admin_tokens(tmp_path) -> None:
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"a": "ok"}, admin=False)
        async with gateway(tmp_path / "gw.toml", text) as gw:
            for path in ("/admin/providers", "/admin/reload", "/admin/providers/a/bench"):
                assert (await gw.admin.post(path)).status_code == 404
                assert (await gw.api.get(path)).status_code == 404
            assert (await gw.api.get("/healthz")).json()["actors"]["a"]["state"] == "ok"


async def test_readyz_flips_to_503_when_every_provider_is_benched(tmp_path) -> None:
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"a": "ok", "b": "ok"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            assert (await gw.anonymous.get("/livez")).status_code == 200
            ready = await gw.anonymous.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}
            assert (await gw.anonymous.get("/healthz")).status_code == 401  # detailed: a token

            await gw.admin.post("/admin/providers/a/bench")
            assert (await gw.anonymous.get("/readyz")).status_code == 200  # b is left
            await gw.admin.post("/admin/providers/b/bench", json={"seconds": 60})
            down = await gw.anonymous.get("/readyz")
            assert down.status_code == 503
            assert down.json()["reason"].startswith("every provider of every route is benched")
            assert (await gw.anonymous.get("/livez")).status_code == 200
            health = (await gw.api.get("/healthz")).json()
            assert {a["state"] for a in health["actors"].values()} == {"benched"}

            await gw.admin.post("/admin/providers/b/unbench")
            assert (await gw.anonymous.get("/readyz")).status_code == 200


async def test_drain_refuses_new_requests_and_readyz_says_so(tmp_path) -> None:
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"a": "ok"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            drained = await gw.admin.post("/admin/drain")
            assert drained.status_code == 200 and drained.json()["drained"] is True
            down = await gw.anonymous.get("/readyz")
            assert down.status_code == 503 and down.json()["reason"].startswith("draining")
            refused = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503
            assert (await gw.admin.get("/admin/providers")).json()["draining"] is True


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_of_serve_move_by_the_right_labels_after_a_failover(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"broken": "unavailable", "good": "ok,chunks=3"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            assert gw.running.metrics_url is not None
            for _ in range(2):
                reply = await gw.api.post("/v1/chat/completions", json=CHAT)
                assert reply.headers["x-relayrace-provider"] == "good"
            async with gw.api.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
                assert s.status_code == 200
                await s.aread()
            scrape = await gw.anonymous.get(gw.running.metrics_url)
            assert scrape.status_code == 200
            body = scrape.text
            failovers = _sample(
                body,
                "relayrace_decisions_total",
                action="failover",
                provider="broken",
                category="provider_5xx",
                rule="failover.actions.provider_5xx",
            )
            assert failovers == 3
            served = _sample(
                body,
                "gen_ai_server_request_duration_seconds_count",
                route="chat",
                provider="good",
                outcome="ok",
            )
            assert served == 3
            assert _sample(
                body,
                "gen_ai_client_operation_duration_seconds_count",
                provider="broken",
                outcome="failed",
                error_type="provider_5xx",
            ) == 3
            providers = _providers(await gw.admin.get("/admin/providers"))
            assert [f["category"] for f in providers["broken"]["recent_failures"]] == [
                "provider_5xx"
            ] * 3
    access = [r.getMessage() for r in caplog.records if r.name == "relayrace.access"]
    assert len(access) == 3
    assert all('"surface":"http"' in line.replace(" ", "") for line in access)
    starts = [r for r in caplog.records if "serving: websocket" in r.getMessage()]
    assert len(starts) == 1  # the start-up line, once


async def test_a_provider_drain_through_the_admin_api(tmp_path) -> None:
    async with serve_mock_provider() as mock:
        text = gateway_file(mock.base_url, {"a": "ok,chunks=2", "b": "ok,chunks=2"})
        async with gateway(tmp_path / "gw.toml", text) as gw:
            drained = await gw.admin.post("/admin/providers/a/drain?scope=instance")
            assert drained.status_code == 200, drained.text
            view = drained.json()["provider"]
            assert drained.json()["scope"] == "instance"
            assert (view["state"], view["bench_reason"], view["bench_endless"]) == (
                "benched",
                "drained",
                True,
            )
            reply = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert reply.headers["x-relayrace-provider"] == "b"
            health = (await gw.api.get("/healthz")).json()
            assert health["actors"]["a"]["bench_reason"] == "drained"
            scrape = (await gw.anonymous.get(gw.running.metrics_url)).text
            assert 'relayrace_provider_drained{provider="a"} 1.0' in scrape
            assert 'relayrace_provider_drained{provider="b"} 0.0' in scrape
            assert (await gw.admin.get("/admin/providers/a/drain")).status_code == 405
            assert (await gw.admin.post("/admin/providers/zz/drain")).status_code == 404
            assert (await gw.admin.post("/admin/providers/a/unbench")).status_code == 200
            again = await gw.api.post("/v1/chat/completions", json=CHAT)
            assert again.headers["x-relayrace-provider"] == "a"
            scrape = (await gw.anonymous.get(gw.running.metrics_url)).text
            assert 'relayrace_provider_drained{provider="a"} 0.0' in scrape
            assert 'relayrace_admin_actions_total{action="drain_provider"} 1.0' in scrape
