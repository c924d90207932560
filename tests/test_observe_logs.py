"""The access log, the health log, OpenTelemetry traces and the events' wall-clock times."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import subprocess
import sys

import pytest
import trio

from relayrace import (
    Category,
    Config,
    ProviderConfig,
    Request,
    RequestFailed,
    Route,
    open_supervisor,
)
from relayrace.actors import OpenAIClient
from relayrace.observe import AccessLog, Tracing
from relayrace.testing import Answer, Crash, Fail, ScriptedClient

from .hostile_upstream import open_hostile_upstream

MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-hostile-0123456789abcdefXYZ"


def failover_config() -> Config:
    return Config(
        providers=[
            ProviderConfig(
                name="a",
                client=ScriptedClient([Fail(category=Category.PROVIDER_5XX, status=503)] * 10),
            ),
            ProviderConfig(name="b", client=ScriptedClient([Answer(chunks=3)] * 10)),
        ],
        routes=[Route(model="chat", chain=["a", "b"])],
        seed=3,
    )


async def test_one_json_access_line_per_request_with_the_story(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayrace")
    async with open_supervisor(failover_config(), observers=[AccessLog("json")]) as sup:
        reply = await sup.complete(Request("chat", MESSAGES), surface="http")
    lines = [r for r in caplog.records if r.name == "relayrace.access"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    record = json.loads(lines[0].getMessage())
    assert record["request_id"] == reply.request_id
    assert record["surface"] == "http" and record["route"] == "chat"
    assert record["provider"] == "b" and record["outcome"] == "ok"
    assert [a["provider"] for a in record["attempts"]] == [a.actor for a in reply.attempts]
    assert record["rules"] == list(dict.fromkeys(str(d.rule) for d in reply.decisions))
    assert record["first_token"] is not None
    # Wall-clock ISO 8601 UTC, today.
    when = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
    assert abs(when - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)


async def test_text_access_lines_and_health_lines_as_they_happen(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayrace")
    async with open_supervisor(failover_config(), observers=[AccessLog("text")]) as sup:
        for _ in range(6):
            await sup.complete(Request("chat", MESSAGES))
        sup.unbench("a")
    access = [r.getMessage() for r in caplog.records if r.name == "relayrace.access"]
    health = [r for r in caplog.records if r.name == "relayrace.health"]
    assert len(access) == 6 and all(" ok by b " in line for line in access)
    assert all("\n" not in line for line in access)
    benched = [r for r in health if " benched " in r.getMessage()]
    assert benched and benched[0].levelno == logging.WARNING
    assert "provider a benched for" in benched[0].getMessage()
    assert "provider_5xx/503" in benched[0].getMessage()
    assert any("provider a recovered" in r.getMessage() for r in health)


async def test_restarts_and_give_ups_are_logged(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayrace.health")
    cfg = Config(
        providers=[
            ProviderConfig(name="a", client=ScriptedClient([Crash()] * 20)),
            ProviderConfig(name="b", client=ScriptedClient([Answer()] * 20)),
        ],
        routes=[Route(model="chat", chain=["a", "b"])],
    )
    async with open_supervisor(cfg, observers=[AccessLog()]) as sup:
        for _ in range(8):
            await sup.complete(Request("chat", MESSAGES))
            await trio.sleep(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "relayrace.health"]
    assert any(line.startswith("provider a restarted") for line in lines)
    assert any(line.startswith("provider a gave up") for line in lines)


async def test_a_key_echoed_by_the_provider_never_reaches_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_hostile_upstream() as server:
        client = OpenAIClient(base_url=server.base_url, api_key=KEY, max_connections=4)
        cfg = Config(
            providers=[ProviderConfig(name="a", client=client, model="echo-key")],
            routes=[Route(model="chat", chain=["a"])],
        )
        observers = [AccessLog("json"), AccessLog("text")]
        async with open_supervisor(cfg, observers=observers) as sup:
            await sup.complete(Request("chat", MESSAGES))
    lines = [r.getMessage() for r in caplog.records if r.name == "relayrace.access"]
    assert len(lines) == 2
    secret_b64 = base64.b64encode(KEY.encode()).decode()
    for record in caplog.records:
        assert KEY not in record.getMessage() and secret_b64 not in record.getMessage()


async def test_events_carry_wall_time_beside_the_monotonic_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_supervisor(failover_config()) as sup, sup.subscribe() as events:
        await sup.complete(Request("chat", MESSAGES))
        event = await events.receive()
    data = event.to_dict()
    assert data["time"] == event.time
    when = datetime.datetime.fromisoformat(data["wall_time"].replace("Z", "+00:00"))
    assert abs(when - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)
    assert data["wall_time"].endswith("Z")


def test_access_log_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        AccessLog("xml")


# --- traces ------------------------------------------------------------------------------------

async def test_a_span_per_request_with_a_child_per_attempt_and_decisions_as_events(
    autojump_clock: trio.abc.Clock,
) -> None:
    # opentelemetry-sdk is in the dev extra; skipped only where someone installs without it.
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    tracing = Tracing(tracer_provider=provider)
    assert tracing.enabled
    cfg = failover_config()
    cfg = Config(
        providers=cfg.providers,
        routes=[*cfg.routes, Route(model="only-a", chain=["a"])],
        seed=3,
    )
    async with open_supervisor(cfg, observers=[tracing]) as sup:
        reply = await sup.complete(Request("chat", MESSAGES))
        with pytest.raises(RequestFailed):
            await sup.complete(Request("only-a", MESSAGES))
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.parent is None]
    assert len(requests) == 2
    ok = next(s for s in requests if s.attributes["relayrace.request_id"] == reply.request_id)
    children = [s for s in spans if s.parent is not None and s.parent.span_id == ok.context.span_id]
    assert [c.attributes["gen_ai.provider.name"] for c in children] == [
        a.actor for a in reply.attempts
    ]
    assert ok.attributes["gen_ai.provider.name"] == "b"
    assert ok.attributes["gen_ai.request.model"] == "chat"
    assert ok.attributes["gen_ai.response.model"] == reply.model
    assert reply.usage is not None
    assert ok.attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert [e.attributes["relayrace.decision.rule"] for e in ok.events] == [
        str(d.rule) for d in reply.decisions
    ]
    failed = next(s for s in requests if s is not ok)
    assert not failed.status.is_ok and failed.attributes["error.type"] == "provider_5xx"
    # Attempt spans sit inside their request's span, with their own durations.
    for child in children:
        assert ok.start_time <= child.start_time <= child.end_time <= ok.end_time


def test_tracing_without_opentelemetry_is_disabled_and_requests_still_run() -> None:
    # A fresh interpreter where ``import opentelemetry`` fails, as when the extra is absent.
    code = """
import sys
sys.modules["opentelemetry"] = None
import trio
from relayrace import Config, ProviderConfig, Request, open_supervisor
from relayrace.observe import Tracing
from relayrace.testing import Answer, ScriptedClient

tracing = Tracing()
assert tracing.enabled is False

async def main():
    cfg = Config(providers=[ProviderConfig(name="a", client=ScriptedClient([Answer()]))])
    async with open_supervisor(cfg, observers=[tracing]) as sup:
        reply = await sup.complete(Request("m", [{"role": "user", "content": "hi"}]))
    print(reply.provider)

trio.run(main)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "a"
