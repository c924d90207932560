"""What a provider said about its rate limits in a response's headers (``RateLimits``).

OpenAI sends ``x-ratelimit-remaining-requests`` / ``-tokens`` with ``x-ratelimit-reset-requests``
/ ``-tokens`` (Go-style durations, ``6m0s``); Anthropic sends
``anthropic-ratelimit-requests-remaining`` / ``-tokens-remaining`` with ``-reset`` (RFC 3339
timestamps). The resets are read by ``relayrace._failure.parse_rate_limit_reset`` (one place
for their formats), one header at a time.

They are read from every answer of the provider's, a success's (``Completion.limits``) and an
error's (``Failure.limits``, set by the actors' error mapping) alike.
"""

from __future__ import annotations

from collections.abc import Mapping

# Defined beside ``Failure``, which carries one from an error answer; re-exported here.
from ._failure import RateLimits as RateLimits
from ._failure import lower_headers, parse_rate_limit_reset

# (kind, remaining header, reset header) for each format.
_HEADERS = (
    ("requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("requests", "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("tokens", "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
)


def read_rate_limits(
    headers: Mapping[str, str] | None, now: float | None = None
) -> RateLimits | None:
    """Read the rate-limit headers of a response; ``None`` when it has none.

    Args:
        headers: the response headers (any case).
        now: the wall-clock time (epoch seconds) Anthropic's timestamps are measured from.
    """
    if headers is None:
        return None
    # The common case made cheap (every response passes here): no rate-limit header at all.
    raw = getattr(headers, "raw", None)  # httpx.Headers: its (name, value) bytes, unparsed
    if isinstance(raw, list):
        if b"ratelimit" not in b" ".join([name for name, _ in raw]).lower():
            return None
    elif not any("ratelimit" in str(name).lower() for name in headers):
        return None
    lowered = lower_headers(headers)
    found: dict[str, float | int] = {}
    for kind, remaining, reset in _HEADERS:
        value = lowered.get(remaining)
        if value is not None and f"remaining_{kind}" not in found:
            text = value.strip()
            if text.isdigit():
                found[f"remaining_{kind}"] = int(text)
        wait = lowered.get(reset)
        if wait is not None and f"reset_{kind}" not in found:
            seconds = parse_rate_limit_reset({reset: wait}, now)
            if seconds is not None:
                found[f"reset_{kind}"] = seconds
    if not found:
        return None
    return RateLimits(**found)  # type: ignore[arg-type]
