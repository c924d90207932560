"""``Inbound``: what reaches this process from Redis, merged into its mirror: the changes other
instances announce on the channel (pub/sub) and the full read every ``sync_interval`` (the
backstop), with this process's changes not yet sent kept on top (``Unsent``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from ._codec import bench_from_json, limits_from_json, pairs, pin_from_json, shorter
from ._mirror import Mirror
from ._model import BenchRecord, Pin, ProbeLease, StateEventKind, minute_of
from ._unsent import Unsent

#: Tells the backend's event hook: the kind, the reason, the deployment's field.
Emit = Callable[[StateEventKind, str, str], None]


@attrs.define
class Lacking:
    """What a full read found missing from Redis that this process's mirror has: benches and
    pins to write again (Redis restarted or flushed)."""

    benches: list[tuple[str, BenchRecord]] = attrs.Factory(list)
    pins: list[tuple[str, Pin]] = attrs.Factory(list)


@attrs.define
class Inbound:
    mirror: Mirror
    unsent: Unsent
    #: this process's instance id: its own benches coming back are not merged again
    instance: str
    emit: Emit
    #: the wall clock the records' deadlines are in
    clock: Callable[[], float]
    #: messages on the channel that were not relayrace's
    ignored: int = 0

    def message(self, data: Any) -> None:
        """One message from the channel: a change, or a JSON array of them (a ``BATCH``)."""
        try:
            decoded = json.loads(data)
            for change in decoded if isinstance(decoded, list) else (decoded,):
                self.apply(change)
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not ours (anyone may publish on the channel): ignored, never a reconnection.
            self.ignored += 1

    def apply(self, change: dict[str, Any]) -> None:
        kind, field = change["k"], change["f"]
        value: Any = change.get("v")
        mirror = self.mirror
        if kind == "bench":
            if change.get("i") == self.instance:
                # Our own bench coming back: the mirror had it, and may have lifted it since
                # (an unbench here, its message still on its way): not merged again.
                return
            self.merge_bench(field, bench_from_json(value), self.clock())
        elif kind == "unbench":
            if mirror.lift_bench(field, manual=True):
                self.emit(StateEventKind.FLEET_UNBENCHED, "unbench", field)
        elif kind == "fails":
            count = self.unsent.failures_plus(field, int(value))
            if count:
                mirror.failures[field] = count
            else:
                mirror.failures.pop(field, None)
        elif kind == "probe":
            mirror.probes[field] = ProbeLease(holder=value["holder"], until=float(value["until"]))
        elif kind == "unprobe":
            mirror.probes.pop(field, None)
        elif kind == "usage":
            minute, old = int(value["minute"]), mirror.usage.get(field)
            if old is None or old.minute <= minute:  # a past minute's count comes late: stale
                mirror.usage[field] = self.unsent.usage_plus(
                    field, minute, int(value["requests"]), int(value["tokens"])
                )
        elif kind == "limits":
            mirror.limits[field] = limits_from_json(value)
        elif kind == "pin":
            mirror.pins[field] = pin_from_json(value)

    def merge_bench(self, field: str, record: BenchRecord, now: float) -> None:
        """Merge another instance's bench (announced, or found by a full read: one missed
        while away) into the mirror: an event when it benches what the mirror had free."""
        before = self.mirror.benches.get(field)
        merged = self.mirror.merge_bench(field, record, now)
        if (before is None or not before.active(now)) and merged.active(now):
            self.emit(StateEventKind.FLEET_BENCHED, merged.reason, field)

    def snapshot(self, result: list[Any], now: float, *, republish: bool) -> Lacking:
        """Merge a full read (the ``SNAPSHOT`` script's ``result``) into the mirror; with
        ``republish``, say what Redis lacks (else the writes still queued will bring it)."""
        benches, fails, limits, pins, rpm, tpm = (pairs(part) for part in result[:6])
        mirror, unsent, lacking = self.mirror, self.unsent, Lacking()
        mirror.prune(now)
        mirror.instances = max(1, int(result[6]))
        for field, value in benches.items():
            self.merge_bench(field, bench_from_json(json.loads(value)), now)
        for field, record in list(mirror.benches.items()):
            stored = benches.get(field)
            if republish and (
                stored is None or shorter(bench_from_json(json.loads(stored)), record)
            ):
                lacking.benches.append((field, record))
        failures = {field: int(n) for field, n in fails.items()}
        for field in set(failures) | set(unsent.fails):
            failures[field] = unsent.failures_plus(field, failures.get(field, 0))
        mirror.failures = {field: n for field, n in failures.items() if n}
        for field, value in limits.items():
            mirror.limits[field] = limits_from_json(json.loads(value))
        for key, value in pins.items():
            pin = pin_from_json(json.loads(value))
            old = mirror.pins.get(key)
            if old is None or old.until <= pin.until:
                mirror.pins[key] = pin
        if republish:
            lacking.pins = [(key, pin) for key, pin in mirror.pins.items() if key not in pins]
        minute = minute_of(now)
        for field in set(rpm) | set(tpm):
            mirror.usage[field] = unsent.usage_plus(
                field, minute, int(rpm.get(field, 0)), int(tpm.get(field, 0))
            )
        return lacking
