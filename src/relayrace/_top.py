"""``relayrace top``: a live terminal view of a running gateway's providers, fed by
``GET /admin/providers`` (health, bench deadlines, in flight, inbox depth, recent failures).

``render`` draws one frame from the admin API's answer (pure); ``main`` fetches and redraws
every ``interval`` seconds, or prints one frame with ``once``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any

import httpx

#: Clear the screen and move to its top-left corner.
_CLEAR = "\x1b[H\x1b[2J"
_COLUMNS = ("provider", "state", "until", "in flight", "queued", "fails", "recent failures")


def _bench_note(provider: dict[str, Any]) -> str:
    """What is known of a bench: ``" (manual, drained)"``, ``" (fleet, 5xx)"``, or ``""``."""
    notes = [
        note
        for note in (
            "fleet" if provider.get("benched_by") == "fleet" else None,
            "manual" if provider.get("manual") else None,
            provider.get("bench_reason") if provider.get("bench_reason") != "manual" else None,
        )
        if note
    ]
    return f" ({', '.join(notes)})" if notes else ""


def render(data: dict[str, Any], *, url: str, width: int = 100) -> str:
    """One frame: a header line, a table of providers, the routes."""
    providers = data.get("providers", [])
    down = sum(1 for p in providers if p.get("state") in ("benched", "gave_up"))
    header = (
        f"relayrace top — {url} — {data.get('time', '')} — {len(providers)} providers,"
        f" {down} down, {data.get('in_flight', 0)} requests in flight"
        + (" — DRAINING" if data.get("draining") else "")
        + _shared_note(data.get("shared_state"))
    )
    rows = [list(_COLUMNS)]
    for p in providers:
        until = p.get("benched_until") or p.get("gave_up_until")
        if p.get("bench_endless"):
            until = "until unbench"
        elif until:
            until = until[11:19]  # the time of day of the ISO deadline (UTC)
        state = p.get("state", "?") + _bench_note(p)
        recent = Counter(f["category"] for f in p.get("recent_failures", []))
        rows.append(
            [
                str(p.get("name", "?")),
                state,
                until or "-",
                str(p.get("in_flight", 0)),
                str(p.get("queued", 0)),
                str(p.get("consecutive_failures", 0)),
                ", ".join(f"{c}×{n}" for c, n in recent.most_common()) or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [header[:width], ""]
    for row in rows:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        lines.append(line[:width])
    routes = data.get("routes", {})
    if routes:
        lines.append("")
        for name, chain in routes.items():
            lines.append(f"route {name}: {' > '.join(chain)}"[:width])
    return "\n".join(lines) + "\n"


def fetch(client: httpx.Client) -> dict[str, Any]:
    """``GET /admin/providers``.

    Raises:
        RuntimeError: the gateway answered with an error or could not be reached (one line).
    """
    try:
        response = client.get("/admin/providers")
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {client.base_url}: {exc}") from None
    if response.status_code == 404:
        raise RuntimeError(
            "the gateway has no admin API (set [server] admin_tokens_env and restart it)"
        )
    if response.status_code == 401:
        raise RuntimeError("the admin token was refused")
    if response.status_code != 200:
        raise RuntimeError(f"GET /admin/providers answered {response.status_code}")
    data: dict[str, Any] = response.json()
    return data


def main(url: str, token_env: str, *, interval: float = 1.0, once: bool = False) -> int:
    """Run ``relayrace top``: exit 0 (``once``: after a frame; else on Ctrl-C), 1 when the
    gateway cannot be read with ``once``, 2 when the token's variable is not set."""
    token = os.environ.get(token_env)
    if not token:
        print(f"relayrace top: the variable {token_env} (--token-env) is not set", file=sys.stderr)
        return 2
    width = _width()
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=5) as client:
        if once:
            try:
                sys.stdout.write(render(fetch(client), url=url, width=width))
            except RuntimeError as exc:
                print(f"relayrace top: {exc}", file=sys.stderr)
                return 1
            return 0
        try:
            while True:
                try:
                    frame = render(fetch(client), url=url, width=_width())
                except RuntimeError as exc:
                    frame = f"relayrace top — {url}\n\n{exc}\n"
                sys.stdout.write(_CLEAR + frame)
                sys.stdout.flush()
                time.sleep(interval)
        except KeyboardInterrupt:
            return 0


def _width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def _shared_note(shared: dict[str, Any] | None) -> str:
    """The header's word on the state shared through Redis (nothing when it is local)."""
    if not shared:
        return ""
    if shared.get("degraded") or not shared.get("connected"):
        return " — shared state AWAY"
    return f" — {shared.get('instances', 1)} instances share state"
