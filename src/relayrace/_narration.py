"""What ``relayrace demo`` says: the legend, a line per request, the health changes and the
summary, as plain functions of the demo's providers, the gateway's ``done`` / ``error`` frames
and the supervisor's events. No I/O: ``_demo`` runs the servers and prints what this returns.
"""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from typing import Any

import attrs

from ._events import Event, EventKind
from ._failure import Category
from ._policy import HealthPolicy


@attrs.frozen(kw_only=True)
class DemoProvider:
    """One provider of the demo: its name, the mock scenario it runs, and in words what it does
    and what relayrace should do about it."""

    name: str
    scenario: str
    fault: str
    expect: str


def demo_providers(seed: int, health: HealthPolicy) -> tuple[DemoProvider, ...]:
    """The demo's three providers, in priority order; ``seed`` picks the timing of their faults.

    Args:
        seed: the same seed gives the same faults.
        health: the policy the supervisor runs with (the legend quotes it).
    """
    rng = random.Random(seed)
    down = rng.choice((0.8, 1.0, 1.2))
    up = rng.choice((1.5, 2.0, 2.5))
    retry_after = rng.choice((1, 2))
    threshold = health.failure_threshold
    return (
        DemoProvider(
            name="flapping",
            scenario=f"flapping,down={down},up={up},chunks=6,delay=0.01",
            fault=f"answers 503 for {down} s, then works for {up} s, and so on",
            expect=(
                f"fail over to the next; after {threshold} failures in a row bench it for"
                f" {health.cooldown_base:g} s (doubling while it keeps failing); when the bench"
                " ends, ask for its model list (GET /v1/models) on its own timer, then make the"
                " next request that reaches it the probe: back in use if it answers"
            ),
        ),
        DemoProvider(
            name="limited",
            scenario=f"rate-limit,retry_after={retry_after}",
            fault=f"answers 429 (rate limited, Retry-After: {retry_after}) to every request",
            expect=(
                "fail over at once; bench it for its Retry-After, then make the next request"
                " that reaches it the probe; after a failed probe, bench it longer and check its"
                " model list first, as for flapping"
            ),
        ),
        DemoProvider(
            name="healthy",
            scenario="ok,chunks=6,delay=0.01",
            fault="always answers",
            expect="answer whatever the providers before it could not",
        ),
    )


def legend(
    providers: tuple[DemoProvider, ...], *, seed: int, requests: int, gap: float
) -> list[str]:
    """The lines printed before the first request."""
    lines = [
        f"relayrace demo, seed {seed} (--seed {seed} plays the same faults again)",
        "",
        f"{len(providers)} mock providers behind one route 'chat', tried in this order:",
    ]
    width = max(len(p.name) for p in providers)
    for rank, provider in enumerate(providers, start=1):
        lines.append(f"  {rank}. {provider.name:<{width}}  {provider.fault}")
        indent = " " * (width + 7)
        lines += textwrap.wrap(
            f"→ relayrace should {provider.expect}",
            width=96,
            initial_indent=indent,
            subsequent_indent=indent + "  ",
        )
    lines += [
        "",
        f"{requests} requests go to the gateway over one websocket, {gap:g} s apart. The gateway"
        " and the mock",
        "providers listen on loopback for the length of the demo and stop with it.",
        "Each line: the request, who answered it and how long it took, then why the providers",
        "before it did not (the supervisor's decisions). Lines starting with ⏸ ▶ ✔ are health",
        "changes as the supervisor reports them.",
        "",
    ]
    return lines


def _bench_for_failures(event: Event) -> bool:
    """The bench was for failures of ours (the threshold), not for a wait the provider sent,
    an overload, an immediate (auth, quota) or a manual bench: the actor then probes by itself
    when it ends (``Health.begin_active_probe``)."""
    failure = event.failure
    if event.detail == "manual" or failure is None:
        return False
    if failure.retry_after is not None or failure.category is Category.OVERLOADED:
        return False
    return failure.category not in HealthPolicy().bench_immediately


def _short(reason: str) -> str:
    """A decision's reason without its parenthesised detail, e.g. ``provider_5xx: try the next
    provider`` (the detail counts tries, which the demo's single tries make noise)."""
    head, _, _ = reason.partition(" (")
    return head


