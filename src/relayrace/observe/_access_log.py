"""``AccessLog``: a supervisor observer that writes one line per request at INFO on the
``relayrace.access`` logger (JSON or text, from ``relayrace._access``), and one line per health
change (bench, probe, recovery, restart, give-up) on the ``relayrace.health`` logger.

Secrets: every text in a line has been redacted where it was made (``Failure.message``) and is
redacted again here (``access_record`` does it for request lines).
"""

from __future__ import annotations

import datetime
import json
import logging
import math

from .._access import MESSAGE_LIMIT, access_record, format_text
from .._errors import RequestFailed
from .._events import Event, EventKind
from .._redact import redact
from .._values import Reply
from ..supervisor import Observer, RequestInfo, RequestTiming

#: The access log's formats.
FORMATS = ("json", "text")

access_log = logging.getLogger("relayrace.access")
health_log = logging.getLogger("relayrace.health")

_HEALTH_LEVELS = {
    EventKind.ACTOR_BENCHED: logging.WARNING,
    EventKind.ACTOR_PROBING: logging.INFO,
    EventKind.ACTOR_RECOVERED: logging.INFO,
    EventKind.ACTOR_RESTARTED: logging.WARNING,
    EventKind.ACTOR_GAVE_UP: logging.ERROR,
    EventKind.FLEET_BENCHED: logging.WARNING,
    EventKind.FLEET_UNBENCHED: logging.INFO,
}


class AccessLog(Observer):
    """Log each request and each health change of one supervisor.

    Args:
        format: ``json`` (one ``json.dumps`` of the access record per line) or ``text``
            (``format_text``).
        access: the logger of request lines (default ``relayrace.access``).
        health: the logger of health lines (default ``relayrace.health``).

    Raises:
        ValueError: an unknown ``format``.
    """

    def __init__(
        self,
        format: str = "json",
        *,
        access: logging.Logger | None = None,
        health: logging.Logger | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        self.format = format
        self._access = access_log if access is None else access
        self._health = health_log if health is None else health

    def request_ended(
        self, outcome: Reply | RequestFailed, info: RequestInfo, timing: RequestTiming
    ) -> None:
        log = self._access
        if not log.isEnabledFor(logging.INFO):
            return
        record = access_record(
            outcome,
            surface=info.surface,
            route=info.model,
            started=datetime.datetime.fromtimestamp(info.wall_started, datetime.UTC),
            latency=timing.latency,
            first_token=timing.first_token,
            clock_start=info.started,
        )
        line = format_text(record) if self.format == "text" else json.dumps(record)
        log.info("%s", line)

    def health_changed(self, event: Event) -> None:
        if event.kind is EventKind.ADMIN_ACTION:
            return  # the admin API logs its own lines (``relayrace.admin``)
        level = _HEALTH_LEVELS.get(event.kind, logging.INFO)
        if self._health.isEnabledFor(level):
            self._health.log(level, "%s", health_line(event))


def health_line(event: Event) -> str:
    """One line for a health change: ``provider a benched for 12s: provider_5xx/503: ...``."""
    what = event.kind.value.removeprefix("actor_").replace("_", " ")
    parts = [f"provider {event.actor} {what}"]
    if event.until is not None:
        if math.isinf(event.until):
            parts.append("until unbenched")
        else:
            parts.append(f"for {max(0.0, event.until - event.time):.3g}s")
    line = " ".join(parts)
    failure = event.failure
    if failure is not None:
        code = failure.category.value
        if failure.status is not None:
            code += f"/{failure.status}"
        line += f": {code}: {failure.message}"
    if event.detail:
        line += f" ({event.detail})"
    line = redact(line).replace("\n", " ")
    return line if len(line) <= 2 * MESSAGE_LIMIT else line[: 2 * MESSAGE_LIMIT - 1] + "…"
