"""The access-log record: one JSON-ready dict per request, and its one-line text form.

Pure: the server (or any caller) says what it knows — the surface, the route, when the request
began on the wall clock, how long it took — and ``access_record`` adds the story the reply or the
failure carries. Nothing here does I/O or reads a clock.

Sizes are bounded, so that one pathological request cannot make a huge log line: messages and
free text are cut, and the attempts and decisions lists are capped (the first ones and the last
one are kept, with the total count alongside). Texts are already redacted where they are made
(``Failure.message``); they are redacted again here, cheaply, since a log line is where a leak
would live longest.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, TypeVar

from ._errors import RequestFailed
from ._record import Attempt, Decision
from ._redact import redact
from ._values import Reply

_T = TypeVar("_T")

#: The record's format; bumped when a field changes meaning.
ACCESS_FORMAT = 1

#: Longest message (or other free text) kept in a record, in characters.
MESSAGE_LIMIT = 200
#: Most attempts (and, separately, decisions) listed in one record.
LIST_LIMIT = 20
#: Surfaces a record may name.
SURFACES = ("http", "websocket", "python")


def access_record(
    outcome: Reply | RequestFailed,
    *,
    surface: str,
    route: str,
    started: datetime.datetime,
    latency: float,
    first_token: float | None = None,
    status: int | None = None,
    clock_start: float | None = None,
) -> dict[str, Any]:
    """One access-log record for a finished request.

    Args:
        outcome: the ``Reply`` it got, or the ``RequestFailed`` it ended with.
        surface: ``http``, ``websocket`` or ``python``.
        route: the model name the request asked for.
        started: when the request began, on the wall clock (a naive time is taken as UTC).
        latency: seconds from the start to the end of the request.
        first_token: seconds from the start to the first delta the caller got, if the caller
            knows it (a streamed request); otherwise read from the serving attempt.
        status: the HTTP status answered, if any.
        clock_start: ``trio.current_time()`` when the request began, so that attempt offsets
            count from it; without it they count from the first attempt's start.

    Returns:
        A JSON-ready dict: ``format``, ``time``, ``request_id``, ``surface``, ``route``,
        ``provider`` (who served, ``None`` on failure), ``model``, ``status``, ``outcome``
        (``ok`` / ``failed``), ``category``, ``code``, ``message``, ``latency``,
        ``first_token``, ``usage``, ``attempts`` (+ ``attempts_total``), ``decisions``
        (+ ``decisions_total``) and ``rules`` (the deciding rules, each once, in order).

    Raises:
        ValueError: ``surface`` is not one of ``SURFACES``.
    """
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {', '.join(SURFACES)}, not {surface!r}")
    attempts: Sequence[Attempt] = outcome.attempts
    decisions: Sequence[Decision] = outcome.decisions
    if clock_start is None:
        clock_start = min((a.started_at for a in attempts), default=0.0)
    record: dict[str, Any] = {
        "format": ACCESS_FORMAT,
        "time": iso_utc(started),
        "request_id": outcome.request_id,
        "surface": surface,
        "route": _cut(route),
    }
    if isinstance(outcome, Reply):
        served = attempts[-1] if attempts else None
        if first_token is None and served is not None and served.first_delta_at is not None:
            first_token = served.first_delta_at - clock_start
        record |= {
            "provider": outcome.provider,
            "model": _cut(outcome.model),
            "status": status,
            "outcome": "ok",
            "category": None,
            "code": None,
            "message": None,
            "usage": None if outcome.usage is None else outcome.usage.to_dict(),
        }
    else:
        failure = outcome.failure
        record |= {
            "provider": None,
            "model": None,
            "status": status,
            "outcome": "failed",
            "category": failure.category.value,
            "code": _cut(failure.code),
            "message": _cut(failure.message),
            "usage": None,
            "failed_on": failure.provider,
        }
    record |= {
        "latency": _seconds(latency),
        "first_token": None if first_token is None else _seconds(first_token),
        "attempts": [_attempt(a, clock_start) for a in _capped(attempts)],
        "attempts_total": len(attempts),
        "decisions": [_decision(d) for d in _capped(decisions)],
        "decisions_total": len(decisions),
        "rules": list(dict.fromkeys(str(d.rule) for d in decisions)),
    }
    return record


def iso_utc(moment: datetime.datetime) -> str:
    """``moment`` as ISO 8601 UTC with milliseconds: ``2026-12-01T14:40:27.123Z``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    moment = moment.astimezone(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_text(record: dict[str, Any]) -> str:
    """The one-line human form of a record (``--log-format text``)::

        2026-12-01T14:40:27.123Z http #7 chat 200 ok by b in 0.532s ttft 0.120s tokens 6+9
          attempts a:provider_5xx/503 a:provider_5xx/503 b:ok
          rules default:retry.categories=provider_5xx default:failover.category=provider_5xx

    (all on one line).
    """
    parts = [
        str(record.get("time")),
        str(record.get("surface")),
        f"#{record.get('request_id')}",
        str(record.get("route")),
    ]
    if record.get("status") is not None:
        parts.append(str(record["status"]))
    if record.get("outcome") == "ok":
        parts.append(f"ok by {record.get('provider')}")
    else:
        code = record.get("code")
        what = (
            record.get("category")
            if code in (None, record.get("category"))
            else (f"{record.get('category')}/{code}")
        )
        parts.append(f"failed {what}")
    parts.append(f"in {_fmt_seconds(record.get('latency'))}")
    if record.get("first_token") is not None:
        parts.append(f"ttft {_fmt_seconds(record['first_token'])}")
    usage = record.get("usage")
    if usage:
        parts.append(f"tokens {usage.get('prompt_tokens')}+{usage.get('completion_tokens')}")
    attempts = record.get("attempts") or []
    if attempts:
        listed = " ".join(_attempt_text(a) for a in attempts)
        hidden = int(record.get("attempts_total") or len(attempts)) - len(attempts)
        parts.append("attempts " + listed + (f" (+{hidden} more)" if hidden > 0 else ""))
    if record.get("rules"):
        parts.append("rules " + " ".join(record["rules"]))
    if record.get("outcome") != "ok" and record.get("message"):
        parts.append(f"message {record['message']!r}")
    return " ".join(parts).replace("\n", " ")


# --- pieces ------------------------------------------------------------------------------------


def _attempt(attempt: Attempt, clock_start: float) -> dict[str, Any]:
    failure = attempt.failure
    return {
        "provider": attempt.actor,
        "number": attempt.number,
        "outcome": attempt.outcome.value,
        "category": None if failure is None else failure.category.value,
        "code": None if failure is None else _cut(failure.code),
        "status": None if failure is None else failure.status,
        "message": None if failure is None else _cut(failure.message),
        "offset": _seconds(attempt.started_at - clock_start),
        "duration": _seconds(attempt.duration),
        "first_token": (
            None
            if attempt.first_delta_at is None
            else _seconds(attempt.first_delta_at - attempt.started_at)
        ),
        "deltas": attempt.deltas,
        "probe": attempt.probe,
        "continuation": attempt.continuation,
    }


def _decision(decision: Decision) -> dict[str, Any]:
    return {
        "action": decision.action.value,
        "scope": decision.scope.value,
        "actor": decision.actor,
        "category": decision.category,
        "rule": str(decision.rule),
        "reason": _cut(decision.reason),
        "wait": _seconds(decision.wait),
    }


def _capped(items: Sequence[_T]) -> Sequence[_T]:
    """At most ``LIST_LIMIT`` items: the first ones and the last one (the one that decided)."""
    if len(items) <= LIST_LIMIT:
        return items
    return [*items[: LIST_LIMIT - 1], items[-1]]


def _cut(text: str | None) -> str | None:
    if text is None:
        return None
    text = redact(text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _seconds(value: float) -> float:
    return round(value, 4)


def _fmt_seconds(value: Any) -> str:
    return f"{value:.3f}s" if isinstance(value, int | float) else "?"


def _attempt_text(attempt: dict[str, Any]) -> str:
    if attempt.get("outcome") == "ok":
        what = "ok"
    else:
        what = str(attempt.get("category") or attempt.get("outcome"))
        if attempt.get("status") is not None:
            what += f"/{attempt['status']}"
    return f"{attempt.get('provider')}:{what}"
