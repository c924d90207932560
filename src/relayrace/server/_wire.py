"""What both surfaces say when a request cannot be answered: one ``WireError`` per cause, and
how a caller's strings are checked before the server echoes or passes them on.

A ``WireError`` is written out as an OpenAI error body on HTTP (``http_body``, with ``status``
and ``headers``), as an Anthropic error body or event on ``/v1/messages`` (``anthropic``), and as
an ``error`` frame on the websocket (``frame``); every cause — a
``RequestFailed``, a bad frame or body, a request stopped by the server, an unexpected
exception — is mapped to it here and nowhere else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from .. import Category, RequestFailed
from ._common import Stop, failure_trace

# HTTP status and OpenAI error type per failure category. The client's own token was accepted
# (a bad one gets 401 at the door), so an upstream `auth` or `quota_exhausted` is our upstream
# refusing us: a 502, never a 401/429 that would send the client after its own key or plan.
_STATUS: dict[Category, tuple[int, str]] = {
    Category.BAD_REQUEST: (400, "invalid_request_error"),
    Category.CONTEXT_LENGTH: (400, "invalid_request_error"),
    Category.CONTENT_POLICY: (400, "invalid_request_error"),
    Category.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    Category.RATE_LIMIT: (429, "rate_limit_error"),
    Category.OVERLOADED: (503, "service_unavailable_error"),
    # Our own capacity (every actor's inbox full) or a supervisor shutting down: try again
    # later or elsewhere. Not a 429: the client did not exceed a limit of its own.
    Category.LOCAL_CAPACITY: (503, "service_unavailable_error"),
    Category.CANCELLED: (503, "service_unavailable_error"),
    Category.TIMEOUT: (504, "server_error"),
    Category.AUTH: (502, "upstream_error"),
    Category.QUOTA_EXHAUSTED: (502, "upstream_error"),
    Category.PROVIDER_5XX: (502, "upstream_error"),
    Category.NETWORK: (502, "upstream_error"),
    Category.STREAM_ERROR: (502, "upstream_error"),
    Category.UNKNOWN: (502, "upstream_error"),
}

# Anthropic's HTTP status and error type per failure category (``/v1/messages``): the statuses
# Anthropic's own API uses, so that its SDKs raise the same typed exceptions (a 529 is
# ``overloaded_error``, an upstream fault ``api_error``).
_ANTHROPIC: dict[Category, tuple[int, str]] = {
    Category.BAD_REQUEST: (400, "invalid_request_error"),
    Category.CONTEXT_LENGTH: (400, "invalid_request_error"),
    Category.CONTENT_POLICY: (400, "invalid_request_error"),
    Category.MODEL_NOT_FOUND: (404, "not_found_error"),
    Category.RATE_LIMIT: (429, "rate_limit_error"),
    Category.OVERLOADED: (529, "overloaded_error"),
    Category.LOCAL_CAPACITY: (529, "overloaded_error"),
    Category.CANCELLED: (529, "overloaded_error"),
    Category.TIMEOUT: (504, "timeout_error"),
}
# ... and per HTTP status, for what is no failure of a request (a bad body, a missing key).
_ANTHROPIC_BY_STATUS: dict[int, tuple[int, str]] = {
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    503: (529, "overloaded_error"),
}


@attrs.frozen(kw_only=True)
class WireError:
    """Why a request gets no answer, in the terms of both surfaces.

    Attributes:
        status: the HTTP status.
        kind: OpenAI's error ``type`` (``invalid_request_error``, ``upstream_error``, ...).
        category: the failure category (``bad_request``, ``local_capacity``, ...).
        code: a short machine-readable reason.
        message: what went wrong, for a person.
        field: the field of the frame or body at fault (OpenAI's ``param``), if any.
        trace: for a failed request, its category, provider, attempts and decisions.
        headers: extra HTTP headers (``retry-after``, ``www-authenticate``, ``allow``).
        summary: the HTTP message when it differs from ``message`` (a failure's category first).
    """

    status: int
    kind: str
    category: str
    code: str | None
    message: str
    field: str | None = None
    trace: dict[str, Any] | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    summary: str | None = None

    @classmethod
    def from_failure(cls, exc: RequestFailed) -> WireError:
        failure = exc.failure
        status, kind = _STATUS.get(failure.category, (502, "upstream_error"))
        headers: tuple[tuple[bytes, bytes], ...] = ()
        if failure.category is Category.RATE_LIMIT and failure.retry_after is not None:
            headers = ((b"retry-after", str(max(1, round(failure.retry_after))).encode()),)
        return cls(
            status=status,
            kind=kind,
            category=failure.category.value,
            code=failure.code or failure.category.value,
            message=failure.message,
            trace=failure_trace(exc),
            headers=headers,
            summary=str(exc),
        )

    @classmethod
    def bad_request(
        cls, code: str, message: str, *, field: str | None = None, status: int = 400
    ) -> WireError:
        return cls(
            status=status,
            kind="invalid_request_error",
            category="bad_request",
            code=code,
            message=message,
            field=field,
        )

    @classmethod
    def unavailable(cls, code: str, message: str) -> WireError:
        """Our own capacity or shutdown refuses the request (``local_capacity``, 503)."""
        return cls(
            status=503,
            kind="service_unavailable_error",
            category="local_capacity",
            code=code,
            message=message,
        )

    @classmethod
    def stopped(cls, why: Stop) -> WireError:
        """The server side cancelled the request: the client asked, left, or the server stops."""
        return cls(
            status=503,
            kind="service_unavailable_error",
            category="cancelled",
            code="server_shutdown" if why is Stop.SHUTDOWN else "cancelled",
            message=why.value,
        )

    @classmethod
    def internal(cls) -> WireError:
        """An unexpected exception in the server (logged with its traceback, never shown)."""
        return cls(
            status=500,
            kind="server_error",
            category="unknown",
            code="internal_error",
            message="the server failed to answer this request",
        )

    def http_body(self) -> dict[str, Any]:
        """OpenAI's error shape, plus the ``relayrace`` trace of a failed request."""
        body: dict[str, Any] = {
            "error": {
                "message": self.summary or self.message,
                "type": self.kind,
                "param": self.field,
                "code": self.code,
            }
        }
        if self.trace is not None:
            body["relayrace"] = self.trace
        return body

    def anthropic(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and body in Anthropic's error shape (``{"type": "error", "error":
        {"type", "message"}}``, plus the ``relayrace`` trace of a failed request); the body is
        also the data of a stream's ``error`` event."""
        if self.trace is not None:
            status, kind = _ANTHROPIC.get(Category(self.category), (500, "api_error"))
        elif self.status in _ANTHROPIC_BY_STATUS:
            status, kind = _ANTHROPIC_BY_STATUS[self.status]
        elif self.status >= 500:
            status, kind = 500, "api_error"
        else:
            status, kind = self.status, "invalid_request_error"
        message = self.summary or self.message
        if self.field is not None and self.trace is None and not message.startswith(f"{self.field}:"):
            message = f"{self.field}: {message}"
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        if self.trace is not None:
            body["relayrace"] = self.trace
        elif self.code is not None:
            body["relayrace"] = {"category": self.category, "code": self.code}
        return status, body

    def frame(self, request_id: str | int | None) -> dict[str, Any]:
        """The websocket ``error`` frame for the request ``request_id``."""
        trace = self.trace
        frame: dict[str, Any] = {
            "type": "error",
            "id": request_id,
            "category": self.category,
            "code": self.code,
            "message": self.message,
        }
        if trace is not None:
            frame["provider"] = trace["provider"]
        frame["attempts"] = [] if trace is None else trace["attempts"]
        frame["decisions"] = [] if trace is None else trace["decisions"]
        if self.field is not None:
            frame["field"] = self.field
        return frame


# --- a caller's strings ---------------------------------------------------------------------------

# A JSON text decoded from UTF-8 bytes can still hold a lone surrogate, written as an escape
# (``"\ud800"``): valid JSON, but no UTF-8 encoder can write it back. Only a text with such an
# escape (a surrogate pair included) is walked; every other text is known good at once.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def unencodable_field(text: str | bytes, value: Any) -> str | None:
    """The path (``messages[0].content``, ``params.<key>``) of the first string of ``value`` that
    UTF-8 cannot encode, a key included, or ``None``; ``text`` is the JSON ``value`` came from."""
    if isinstance(text, bytes):
        if b"\\u" not in text or not _SURROGATE_ESCAPE.search(text.decode("utf-8", "replace")):
            return None
    elif "\\u" not in text or not _SURROGATE_ESCAPE.search(text):
        return None
    return _walk(value, "")


def _walk(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return None if encodable(value) else path or "(the value)"
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not encodable(key):
                return f"{path}.(a key)" if path else "(a key)"
            found = _walk(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _walk(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def encodable(text: str) -> bool:
    """Whether UTF-8 can encode ``text`` (it holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def safe_dumps(value: Any) -> str:
    """JSON that is always writable: non-ASCII escaped, so a stray surrogate cannot stop it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)