def _wrap(head: str, parts: list[str], width: int = 100) -> str:
    """``head`` then ``parts`` joined by commas; past ``width``, the parts continue on indented
    lines, never broken inside one."""
    lines = [head + "   " + parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines[-1] += ","
            lines.append(" " * 8 + part)
    return "\n".join(lines)


@attrs.define
class Narrator:
    """Turns frames and events into lines, and counts what the summary needs.

    Args:
        providers: the demo's providers, in priority order.
    """

    providers: tuple[DemoProvider, ...]
    answered: int = 0
    failed: int = 0
    attempts: int = 0
    invisible: int = 0
    last_served_by: str | None = None
    counts: dict[str, Counter[str]] = attrs.field(init=False)
    rules: Counter[str] = attrs.field(init=False, factory=Counter)
    _probing: set[str] = attrs.field(init=False, factory=set)
    # Actors whose bench is for failures: when it ends, the actor asks for the provider's model
    # list on its own timer before a request is the probe (the demo's mock clients probe
    # ``models``, the default). A bench for a wait the provider sent, an immediate or a manual
    # bench is probed by the next request alone.
    _self_probing: set[str] = attrs.field(init=False, factory=set)
    _rank: dict[str, int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.counts = {p.name: Counter() for p in self.providers}
        self._rank = {p.name: rank for rank, p in enumerate(self.providers)}

    def request_line(self, frame: dict[str, Any], took_ms: float) -> str:
        """The line for one request's ``done`` or ``error`` frame."""
        attempts = frame.get("attempts", [])
        failed_here = 0
        for attempt in attempts:
            if attempt["outcome"] == "ok":
                self.counts[attempt["actor"]]["served"] += 1
            elif attempt["outcome"] == "failed":
                self.counts[attempt["actor"]]["failed"] += 1
                failed_here += 1
        self.attempts += len(attempts)
        why: list[tuple[int, str]] = []
        for decision in frame.get("decisions", []):
            rule = decision["rule"]
            self.rules[f"{rule['source']}:{rule['policy']}.{rule['rule']}={rule['value']}"] += 1
            actor = decision.get("actor")
            reason = _short(decision["reason"])
            action = decision["action"]
            if action == "skip":
                self.counts[actor]["skipped"] += 1
                words = f"{actor} skipped ({reason})"
            elif action == "failover":
                words = f"{actor} failed ({reason})"
            else:
                words = f"{actor} failed, {action} ({reason})"
            why.append((self._rank.get(actor, len(self._rank)), words))
        # In the route's order, whatever order the decisions were made in.
        reasons = [words for _, words in sorted(why, key=lambda item: item[0])]
        if frame["type"] == "done":
            self.answered += 1
            self.invisible += failed_here
            self.last_served_by = frame["provider"]
            head = f"{frame['id']}  answered by {frame['provider']:<9} {took_ms:5.0f} ms"
            tail = reasons or ["first choice"]
        else:
            self.failed += 1
            head = f"{frame['id']}  FAILED ({frame['category']}) {took_ms:5.0f} ms"
            tail = [*reasons, frame.get("message", "")]
        return _wrap(head, tail)

    def event_line(self, event: Event) -> str | None:
        """The line for a health change, or ``None`` for the events the demo does not show."""
        actor = event.actor or ""
        if event.kind is EventKind.ACTOR_BENCHED:
            self.counts[actor]["benched"] += 1
            why = "manual" if event.detail == "manual" else "after a failure"
            if event.failure is not None:
                failure = event.failure
                status = "" if failure.status is None else f" {failure.status}"
                why = f"after {failure.category.value}{status}"
                if failure.retry_after is not None:
                    why += f", Retry-After {failure.retry_after:g} s"
            failed_probe = actor in self._probing
            if failed_probe:
                why = f"its probe failed ({why})"
            self._probing.discard(actor)
            if failed_probe or _bench_for_failures(event):
                self._self_probing.add(actor)
            else:
                self._self_probing.discard(actor)
            span = "" if event.until is None else f" for {event.until - event.time:.1f} s"
            return f"      ⏸  {actor} benched{span}: {why}"
        if event.kind is EventKind.ACTOR_PROBING:
            self._probing.add(actor)
            if actor in self._self_probing:
                self._self_probing.discard(actor)
                return (
                    f"      ▶  {actor}: bench over; after a check of its model list, the next"
                    " request to reach it is the probe"
                )
            return f"      ▶  {actor}: bench over, the next request that reaches it is the probe"
        if event.kind is EventKind.ACTOR_RECOVERED:
            self._probing.discard(actor)
            return f"      ✔  {actor} recovered: its probe answered, back in use"
        if event.kind in (EventKind.ACTOR_RESTARTED, EventKind.ACTOR_GAVE_UP):
            return f"      !  {actor} {event.kind.value.removeprefix('actor_')}: {event.detail}"
        return None

    def summary(self, health: dict[str, Any], now: float) -> list[str]:
        """The closing lines: requests, attempts, a table per provider, the state each one ends
        in (explained where it could look stuck), and the rules that decided."""
        total = self.answered + self.failed
        lines = [
            f"{self.answered} of {total} requests answered"
            + (f", {self.failed} failed" if self.failed else "")
            + f"; {self.invisible} attempts failed over invisibly"
            f" ({self.attempts} attempts in all)",
            "",
            f"{'provider':<10} {'answered':>8} {'failed':>6} {'skipped':>7} {'benched':>7}"
            "  at the end",
        ]
        notes = []
        for provider in self.providers:
            c = self.counts[provider.name]
            state, note = self._end_state(provider.name, health[provider.name], now)
            lines.append(
                f"{provider.name:<10} {c['served']:>8} {c['failed']:>6} {c['skipped']:>7}"
                f" {c['benched']:>7}  {state}"
            )
            if note:
                notes += textwrap.wrap(f"{provider.name}: {note}", width=96, subsequent_indent="  ")
        lines += ["", *notes] if notes else []
        lines += ["", "rules that decided (how often):"]
        lines += [f"  {rule}  ×{n}" for rule, n in sorted(self.rules.items())]
        return lines

    def _end_state(self, name: str, snapshot: Any, now: float) -> tuple[str, str]:
        """The state an actor ends in, and what it means when it could look stuck."""
        state = snapshot.state.value
        probe = "the next request that reaches it will be its probe"
        if state == "benched" and snapshot.benched_until is not None:
            left = snapshot.benched_until - now
            return f"benched, {left:.1f} s more", f"when its bench ends, {probe}."
        if state == "probing":
            note = f"its bench is over and {probe}."
            last = self.last_served_by
            if last is not None and self._rank[last] < self._rank[name]:
                note += f" None has yet: {last}, ahead of it, answered the requests since."
            return "waiting for its probe", note
        return state, ""
