"""The one place where every foreign failure of an attempt becomes a ``ProviderError``.

``map_provider_errors`` wraps an attempt: httpx's exceptions, JSON and UTF-8 errors, a status
other than 2xx (``UpstreamStatus``) and what the wire formats' readers raise
(``UpstreamErrorBody``, ``MalformedStream``) leave it as a ``ProviderError`` carrying a
classified ``Failure``, chained to the original exception.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import attrs
import httpx

from .._errors import ProviderError
from .._failure import Category, Failure
from .._ratelimit import RateLimits, read_rate_limits
from .._redact import redact
from ..providers import MalformedStream, UpstreamErrorBody, classify


class UpstreamStatus(Exception):
    """The provider answered with a status other than 2xx (mapped by ``map_provider_errors``)."""

    def __init__(self, status: int, content: bytes, headers: Mapping[str, str]):
        super().__init__(status)
        self.status = status
        self.content = content
        self.headers = headers


@attrs.define
class AttemptState:
    """What the error mapping needs to know about the attempt in progress."""

    stream: bool
    response_started: bool = False
    finished: bool = False
    #: the rate-limit headers of the provider's answer, once read (an error status's, or a
    #: 2xx's before its body failed): the failure carries them (``Failure.limits``)
    limits: RateLimits | None = None


class map_provider_errors:  # noqa: N801  (used as a function: ``with map_provider_errors(...)``)
    """The one boundary where every foreign failure of an attempt becomes a ``ProviderError``.

    ================================  =================================================
    raised inside                     failure
    ================================  =================================================
    ``UpstreamStatus``                ``classify`` of the status, error body, headers
    ``UpstreamErrorBody``             ``classify`` of the body (an error in a 200)
    ``MalformedStream``               ``stream_error`` with its code (``stream_cut``…)
    ``httpx.TimeoutException``        ``timeout`` (``connect_timeout``…)
    ``httpx.ConnectError``            ``network`` / ``connect_error``; from an ``OSError``
                                      of exhaustion: ``local_capacity`` /
                                      ``local_resources``
    ``OSError`` (EMFILE, ENFILE,      ``local_capacity`` / ``local_resources`` (no penalty
    ENOMEM, ENOBUFS)                  to the provider); other ``OSError``: ``network`` /
                                      ``os_error``
    ``httpx.NetworkError``,           before the response: ``network``; mid-stream:
    ``httpx.RemoteProtocolError``     ``stream_error`` / ``stream_cut``
    ``httpx.DecodingError``, JSON,    ``stream_error`` (``malformed_json``…)
    UTF-8 errors
    other ``httpx`` errors            ``unknown``
    ================================  =================================================

    Every failure of an answer whose rate-limit headers were read (``AttemptState.limits``: an
    error status's, or a 2xx's whose body then failed) carries them in ``Failure.limits``.

    A transport error after the stream has given its finish reason is not a failure: the answer
    is complete, so the error is swallowed and the caller goes on to return it. ``trio.Cancelled``
    passes through untouched.

    Args:
        state: the attempt's progress (response started, finish reason seen).
        label: the client family (``openai``), used in messages.
        provider: the actor's name, stamped on the failure.
        secrets: strings masked in every message (the API key).

    Raises:
        ProviderError: carrying the classified ``Failure``, chained to the original exception.
    """

    # A class, not ``contextlib.contextmanager``: a stream holds its boundary while it is read,
    # and a suspended generator, its frame and its arguments cost ~1 KB per stream in flight.
    __slots__ = ("_state", "_label", "_provider", "_secrets")

    def __init__(
        self, state: AttemptState, *, label: str, provider: str, secrets: Sequence[str] = ()
    ):
        self._state = state
        self._label = label
        self._provider = provider
        self._secrets = secrets

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # trio.Cancelled (a BaseException) passes through untouched
        error = _provider_error(exc, self._state, self._label, self._provider, self._secrets)
        if error is None:
            return False
        if isinstance(error, _Swallowed):
            return True
        if self._state.limits is not None:
            # The provider's own headers, learned like a success's (the admission).
            error = ProviderError(attrs.evolve(error.failure, limits=self._state.limits))
        raise error from exc


class _Swallowed:
    """The answer was whole before the error: no failure."""


_SWALLOWED = _Swallowed()


def _provider_error(
    exc: Exception, state: AttemptState, label: str, provider: str, secrets: Sequence[str]
) -> ProviderError | _Swallowed | None:
    """The ``ProviderError`` that ``exc`` becomes; ``_SWALLOWED``: none (the answer was
    whole); ``None``: not ours to map."""
    if isinstance(exc, UpstreamStatus):
        now = time.time()
        failure = classify(
            status=exc.status,
            body=_parse_error_body(exc.content),
            headers=exc.headers,
            provider=provider or None,
            now=now,
            secrets=secrets,
        )
        # Only the provider's response headers, never anything of the request.
        state.limits = read_rate_limits(exc.headers, now)
        return ProviderError(_checked(failure, label, provider, secrets))
    if isinstance(exc, UpstreamErrorBody):
        failure = classify(
            status=None, body=exc.body, provider=provider or None, now=time.time(), secrets=secrets
        )
        return ProviderError(_checked(failure, label, provider, secrets))
    if isinstance(exc, MalformedStream):
        failure = attempt_failure(
            Category.STREAM_ERROR, exc.code, exc.message, label, provider, secrets
        )
        return ProviderError(failure)
    if isinstance(exc, httpx.TimeoutException):
        code = {
            httpx.ConnectTimeout: "connect_timeout",
            httpx.WriteTimeout: "write_timeout",
            httpx.PoolTimeout: "pool_timeout",
        }.get(type(exc), "read_timeout")
        failure = attempt_failure(
            Category.TIMEOUT, code, describe("timed out", exc), label, provider, secrets
        )
        return ProviderError(failure)
    if isinstance(exc, (httpx.ConnectError, httpx.ProxyError)):
        what = describe("cannot connect", exc)
        if _exhausted(exc):
            failure = attempt_failure(
                Category.LOCAL_CAPACITY, "local_resources", what, label, provider, secrets
            )
        else:
            failure = attempt_failure(
                Category.NETWORK, "connect_error", what, label, provider, secrets
            )
        return ProviderError(failure)
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        if state.finished:
            # The answer was complete before the connection went: nothing was lost.
            return _SWALLOWED
        if not state.response_started:
            category, code = Category.NETWORK, "connection_lost"
            what = describe("connection lost before the response", exc)
        elif state.stream:
            category, code = Category.STREAM_ERROR, "stream_cut"
            what = describe("stream cut before its end", exc)
        else:
            category, code = Category.NETWORK, "incomplete_body"
            what = describe("connection lost while reading the response", exc)
        return ProviderError(attempt_failure(category, code, what, label, provider, secrets))
    if isinstance(exc, httpx.DecodingError):
        what = describe("cannot decode the body", exc)
        failure = attempt_failure(
            Category.STREAM_ERROR, "decoding_error", what, label, provider, secrets
        )
        return ProviderError(failure)
    if isinstance(exc, (httpx.HTTPError, httpx.InvalidURL)):
        what = describe("HTTP error", exc)
        failure = attempt_failure(
            Category.UNKNOWN, type(exc).__name__, what, label, provider, secrets
        )
        return ProviderError(failure)
    if isinstance(exc, OSError):
        # Raised bare by a transport, or while building the client (loading the CA bundle):
        # our own exhaustion (no fault of the provider's), or the network.
        if _exhausted(exc):
            what = describe("out of local resources", exc)
            category, code = Category.LOCAL_CAPACITY, "local_resources"
        else:
            what = describe("OS error", exc)
            category, code = Category.NETWORK, "os_error"
        return ProviderError(attempt_failure(category, code, what, label, provider, secrets))
    if isinstance(exc, (ValueError, RecursionError)):
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError is JSON
        # nested beyond reason. The request is encoded before this block is entered.
        code = "malformed_text" if isinstance(exc, UnicodeDecodeError) else "malformed_json"
        what = describe("malformed response", exc)
        failure = attempt_failure(Category.STREAM_ERROR, code, what, label, provider, secrets)
        return ProviderError(failure)
    return None


#: ``OSError`` numbers that say this process (or machine) is out of a resource.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _exhausted(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is an ``OSError`` of exhaustion
    (httpcore raises ``ConnectError`` from the ``OSError`` of a socket it could not open)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno in _EXHAUSTED:
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _parse_error_body(content: bytes) -> Any:
    text = content.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def describe(what: str, exc: BaseException) -> str:
    """``what`` happened, and the exception that says so (its type and text)."""
    detail = str(exc) or type(exc).__name__
    return f"{what} ({type(exc).__name__}: {detail})"


def attempt_failure(
    category: Category,
    code: str,
    message: str,
    label: str,
    provider: str,
    secrets: Sequence[str],
) -> Failure:
    """A failure of our own making (not classified from a provider's body), its message
    labelled with the client family and the secrets masked."""
    # Our message may quote the provider (an exception's text): never a lone surrogate on.
    message = message.encode("utf-8", "replace").decode("utf-8")
    return Failure(
        category=category,
        code=code,
        message=redact(f"{label}: {message}", secrets),
        provider=provider or None,
    )


def _checked(failure: Failure, label: str, provider: str, secrets: Sequence[str]) -> Failure:
    """A classified error, unless its text (the provider's message or code) cannot be encoded:
    then the provider's response is malformed (``stream_error`` / ``malformed_text``), and its
    text is not passed on."""
    try:
        (failure.message or "").encode("utf-8")
        (failure.code or "").encode("utf-8")
    except UnicodeEncodeError:
        what = "an error whose message or code is not valid Unicode (a lone surrogate)"
        bad = attempt_failure(
            Category.STREAM_ERROR, "malformed_text", what, label, provider, secrets
        )
        return attrs.evolve(bad, status=failure.status)
    return _labelled(failure, label, secrets)


def _labelled(failure: Failure, label: str, secrets: Sequence[str]) -> Failure:
    message = failure.message or (f"HTTP {failure.status}" if failure.status else "error")
    return attrs.evolve(failure, message=redact(f"{label}: {message}", secrets))
