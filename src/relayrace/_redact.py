"""Masking of secrets in text that may leave the process (error messages, logs, events, the
answer text).

``redact`` is pure and cheap: the key-shape patterns are compiled once, at import.
``secret_forms`` lists the forms a secret may be echoed in (base64, URL-encoded);
``SecretFilter`` masks them in text that arrives in pieces (a stream's deltas).
"""

from __future__ import annotations

import base64
import re
import urllib.parse
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


# A base64 form of a secret that sits at another alignment in a longer base64 text is only
# masked from this length on: shorter, it could match innocent text.
_MIN_ALIGNED_FORM = 16


def secret_forms(secrets: Iterable[str]) -> tuple[str, ...]:
    """Each secret (of 4 characters or more) and the forms a provider may echo it in: its
    base64 (standard and URL-safe, whole, and the part that is the same wherever it starts in a
    longer base64 text) and its URL encoding; longest first, without repeats, and without a
    form that holds another (masking the shorter one masks it too)."""
    forms: set[str] = set()
    for secret in secrets:
        if not isinstance(secret, str) or len(secret) < _MIN_SECRET_LENGTH:
            continue
        forms.add(secret)
        forms.add(urllib.parse.quote(secret, safe=""))
        raw = secret.encode("utf-8", "surrogatepass")
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(raw).decode())
            for shift in (0, 1, 2):
                # Shifted by `shift` bytes, the first characters and the last (partial) one
                # depend on the bytes around the secret: keep only the rest.
                text = encode(b"\0" * shift + raw).decode().rstrip("=")
                head = (0, 2, 3)[shift]
                tail = 1 if (shift + len(raw)) % 3 else 0
                core = text[head : len(text) - tail]
                if len(core) >= _MIN_ALIGNED_FORM:
                    forms.add(core)
    # A form that holds another is masked with it: keep only the shortest (fewer checks).
    # (A padded base64 form is kept whole, so that its last characters go too.)
    kept = [
        form
        for form in forms
        if form.endswith("=") or not any(o != form and o in form for o in forms)
    ]
    return tuple(sorted(kept, key=len, reverse=True))


class SecretFilter:
    """Masks secrets in a text that arrives in pieces, such as a stream's deltas.

    Each piece is passed on at once, except its end when that end could be the start of a
    secret: at most (the longest form − 1) characters are held back until the next piece shows
    whether they are one (masked) or not (passed on), or until ``flush``. A secret split across
    any number of pieces is masked; a text without one passes unchanged. The cost per piece is
    two substring searches per form, no regex.

    Args:
        forms: the exact strings to mask (``secret_forms`` of the secrets); those shorter than
            4 characters are ignored.
    """

    __slots__ = ("_forms", "_starts", "_shortest", "_held")

    def __init__(self, forms: Iterable[str]):
        wanted = {form for form in forms if len(form) >= _MIN_SECRET_LENGTH}
        self._forms = tuple(sorted(wanted, key=len, reverse=True))
        # (first character, characters before the end where a held-back start may begin, form)
        self._starts = tuple((form[0], len(form) - 1, form) for form in self._forms)
        self._shortest = min(map(len, self._forms), default=0)
        self._held = ""

    def fresh(self) -> SecretFilter:
        """A filter of the same forms with nothing held back: what ``SecretFilter(forms)``
        gives, without sorting the forms again (one per streamed attempt)."""
        new = SecretFilter.__new__(SecretFilter)
        new._forms, new._starts, new._shortest = self._forms, self._starts, self._shortest
        new._held = ""
        return new

    def feed(self, text: str) -> str:
        """The part of ``held + text`` that can be passed on now, secrets masked."""
        if self._held:
            text = self._held + text
        size = hold = len(text)
        if size >= self._shortest:
            for form in self._forms:
                if form in text:
                    text = text.replace(form, REDACTED)
            size = hold = len(text)
        for first, reach, form in self._starts:
            # The earliest place from which the rest of the text is a proper prefix of `form`.
            j = text.find(first, size - reach if size > reach else 0, hold)
            while j != -1:
                if form.startswith(text[j:]):
                    hold = j
                    break
                j = text.find(first, j + 1, hold)
        if hold == size:
            self._held = ""
            return text
        self._held = text[hold:]
        return text[:hold]

    def flush(self) -> str:
        """The text held back, at the end of the pieces."""
        held, self._held = self._held, ""
        return held
