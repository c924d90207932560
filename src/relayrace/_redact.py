"""Masking of secrets in text that may leave the process (error messages, logs, events).

``redact`` is pure and cheap: the key-shape patterns are compiled once, at import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"

# A given secret shorter than this is not replaced: masking every "abc" in a message would
# destroy the message and protect nothing.
_MIN_SECRET_LENGTH = 4

# Each pattern keeps its group 1 (the label, if any) and masks the rest of the match.
_KEY_SHAPES = re.compile(
    r"""
    # OpenAI / Anthropic / OpenRouter style keys: sk-..., sk-proj-..., sk-ant-api03-...
    ()(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{20,}
    # Google API keys
    | ()(?<![A-Za-z0-9])AIza[A-Za-z0-9_\-]{20,}
    # Authorization: Bearer <token>
    | (\bBearer\s+)[A-Za-z0-9._~+/\-]+=*
    # headers, JSON fields and query parameters that carry a key or a token
    | ((?<![A-Za-z0-9_])
       (?:x-(?:goog-)?api-key|api[_-]?key|access[_-]?token)["']?\s*[:=]\s*["']?
      | (?<![A-Za-z0-9_\-])key=
      )[^\s"'&,;#<>]+
    """,
    re.VERBOSE | re.IGNORECASE,
)


def _mask(match: re.Match[str]) -> str:
    label = next((group for group in match.groups() if group), "")
    return label + REDACTED


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask secrets in ``text``.

    Every occurrence of each given secret (ignored if shorter than 4 characters) is replaced by
    ``[REDACTED]``, longest secret first; then anything shaped like a key is masked: ``sk-…``
    keys, ``AIza…`` Google keys, ``Bearer <token>``, ``x-api-key: …``, ``api_key=…`` and
    ``key=…``.

    A secret that is itself part of the text ``[REDACTED]`` (such as ``"DACT"``) cannot be
    removed by masking; real keys never are.

    Args:
        text: the text to clean.
        secrets: exact strings that must not survive (API keys, tokens).

    Returns:
        The text with every secret masked.
    """
    wanted = {secret for secret in secrets if isinstance(secret, str)}
    for secret in sorted(wanted, key=len, reverse=True):
        if len(secret) >= _MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return _KEY_SHAPES.sub(_mask, text)
