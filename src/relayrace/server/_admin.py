"""The admin API under ``/admin/`` on the HTTP endpoint, and the reload it shares with SIGHUP.

Routes (each needs a bearer token of ``ServerSettings.admin_tokens``; with none configured every
``/admin/`` path answers 404, as if it did not exist):

- ``GET /admin/providers``: each provider's health, bench deadline (wall-clock ISO 8601),
  attempts in flight, inbox depth and recent failure categories; with a shared state backend,
  ``fleet_benches``: the benches the fleet shares, by deployment (``""``: provider-wide), and
  ``shared_state``: the backend as this process sees it (connected, instances, queued writes).
- ``POST /admin/providers/{name}/bench``: body ``{"seconds": N}``, or none / ``{}`` for a
  bench until unbench.
- ``POST /admin/providers/{name}/unbench``: lifts a bench or a drain.
- ``POST /admin/providers/{name}/drain``: new requests avoid the provider, those in flight on
  it finish; a manual bench whose reason is ``drained`` (health's ``bench_reason``, the
  ``actor_benched`` event's detail, ``relayrace_provider_drained``) until ``unbench``.

  With ``[state] backend = "redis"`` the three act fleet-wide (every process sharing the state
  honours the bench, or its lifting); ``?scope=instance`` acts on this process only. The answer
  says which (``"scope": "fleet"`` or ``"instance"``).
- ``POST /admin/drain``: refuse new requests on both surfaces, answer once those in flight
  have ended (``/readyz`` says 503 from the start). Always this process only: each instance
  is drained on its own (its load balancer must stop sending it traffic).
- ``POST /admin/reload``: read the config file again, validated as ``relayrace check`` does; on
  any mistake nothing changes and every problem is answered (400); otherwise the new
  providers, routes and policies are swapped in (``Supervisor.reload``).

Every action is an ``admin_action`` event (``Supervisor.record_admin``), a count in
``relayrace_admin_actions_total`` and a line on the ``relayrace.admin`` logger; no token is
ever logged or answered.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from .. import Attempt, ConfigError, Observer, Outcome, RequestInfo, Supervisor, read_gateway
from ._common import Gate, authorized
from ._probes import Receive, Scope, Send, send_json
from ._settings import ServerSettings

log = logging.getLogger("relayrace.admin")

#: Failed attempts remembered per provider for ``GET /admin/providers``.
RECENT_FAILURES = 10
_MAX_BODY = 4096


class RecentFailures(Observer):
    """An observer that keeps each provider's last ``RECENT_FAILURES`` failed attempts
    (wall-clock time, category, code) for the admin API and ``relayrace top``."""

    def __init__(self, keep: int = RECENT_FAILURES) -> None:
        self._keep = keep
        self._failures: dict[str, deque[dict[str, Any]]] = {}

    def attempt_ended(self, attempt: Attempt, info: RequestInfo) -> None:
        failure = attempt.failure
        if attempt.outcome is not Outcome.FAILED or failure is None:
            return
        recent = self._failures.get(attempt.actor)
        if recent is None:
            recent = self._failures[attempt.actor] = deque(maxlen=self._keep)
        recent.append(
            {"time": iso_utc(time.time()), "category": failure.category.value, "code": failure.code}
        )

    def of(self, provider: str) -> list[dict[str, Any]]:
        """The provider's recent failed attempts, oldest first."""
        return list(self._failures.get(provider, ()))


