"""How the shared state is written in Redis and read back: JSON records, flat replies, and
what an exception is called in a ``state_degraded`` event."""

from __future__ import annotations

from typing import Any

import trio

from ._model import BenchRecord, Deployment, LearnedLimits, Pin


def exception_name(exc: BaseException) -> str:
    """What went wrong, by class name only (a message may carry the URL and its password)."""
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(sorted({exception_name(e) for e in exc.exceptions}))
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return type(exc).__name__


def shorter(stored: BenchRecord, local: BenchRecord) -> bool:
    """Whether Redis holds less of a bench than this process (its deadlines are kept to the
    millisecond, so only a real difference counts)."""
    return (local.manual and not stored.manual) or stored.until < local.until - 0.001


def pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def bench_from_json(value: dict[str, Any]) -> BenchRecord:
    return BenchRecord(
        until=float(value["until"]), reason=str(value["reason"]), manual=bool(value["manual"])
    )


def pin_from_json(value: dict[str, Any]) -> Pin:
    return Pin(deployment=Deployment.from_field(value["f"]), until=float(value["until"]))


def limits_to_json(limits: LearnedLimits) -> dict[str, Any]:
    return {
        "remaining_requests": limits.remaining_requests,
        "remaining_tokens": limits.remaining_tokens,
        "reset_at": limits.reset_at,
        "observed_at": limits.observed_at,
    }


def limits_from_json(value: dict[str, Any]) -> LearnedLimits:
    def number(key: str) -> float | None:
        v = value.get(key)
        return float(v) if isinstance(v, (int, float)) else None

    return LearnedLimits(
        remaining_requests=number("remaining_requests"),
        remaining_tokens=number("remaining_tokens"),
        reset_at=number("reset_at"),
        observed_at=float(value.get("observed_at") or 0.0),
    )
