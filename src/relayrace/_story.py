"""A request's story, read back from any shape the gateway answers or logs it in.

Every reply and error carries its story — the attempts and the decisions, each with the rule
that made it. ``read_stories`` recognises every shape it travels in:

- a whole chat-completion response, or an HTTP error body (``{"error": …, "relayrace": …}``);
- the ``relayrace`` object alone;
- a websocket ``done`` / ``error`` frame (other frames of a transcript are passed over);
- an SSE stream's text (``data: …`` lines: each chunk with a ``relayrace`` object);
- access-log records (``relayrace._access.access_record``), one JSON value per line;

and several of these one after another (one story each). Pure: text in, ``Story`` values out.

Attempt times in a ``relayrace`` object are trio's clock (monotonic seconds): only differences
mean something, so a story's offsets count from its first attempt's start.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs


class ExplainError(ValueError):
    """The input holds no request's story that ``explain`` can read; the message says why."""


@attrs.frozen(kw_only=True)
class Step:
    """One attempt on the timeline. ``offset`` counts from the first attempt's start;
    ``first_token`` from this attempt's start."""

    provider: str
    number: int | None
    outcome: str
    category: str | None = None
    code: str | None = None
    status: int | None = None
    message: str | None = None
    offset: float = 0.0
    duration: float = 0.0
    first_token: float | None = None
    probe: bool = False
    continuation: bool = False


@attrs.frozen(kw_only=True)
class Choice:
    """One decision, with its rule as ``source:policy.rule=value``."""

    action: str
    rule: str
    actor: str | None = None
    category: str | None = None
    reason: str = ""
    wait: float = 0.0


@attrs.frozen(kw_only=True)
class Story:
    """What happened to one request, whatever shape it was read from (``source``)."""

    source: str
    ok: bool
    provider: str | None = None
    request_id: int | None = None
    category: str | None = None
    code: str | None = None
    message: str | None = None
    failed_on: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    steps: tuple[Step, ...] = ()
    steps_total: int = 0
    choices: tuple[Choice, ...] = ()
    surface: str | None = None
    route: str | None = None
    time: str | None = None
    latency: float | None = None
    first_token: float | None = None


# --- reading -----------------------------------------------------------------------------------

_SHAPES = (
    "a chat completion or error body with a 'relayrace' object, the 'relayrace' object alone,"
    " a websocket done/error frame, an SSE stream or access-log lines"
)
#: Websocket frames that are part of a transcript but tell no story of their own.
_TRANSCRIPT_FRAMES = frozenset({"delta", "event", "health"})


def read_stories(text: str) -> list[Story]:
    """Every request's story in ``text``, in order.

    Raises:
        ExplainError: the text is empty, is not JSON (nor an SSE stream of JSON), or holds a
            value that is none of the shapes above, or holds no story at all.
    """
    if not text.strip():
        raise ExplainError("the input is empty")
    if any(line.startswith("data:") for line in text.splitlines()):
        stories = _from_sse(text)
    else:
        stories = []
        for line, value in _json_values(text):
            stories += _from_value(value, f"line {line}")
    if not stories:
        raise ExplainError(f"no request's story found: expected {_SHAPES}")
    return stories