async def reload_gateway(
    sup: Supervisor,
    path: str,
    settings: ServerSettings,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read ``path`` as ``relayrace check`` does and swap its providers, routes and policies
    into ``sup``; ``[server]`` settings are kept, and those that differ from ``settings`` (the
    file's, with the command line's ``overrides``) are named under ``restart_needed``.

    Raises:
        ConfigError: the file has mistakes (``problems`` lists each); nothing changed.
    """
    try:
        gateway = read_gateway(path)
    except ConfigError:
        sup.record_admin("reload_refused")
        raise
    reloaded = await sup.reload(gateway.config)
    sup.record_admin("reload")
    new = attrs.evolve(gateway.server, **(overrides or {}))
    answer = {**reloaded.to_dict(), "restart_needed": settings.restart_needed(new)}
    log.info(
        "reloaded %s: added %s, removed %s, replaced %s, kept %s%s",
        path,
        list(reloaded.added),
        list(reloaded.removed),
        list(reloaded.replaced),
        list(reloaded.kept),
        f"; needs a restart: {', '.join(answer['restart_needed'])}"
        if answer["restart_needed"]
        else "",
    )
    return answer


@attrs.define(eq=False)
class Operations:
    """What the admin API works with beyond the supervisor.

    Attributes:
        config_path: the file ``POST /admin/reload`` reads (``None``: reload is refused).
        recent: the observer of recent failures (``None``: none are shown).
        overrides: ``[server]`` settings the command line set over the file's
            (``--log-format``): a reload does not report them as changed.
        on_reload: called after each successful ``POST /admin/reload`` (``serve --workers``:
            the worker asks its parent to reload the other workers).
    """

    config_path: str | None = None
    recent: RecentFailures | None = None
    overrides: Mapping[str, Any] = attrs.field(factory=dict)
    on_reload: Callable[[], None] | None = None


def iso_utc(wall_time: float) -> str:
    """A ``time.time()`` value as ISO 8601 UTC with milliseconds, as events' ``wall_time``."""
    moment = datetime.datetime.fromtimestamp(wall_time, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _wall(deadline: float | None, now: float) -> str | None:
    """A ``trio.current_time()`` deadline as wall-clock ISO 8601 (``None``: none or endless)."""
    if deadline is None or math.isinf(deadline):
        return None
    return iso_utc(time.time() + (deadline - now))


class _AdminError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


_PROVIDER_ACTIONS = ("bench", "unbench", "drain")


@attrs.define(eq=False)
class AdminAPI:
    """The ``/admin/`` handler of one ``serve`` (ASGI-shaped: ``scope, receive, send``)."""

    sup: Supervisor
    settings: ServerSettings
    gate: Gate
    operations: Operations = attrs.field(factory=Operations)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.settings.admin_tokens:
            await _send_error(send, _AdminError(404, "unknown_url", "no such path"))
            return
        if not authorized(self.settings.admin_tokens, scope["headers"]):
            await _send_error(
                send,
                _AdminError(401, "invalid_admin_token", "missing or invalid admin token"),
                headers=((b"www-authenticate", b'Bearer realm="relayrace-admin"'),),
            )
            return
        try:
            status, body = await self._dispatch(scope, receive)
        except _AdminError as exc:
            await _send_error(send, exc)
            return
        await send_json(send, status, body)

    async def _dispatch(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        method: str = scope["method"]
        parts = scope["path"].strip("/").split("/")[1:]  # after "admin"
        if parts == ["providers"]:
            _allow(method, "GET")
            return 200, self.providers()
        if len(parts) == 3 and parts[0] == "providers" and parts[2] in _PROVIDER_ACTIONS:
            _allow(method, "POST")
            name = parts[1]
            if name not in self.sup.health():
                raise _AdminError(404, "unknown_provider", f"no provider named {name[:100]!r}")
            fleet = _fleet(scope) and self.sup.shared_state is not None
            where = "fleet" if fleet else "instance"
            note = "" if self.sup.shared_state is None else f" ({where})"
            if parts[2] == "unbench":
                self.sup.unbench(name, fleet=fleet)
                self.sup.record_admin("unbench", actor=name)
                log.info("admin: unbenched provider %s%s", name, note)
                return 200, {"provider": self.providers_one(name), "scope": where}
            if parts[2] == "drain":
                self.sup.drain_provider(name, fleet=fleet)
                self.sup.record_admin("drain_provider", actor=name)
                log.warning("admin: drained provider %s until unbenched%s", name, note)
                return 200, {"provider": self.providers_one(name), "scope": where}
            seconds = _seconds(await _read_json(receive))
            self.sup.bench(name, seconds, fleet=fleet)
            self.sup.record_admin("bench", actor=name)
            log.warning(
                "admin: benched provider %s %s%s",
                name,
                "until unbenched" if seconds is None else f"for {seconds:g}s",
                note,
            )
            return 200, {"provider": self.providers_one(name), "scope": where}
        if parts == ["drain"]:
            _allow(method, "POST")
            self.sup.record_admin("drain")
            log.warning("admin: draining: %d requests in flight", len(self.gate))
            self.gate.close()
            await self.gate.wait_idle()
            log.info("admin: drained")
            return 200, {"drained": True, "in_flight": len(self.gate)}
        if parts == ["reload"]:
            _allow(method, "POST")
            path = self.operations.config_path
            if path is None:
                raise _AdminError(409, "no_config_file", "this server was not started from a file")
            try:
                ops = self.operations
                answer = await reload_gateway(self.sup, path, self.settings, ops.overrides)
                if ops.on_reload is not None:
                    ops.on_reload()
                return 200, answer
            except ConfigError as exc:
                log.error("admin: reload of %s refused: %d problems", path, len(exc.problems))
                problems = [str(p) for p in exc.problems]
                raise _AdminError(
                    400, "invalid_config", f"{path}: nothing changed", problems=problems
                ) from None
            except RuntimeError as exc:
                raise _AdminError(409, "not_running", str(exc)) from None
        raise _AdminError(404, "unknown_url", "no such path")

    def providers(self) -> dict[str, Any]:
        names = list(self.sup.health())
        return {
            "providers": [self.providers_one(name) for name in names],
            "routes": {name: list(route.chain) for name, route in self.sup.routes.items()},
            "in_flight": len(self.gate),
            "draining": self.gate.closed,
            "time": iso_utc(time.time()),
            "shared_state": self._shared_state(),
        }

    def _shared_state(self) -> dict[str, Any] | None:
        """The state shared with other processes as this one sees it (``None``: local)."""
        state = self.sup.shared_state
        if state is None:
            return None
        stats = state.statistics()
        return {
            "backend": stats.backend,
            "connected": stats.connected,
            "degraded": stats.degraded,
            "instances": stats.instances,
            "queued": stats.queued,
            "dropped": stats.dropped,
            "reconnects": stats.reconnects,
        }

    def providers_one(self, name: str) -> dict[str, Any]:
        now = trio.current_time()
        snapshot = self.sup.health()[name]
        recent = self.operations.recent
        return {
            "name": name,
            "state": snapshot.state.value,
            "manual": snapshot.manual,
            "benched_until": _wall(snapshot.benched_until, now),
            "bench_endless": snapshot.benched_until is not None
            and math.isinf(snapshot.benched_until),
            "gave_up_until": _wall(snapshot.gave_up_until, now),
            "consecutive_failures": snapshot.consecutive_failures,
            "bench_count": snapshot.bench_count,
            "in_flight": snapshot.in_flight,
            "queued": self.sup.inbox_depths().get(name, 0),
            "bench_reason": snapshot.bench_reason,
            "benched_by": snapshot.benched_by,
            "recent_failures": [] if recent is None else recent.of(name),
            "fleet_benches": self._fleet_benches(name),
        }

    def _fleet_benches(self, name: str) -> dict[str, Any] | None:
        """The shared benches of provider ``name``'s deployments (``None``: nothing shared)."""
        benches = self.sup.fleet_benches(name)
        if benches is None:
            return None
        return {
            model: {
                "until": None if record.manual else iso_utc(record.until),
                "reason": record.reason,
                "manual": record.manual,
            }
            for model, record in benches.items()
        }


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _AdminError(405, "method_not_allowed", f"{method} is not allowed; use {allowed}")


def _fleet(scope: Scope) -> bool:
    """``?scope=instance`` (this process only) or ``fleet`` (the default)."""
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    value = query.get("scope", ["fleet"])[-1]
    if value not in ("fleet", "instance"):
        raise _AdminError(400, "invalid_scope", "'scope' must be 'fleet' or 'instance'")
    return value == "fleet"


def _seconds(body: Any) -> float | None:
    seconds = body.get("seconds") if isinstance(body, dict) else None
    if seconds is None:
        return None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not (seconds > 0 and math.isfinite(seconds))
    ):
        raise _AdminError(400, "invalid_seconds", "'seconds' must be a positive number or absent")
    return float(seconds)


async def _read_json(receive: Receive) -> Any:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _AdminError(400, "disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise _AdminError(413, "request_too_large", f"the body exceeds {_MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks).strip()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise _AdminError(400, "invalid_json", "the body is not valid JSON") from None


async def _send_error(
    send: Send, error: _AdminError, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = {"error": {"message": str(error), "type": "admin_error", "code": error.code}}
    body["error"].update(error.extra)
    await send_json(send, error.status, body, headers)
