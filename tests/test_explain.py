"""The access-log record and ``relayrace explain``, told from a real failover.

The stories come from real requests: OpenAI clients talking to the mock provider over loopback
(``a`` answers 503, ``b`` answers, ``c`` refuses on content policy), a supervisor, and the HTTP
gateway in front of it for the shapes it answers in (a completion, an SSE stream, an error body).
The websocket frames are built as ``docs/servers.md`` specifies them, from the same reply.
Everything runs on the ``autojump_clock``, so the retry's backoff costs no real time.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from relayrace import (
    Action,
    Attempt,
    Category,
    Config,
    Failure,
    HealthPolicy,
    Outcome,
    Policies,
    ProviderConfig,
    Reply,
    Request,
    RequestFailed,
    Route,
    open_supervisor,
)
from relayrace._access import LIST_LIMIT, MESSAGE_LIMIT, access_record, format_text
from relayrace._cli import main
from relayrace._explain import render_html, render_text
from relayrace._story import ExplainError, Story, read_stories
from relayrace.actors import OpenAIClient
from relayrace.server import ServerSettings, serve
from relayrace.testing import mock_model, serve_mock_provider

#: Key-shaped, so that the redaction patterns would catch it anywhere it leaked.
KEY = "sk-explain-0123456789abcdefghijklmn"
STARTED = datetime.datetime(2026, 12, 1, 14, 40, 27, 123456, tzinfo=datetime.UTC)
MESSAGES = [{"role": "user", "content": "what does the quick fox do"}]


@attrs.frozen
class Told:
    """One failover and one failure, as Python values and as the gateway answered them."""

    reply: Reply
    failed: RequestFailed
    completion: dict[str, Any]
    sse: str
    error_body: dict[str, Any]
    error_status: int


@pytest.fixture
async def told(autojump_clock: trio.abc.Clock) -> AsyncIterator[Told]:
    async with serve_mock_provider() as mock:

        def provider(name: str, scenario: str) -> ProviderConfig:
            client = OpenAIClient(base_url=f"{mock.base_url}/v1", api_key=KEY)
            return ProviderConfig(name=name, client=client, model=mock_model(scenario, tag=name))

        cfg = Config(
            providers=[
                provider("a", "unavailable"),
                provider("b", "ok"),
                provider("c", "content-policy"),
            ],
            routes=[Route(model="m", chain=["a", "b"]), Route(model="bad", chain=["a", "c"])],
            # ``a`` fails every request: never benched, so every story starts with it.
            policies=Policies(health=HealthPolicy(failure_threshold=1000)),
            seed=7,
        )
        async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:
            reply = await sup.complete(Request("m", MESSAGES))
            with pytest.raises(RequestFailed) as caught:
                await sup.complete(Request("bad", MESSAGES))
            settings = ServerSettings(http_port=0, ws_port=None)
            server = await nursery.start(serve, sup, settings)
            async with httpx.AsyncClient(base_url=server.http_url, timeout=None) as http:
                completion = await http.post(
                    "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
                )
                streamed = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "m",
                        "messages": MESSAGES,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                )
                refused = await http.post(
                    "/v1/chat/completions", json={"model": "bad", "messages": MESSAGES}
                )
            nursery.cancel_scope.cancel()
    assert completion.status_code == streamed.status_code == 200
    yield Told(
        reply=reply,
        failed=caught.value,
        completion=completion.json(),
        sse=streamed.text,
        error_body=refused.json(),
        error_status=refused.status_code,
    )


def record_of(outcome: Reply | RequestFailed, **known: Any) -> dict[str, Any]:
    known.setdefault("surface", "python")
    known.setdefault("route", "m")
    record = access_record(outcome, started=STARTED, latency=0.25, **known)
    return json.loads(json.dumps(record))  # JSON-ready: it survives the round trip unchanged


def only(stories: list[Story]) -> Story:
    assert len(stories) == 1, stories
    return stories[0]


def offset(line: str) -> float:
    """The offset a timeline line starts with (``  +0.104s ...``)."""
    return float(line.split("s", 1)[0].strip().removeprefix("+"))


def lines_with(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


# --- the story of a real failover --------------------------------------------------------------


async def test_a_real_failover_is_told_attempt_by_attempt(told: Told) -> None:
    reply = told.reply
    assert [(a.actor, a.outcome) for a in reply.attempts] == [
        ("a", Outcome.FAILED),
        ("a", Outcome.FAILED),
        ("b", Outcome.OK),
    ]
    retry, failover = reply.decisions
    assert (retry.action, failover.action) == (Action.RETRY, Action.FAILOVER)

    text = render_text(only(read_stories(json.dumps(record_of(reply)))), width=100)

    a1, a2, b1 = (lines_with(text, label)[0] for label in ("a#1", "a#2", "b#1"))
    assert a1.startswith("  +0.000s") and "failed  provider_5xx/server_error (503)" in a1
    # Offsets count from the first attempt; the second try waited the retry's wait at least.
    a_2, b_1 = (a.started_at - reply.attempts[0].started_at for a in reply.attempts[1:])
    assert a_2 >= retry.wait
    assert offset(a2) == pytest.approx(a_2, abs=0.001) and "failed  provider_5xx" in a2
    assert offset(b1) == pytest.approx(b_1, abs=0.001) and "b#1  ok" in b1
    # Each decision with the rule that made it, in the rule's own spelling.
    (retry_line,) = lines_with(text, "1. retry")
    (failover_line,) = lines_with(text, "2. failover")
    assert str(retry.rule) in retry_line and f"wait {retry.wait:.3f}s" in retry_line
    assert str(failover.rule) in failover_line
    assert str(failover.rule).startswith("default:failover.")
    assert text.splitlines()[-1] == (
        f"verdict: served by b (model {reply.model}) after 2 failed attempts on a"
        " and 1 failover in 0.250s"
    )


async def test_a_real_failure_says_why_and_which_rule_stopped_it(told: Told) -> None:
    failed = told.failed
    assert failed.failure.category is Category.CONTENT_POLICY
    stop = failed.decisions[-1]
    assert stop.action is Action.STOP

    text = render_text(only(read_stories(json.dumps(record_of(failed, route="bad")))), width=100)

    assert "a#1  failed" in text and "a#2  failed" in text and "c#1  failed  content_policy" in text
    verdict = text.splitlines()[-1]
    assert verdict.startswith("verdict: failed: content_policy")
    assert "from c" in verdict and f"stopped by {stop.rule}" in verdict


async def test_the_access_record_of_a_reply_and_of_a_failure(told: Told) -> None:
    reply, failed = told.reply, told.failed
    record = record_of(reply, surface="http", status=200, first_token=0.125)
    assert record["time"] == "2026-12-01T14:40:27.123Z"
    assert (record["request_id"], record["surface"], record["route"]) == (
        reply.request_id,
        "http",
        "m",
    )
    assert (record["provider"], record["status"], record["outcome"]) == ("b", 200, "ok")
    assert record["category"] is None
    assert [(a["provider"], a["outcome"], a["category"]) for a in record["attempts"]] == [
        ("a", "failed", "provider_5xx"),
        ("a", "failed", "provider_5xx"),
        ("b", "ok", None),
    ]
    first = reply.attempts[0].started_at
    offsets = [round(a.started_at - first, 4) for a in reply.attempts]
    assert [a["offset"] for a in record["attempts"]] == offsets
    assert offsets[1] >= round(reply.decisions[0].wait, 4)  # the retry waited before its try
    assert record["rules"] == [str(d.rule) for d in reply.decisions]
    assert (record["latency"], record["first_token"]) == (0.25, 0.125)
    assert reply.usage is not None and record["usage"] == reply.usage.to_dict()

    # Without the server's first-token time, the serving attempt's is used.
    served = reply.attempts[-1]
    assert served.first_delta_at is not None
    expected = round(served.first_delta_at - reply.attempts[0].started_at, 4)
    assert record_of(reply)["first_token"] == expected

    failure = record_of(failed, surface="websocket", route="bad")
    assert (failure["outcome"], failure["provider"], failure["category"]) == (
        "failed",
        None,
        "content_policy",
    )
    assert failure["failed_on"] == "c" and failure["usage"] is None
    assert failure["rules"][-1] == str(failed.decisions[-1].rule)

    line = format_text(record)
    assert "\n" not in line
    assert line.startswith("2026-12-01T14:40:27.123Z http #")
    assert "m 200 ok by b in 0.250s ttft 0.125s" in line
    assert "attempts a:provider_5xx/503 a:provider_5xx/503 b:ok" in line
    assert all(rule in line for rule in record["rules"])
    assert "failed content_policy/" in format_text(failure)


async def test_a_record_never_holds_a_secret(told: Told) -> None:
    # A failure message that carries the key (as a careless upstream might echo it back).
    leaky = RequestFailed(
        Failure(category=Category.AUTH, message=f"invalid key {KEY}", code=KEY, provider="a"),
        [
            attrs.evolve(
                told.failed.attempts[0], failure=Failure(category=Category.AUTH, message=KEY)
            )
        ],
        told.failed.decisions,
        request_id=9,
    )
    for outcome in (told.reply, told.failed, leaky):
        record = record_of(outcome, route=f"m?api_key={KEY}")
        written = json.dumps(record) + format_text(record)
        written += render_text(only(read_stories(json.dumps(record))))
        assert KEY not in written
    assert "[REDACTED]" in json.dumps(record_of(leaky))


async def test_a_record_is_bounded(told: Told) -> None:
    first = told.failed.attempts[0]
    many = [attrs.evolve(first, number=n, started_at=first.started_at + n) for n in range(50)]
    last = attrs.evolve(many[-1], actor="z")
    huge = RequestFailed(
        Failure(category=Category.PROVIDER_5XX, message="x" * 10_000),
        [*many[:-1], last],
        told.failed.decisions * 20,
    )
    record = record_of(huge)
    assert len(record["attempts"]) == LIST_LIMIT and record["attempts_total"] == 50
    assert record["attempts"][-1]["provider"] == "z"  # the last attempt is always kept
    assert len(record["decisions"]) == LIST_LIMIT
    assert record["decisions_total"] == 20 * len(told.failed.decisions)
    assert len(record["message"]) == MESSAGE_LIMIT
    assert len(json.dumps(record)) < 16_000
    text = render_text(only(read_stories(json.dumps(record))))
    assert f"(+{50 - LIST_LIMIT} attempts not recorded)" in text


# --- every shape a story travels in ------------------------------------------------------------


def shapes(told: Told) -> dict[str, str]:
    reply, failed = told.reply, told.failed
    trace = told.completion["relayrace"]
    done = {
        "type": "done",
        "id": "r1",
        "provider": reply.provider,
        "model": reply.model,
        "finish_reason": reply.finish_reason,
        "usage": None if reply.usage is None else reply.usage.to_dict(),
        "attempts": [a.to_dict() for a in reply.attempts],
        "decisions": [d.to_dict() for d in reply.decisions],
        "text": reply.text,
    }
    error = {
        "type": "error",
        "id": "r2",
        "category": failed.category,
        "code": failed.failure.code,
        "message": failed.failure.message,
        "provider": failed.failure.provider,
        "attempts": [a.to_dict() for a in failed.attempts],
        "decisions": [d.to_dict() for d in failed.decisions],
    }
    delta = {"type": "delta", "id": "r1", "seq": 0, "text": "The"}
    return {
        "completion": json.dumps(told.completion),
        "completion, pretty": json.dumps(told.completion, indent=2),
        "relayrace object": json.dumps(trace),
        "websocket done": json.dumps(done),
        "websocket transcript": "\n".join(json.dumps(f) for f in (delta, done)),
        "websocket error": json.dumps(error),
        "http error body": json.dumps(told.error_body),
        "sse": told.sse,
        "access log": json.dumps(record_of(reply)),
        "access log, failed": json.dumps(record_of(failed)),
    }


SHAPES = {
    # shape: (served by, or the failure's category)
    "completion": "b",
    "completion, pretty": "b",
    "relayrace object": "b",
    "websocket done": "b",
    "websocket transcript": "b",
    "websocket error": "content_policy",
    "http error body": "content_policy",
    "sse": "b",
    "access log": "b",
    "access log, failed": "content_policy",
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_every_shape_is_recognised(told: Told, shape: str) -> None:
    story = only(read_stories(shapes(told)[shape]))
    expected = SHAPES[shape]
    if expected == "content_policy":
        assert not story.ok and story.category == "content_policy" and story.failed_on == "c"
        assert [s.provider for s in story.steps] == ["a", "a", "c"]
        assert story.choices[-1].action == "stop"
    else:
        assert story.ok and story.provider == expected
        assert [s.provider for s in story.steps] == ["a", "a", "b"]
        assert [c.action for c in story.choices] == ["retry", "failover"]
    assert story.choices[-1].rule.count(":") == 1 and "=" in story.choices[-1].rule


async def test_the_gateway_answers_carry_what_explain_needs(told: Told) -> None:
    assert told.error_status == 400
    assert only(read_stories(shapes(told)["sse"])).usage == told.completion["usage"]
    assert only(read_stories(shapes(told)["completion"])).model == told.reply.model


async def test_several_records_are_several_stories(told: Told) -> None:
    text = shapes(told)["access log"] + "\n" + shapes(told)["access log, failed"] + "\n"
    stories = read_stories(text)
    assert [s.ok for s in stories] == [True, False]
    many = read_stories(json.dumps([told.completion, told.error_body]))
    assert [s.source for s in many] == ["chat completion", "HTTP error body"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "the input is empty"),
        ("   \n", "the input is empty"),
        ("{not json", "line 1: not JSON"),
        ('{"attempts": [], "decisions": []}\n{oops', "line 2: not JSON"),
        ('{"hello": "world"}', "line 1: an object with keys hello"),
        ("42", "line 1: a JSON int"),
        ('{"type": "delta", "id": 1, "seq": 0, "text": "x"}', "no request's story found"),
        ("data: {broken", "line 1: an SSE data line that is not JSON"),
        ('{"attempts": [{"actor": "a"}], "decisions": []}', "attempt 1: no number 'started_at'"),
    ],
)
def test_unreadable_input_is_one_clear_error(text: str, why: str) -> None:
    with pytest.raises(ExplainError) as caught:
        read_stories(text)
    assert why in str(caught.value)
    assert "\n" not in str(caught.value)


def trace(*attempts: dict[str, Any], **extra: Any) -> str:
    """A ``relayrace`` object (``reply_trace`` shape) around ``attempts``."""
    return json.dumps(
        {"provider": "b", "request_id": 1, "attempts": attempts, "decisions": []} | extra
    )


def attempt(actor: str, start: float, end: float, **extra: Any) -> dict[str, Any]:
    outcome = extra.pop("outcome", Outcome.OK)
    failure = (
        None if outcome is Outcome.OK else Failure(category=Category.TIMEOUT, code="idle_timeout")
    )
    return attrs.evolve(
        Attempt(
            actor=actor, number=1, outcome=outcome, failure=failure, started_at=start, ended_at=end
        ),
        **extra,
    ).to_dict()


def test_bars_are_scaled_to_the_width_and_marked() -> None:
    text = render_text(
        only(
            read_stories(
                trace(
                    attempt(
                        "a", 100.0, 101.0, outcome=Outcome.FAILED, deltas=3, continuation=False
                    ),
                    attempt("b", 101.0, 102.0, probe=True, continuation=True),
                )
            )
        ),
        width=100,
    )
    (a_line,) = lines_with(text, "a#1")
    (b_line,) = lines_with(text, "b#1")
    assert a_line.startswith("  +0.000s   1.000s  ") and b_line.startswith("  +1.000s   1.000s  ")
    a_track, b_track = (line[20:].split("  ")[0] for line in (a_line, b_line))
    assert len(a_track) == len(b_track) and len(b_line) <= 100
    # Each takes half the request's time: the first half of the track, then the second.
    a_cells, b_cells = a_track.rstrip("·"), b_track.lstrip("·")
    assert set(a_cells) == set(b_cells) == {"█"}
    assert len(a_cells) + len(b_cells) == len(a_track) and abs(len(a_cells) - len(b_cells)) <= 1
    assert b_track == "·" * len(a_cells) + b_cells
    assert "failed  timeout/idle_timeout" in a_line and "[probe]" not in a_line
    assert b_line.endswith("[probe]  [continuation]")
    wider = render_text(only(read_stories(trace(attempt("a", 0.0, 1.0)))), width=140)
    assert len(lines_with(wider, "a#1")[0]) == 140


def test_a_request_cancelled_before_any_attempt() -> None:
    frame = {
        "type": "error",
        "id": "r9",
        "category": "cancelled",
        "code": "cancelled",
        "message": "cancelled by the client",
        "attempts": [],
        "decisions": [],
    }
    text = render_text(only(read_stories(json.dumps(frame))))
    assert "no attempts were made" in text
    assert text.splitlines()[-1] == "verdict: failed: cancelled (cancelled by the client)"


# --- the page and the command ------------------------------------------------------------------


async def test_the_html_page_is_one_well_formed_page_with_every_attempt(told: Told) -> None:
    stories = read_stories(shapes(told)["completion"] + shapes(told)["websocket error"])
    page = render_html(stories)
    assert page.startswith("<!DOCTYPE html>")
    root = ET.fromstring(page.removeprefix("<!DOCTYPE html>"))  # well-formed, or this raises
    assert root.tag == "html"
    sections = root.findall("./body/section")
    assert len(sections) == 2
    rows = [ET.tostring(row, encoding="unicode", method="text") for row in sections[0].iter("tr")]
    assert [r for r in rows if "#" in r] == [r for r in rows if "a#" in r or "b#" in r]
    assert sum("a#1" in r or "a#2" in r or "b#1" in r for r in rows) == 3
    assert any("c#1" in ET.tostring(r, encoding="unicode") for r in sections[1].iter("tr"))
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<style>" in page  # inline CSS, nothing fetched
    verdicts = [p.text for p in root.iter("p") if p.get("class") == "verdict"]
    assert verdicts[0] is not None and verdicts[0].startswith("verdict: served by b")
    assert verdicts[1] is not None and verdicts[1].startswith("verdict: failed: content_policy")


async def test_the_command(told: Told, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reply_file = tmp_path / "reply.json"
    reply_file.write_text(shapes(told)["completion"])
    page = tmp_path / "story.html"
    assert main(["explain", str(reply_file), "--width", "90", "--html", str(page)]) == 0
    out, err = capsys.readouterr()
    assert "a#1" in out and "b#1" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: served by b")
    assert err == f"relayrace explain: wrote {page} (1 story)\n"
    assert "b#1" in page.read_text()

    for content, why in (("{nope", "not JSON"), ('{"x": 1}', "an object with keys x")):
        reply_file.write_text(content)
        assert main(["explain", str(reply_file)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and why in err
        assert err.startswith(f"relayrace explain: {reply_file}: ")

    assert main(["explain", str(tmp_path / "missing.json")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "cannot read" in err and "No such file" in err

    reply_file.write_bytes(b"\xff\xfe\x00")
    assert main(["explain", str(reply_file)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err

    reply_file.write_text(shapes(told)["completion"])
    assert main(["explain", str(reply_file), "--html", str(tmp_path / "no" / "dir.html")]) == 2
    assert "cannot write" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    assert "relayrace explain reply.json" in capsys.readouterr().out


def test_the_command_reads_standard_input() -> None:
    trace = {
        "provider": "b",
        "request_id": 3,
        "attempts": [
            Attempt(
                actor="b", number=1, outcome=Outcome.OK, failure=None, started_at=5.0, ended_at=5.5
            ).to_dict()
        ],
        "decisions": [],
    }
    run = subprocess.run(
        [sys.executable, "-m", "relayrace._cli", "explain", "--width", "60"],
        input=json.dumps(trace),
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "+0.000s   0.500s" in run.stdout and "verdict: served by b" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "relayrace._cli", "explain", "-"],
        input="nonsense",
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("relayrace explain: <stdin>: line 1: not JSON")