def _json_values(text: str) -> Iterator[tuple[int, Any]]:
    """Each JSON value in ``text`` (one per line, or pretty-printed one after another), with the
    line it starts on."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise ExplainError(
                f"line {exc.lineno}: not JSON ({exc.msg}): expected {_SHAPES}"
            ) from None
        yield line, value


def _from_sse(text: str) -> list[Story]:
    stories: list[Story] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("data:"):
            continue  # comments, event:/id: lines, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            continue
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ExplainError(
                f"line {number}: an SSE data line that is not JSON ({exc.msg})"
            ) from None
        if isinstance(chunk, dict) and isinstance(chunk.get("relayrace"), dict):
            stories.append(_from_envelope(chunk, "SSE stream", f"line {number}"))
        elif isinstance(chunk, dict) and chunk.get("usage") and stories and not stories[-1].usage:
            # The usage chunk comes after the one with the story (include_usage).
            stories[-1] = attrs.evolve(stories[-1], usage=_mapping(chunk["usage"]))
    return stories


def _from_value(value: Any, where: str) -> list[Story]:
    if isinstance(value, list):
        return [story for item in value for story in _from_value(item, where)]
    if not isinstance(value, dict):
        raise ExplainError(f"{where}: a JSON {type(value).__name__}: expected {_SHAPES}")
    kind = value.get("type")
    if "surface" in value and "attempts" in value:
        return [_from_access(value, where)]
    if kind in ("done", "error") and "id" in value:
        return [_from_frame(value, where)]
    if kind in _TRANSCRIPT_FRAMES:
        return []
    if isinstance(value.get("relayrace"), dict):
        source = "HTTP error body" if "error" in value else "chat completion"
        return [_from_envelope(value, source, where)]
    if "attempts" in value and "decisions" in value:
        return [_from_trace(value, "relayrace object", where)]
    keys = ", ".join(sorted(map(str, value))[:6])
    raise ExplainError(f"{where}: an object with keys {keys}: expected {_SHAPES}")


def _from_envelope(value: dict[str, Any], source: str, where: str) -> Story:
    """A chat completion, an SSE chunk or an HTTP error body around a ``relayrace`` object."""
    story = _from_trace(value["relayrace"], source, where)
    error = value.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        story = attrs.evolve(
            story,
            ok=False,
            code=_text(code) if code is not None else story.code,
            message=_text(error.get("message")) or story.message,
        )
    elif value.get("model") is not None:
        story = attrs.evolve(story, model=_text(value.get("model")))
    if isinstance(value.get("usage"), dict):
        story = attrs.evolve(story, usage=value["usage"])
    return story


def _from_frame(value: dict[str, Any], where: str) -> Story:
    ok = value["type"] == "done"
    story = _from_trace(value, f"websocket {value['type']} frame", where)
    return attrs.evolve(
        story,
        ok=ok,
        category=None if ok else (_text(value.get("category")) or "unknown"),
        code=None if ok else _text(value.get("code")),
        message=None if ok else _text(value.get("message")),
        model=_text(value.get("model")) if ok else None,
        usage=_mapping(value.get("usage")) if ok else None,
    )


def _from_trace(value: Any, source: str, where: str) -> Story:
    """``reply_trace`` / ``failure_trace`` (or a websocket frame, which carries the same)."""
    if not isinstance(value, dict):
        raise ExplainError(f"{where}: the relayrace object is not a JSON object")
    raw = _list(value.get("attempts"), f"{where}: attempts")
    starts = [_number(a, "started_at", f"{where}: attempt {i}") for i, a in enumerate(raw, 1)]
    origin = min(starts, default=0.0)
    steps = tuple(
        _step(attempt, origin, f"{where}: attempt {i}") for i, attempt in enumerate(raw, 1)
    )
    failed = "category" in value
    last = next((s for s in reversed(steps) if s.outcome != "ok"), None)
    return Story(
        source=source,
        ok=not failed,
        provider=None if failed else _text(value.get("provider")),
        request_id=_int(value.get("request_id")),
        category=_text(value.get("category")) if failed else None,
        code=(last.code if last is not None else None) if failed else None,
        message=(last.message if last is not None else None) if failed else None,
        failed_on=_text(value.get("provider")) if failed else None,
        steps=steps,
        steps_total=len(steps),
        choices=tuple(
            _choice(d, f"{where}: decision {i}")
            for i, d in enumerate(_list(value.get("decisions"), f"{where}: decisions"), 1)
        ),
    )


def _from_access(value: dict[str, Any], where: str) -> Story:
    raw = _list(value.get("attempts"), f"{where}: attempts")
    offsets = [_number(a, "offset", f"{where}: attempt {i}") for i, a in enumerate(raw, 1)]
    origin = min(offsets, default=0.0)
    steps = []
    for i, attempt in enumerate(raw, 1):
        at = f"{where}: attempt {i}"
        steps.append(
            Step(
                provider=_name(attempt, "provider", at),
                number=_int(attempt.get("number")),
                outcome=_text(attempt.get("outcome")) or "unknown",
                category=_text(attempt.get("category")),
                code=_text(attempt.get("code")),
                status=_int(attempt.get("status")),
                message=_text(attempt.get("message")),
                offset=offsets[i - 1] - origin,
                duration=_number(attempt, "duration", at),
                first_token=_float(attempt.get("first_token")),
                probe=attempt.get("probe") is True,
                continuation=attempt.get("continuation") is True,
            )
        )
    ok = value.get("outcome") == "ok"
    return Story(
        source="access log",
        ok=ok,
        provider=_text(value.get("provider")),
        request_id=_int(value.get("request_id")),
        category=_text(value.get("category")),
        code=_text(value.get("code")),
        message=_text(value.get("message")),
        failed_on=_text(value.get("failed_on")),
        model=_text(value.get("model")),
        usage=_mapping(value.get("usage")),
        steps=tuple(steps),
        steps_total=max(_int(value.get("attempts_total")) or 0, len(steps)),
        choices=tuple(
            _choice(d, f"{where}: decision {i}")
            for i, d in enumerate(_list(value.get("decisions"), f"{where}: decisions"), 1)
        ),
        surface=_text(value.get("surface")),
        route=_text(value.get("route")),
        time=_text(value.get("time")),
        latency=_float(value.get("latency")),
        first_token=_float(value.get("first_token")),
    )


def _step(attempt: dict[str, Any], origin: float, where: str) -> Step:
    started = _number(attempt, "started_at", where)
    ended = _number(attempt, "ended_at", where)
    first = _float(attempt.get("first_delta_at"))
    failure = attempt.get("failure")
    failure = failure if isinstance(failure, dict) else {}
    return Step(
        provider=_name(attempt, "actor", where),
        number=_int(attempt.get("number")),
        outcome=_text(attempt.get("outcome")) or "unknown",
        category=_text(failure.get("category")),
        code=_text(failure.get("code")),
        status=_int(failure.get("status")),
        message=_text(failure.get("message")),
        offset=started - origin,
        duration=max(0.0, ended - started),
        first_token=None if first is None else first - started,
        probe=attempt.get("probe") is True,
        continuation=attempt.get("continuation") is True,
    )


def _choice(decision: Any, where: str) -> Choice:
    if not isinstance(decision, dict):
        raise ExplainError(f"{where}: not a JSON object")
    rule = decision.get("rule")
    if isinstance(rule, dict):
        rule = "{}:{}.{}={}".format(*(rule.get(k) for k in ("source", "policy", "rule", "value")))
    return Choice(
        action=_text(decision.get("action")) or "?",
        rule=_text(rule) or "?",
        actor=_text(decision.get("actor")),
        category=_text(decision.get("category")),
        reason=_text(decision.get("reason")) or "",
        wait=_float(decision.get("wait")) or 0.0,
    )


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ExplainError(f"{where}: not a JSON array")
    return value


def _number(item: Any, key: str, where: str) -> float:
    if not isinstance(item, dict):
        raise ExplainError(f"{where}: not a JSON object")
    value = _float(item.get(key))
    if value is None:
        raise ExplainError(f"{where}: no number '{key}'")
    return value


def _name(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ExplainError(f"{where}: no '{key}'")
    return value


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _mapping(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
