"""The values of an embeddings call: ``EmbedRequest`` (what the caller asks), ``Embedding`` (one
vector) and ``EmbeddingsReply`` (the answer, with who served it and why).

Kept apart from ``_values`` (the chat values) because they are a second kind of call; they share
its model-name check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from ._errors import BadRequest
from ._failure import Category, Failure
from ._record import Attempt, Decision
from ._values import Usage, _check_metadata, _check_model

#: how the gateway writes a vector: a JSON list of numbers, or OpenAI's base64 of
#: little-endian float32.
ENCODING_FORMATS = ("float", "base64")
#: the most inputs one request may carry (OpenAI's own limit).
MAX_INPUTS = 2048
#: the most characters of one input (a bound on memory, well past any model's context).
MAX_INPUT_CHARS = 1_000_000


def _check_input(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
        raise BadRequest("input", "expected a string or a list of strings")
    if not value:
        raise BadRequest("input", "expected at least one string")
    if len(value) > MAX_INPUTS:
        raise BadRequest("input", f"expected at most {MAX_INPUTS} strings")
    for i, text in enumerate(value):
        field = f"input[{i}]"
        if not isinstance(text, str):
            # Token arrays (lists of integers) are OpenAI-only and would not fail over.
            raise BadRequest(field, "expected a string (token arrays are not accepted)")
        if not text.strip():
            raise BadRequest(field, "expected a non-empty string")
        if len(text) > MAX_INPUT_CHARS:
            raise BadRequest(field, f"expected at most {MAX_INPUT_CHARS} characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(field, "not valid Unicode (a lone surrogate)") from None
    return tuple(value)


def _check_dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
        raise BadRequest("dimensions", "expected a positive integer (at most 65536)")
    return value


def _check_encoding(value: Any) -> Literal["float", "base64"]:
    if value is None:
        return "float"
    if value not in ENCODING_FORMATS:
        raise BadRequest("encoding_format", f"expected one of {', '.join(ENCODING_FORMATS)}")
    return value


@attrs.frozen(init=False)
class EmbedRequest:
    """An embeddings request.

    Args:
        model: the name of a route; only its providers that declare ``embeddings`` are asked.
        input: one string or a list of strings (at most ``MAX_INPUTS``), each non-empty.
        dimensions: the length of the vectors to ask for (``None``: the model's own).
        encoding_format: how the gateway writes the vectors (``float`` or ``base64``); the
            Python API always gives floats.
        metadata: free-form data carried along for the caller (never sent upstream).

    Raises:
        BadRequest: the request is malformed; ``field`` names the offending part.
    """

    model: str
    input: tuple[str, ...]
    dimensions: int | None
    encoding_format: Literal["float", "base64"]
    metadata: Mapping[str, Any]

    def __init__(
        self,
        model: str,
        input: str | Sequence[str],
        *,
        dimensions: int | None = None,
        encoding_format: Literal["float", "base64"] = "float",
        metadata: Mapping[str, Any] | None = None,
    ):
        self.__attrs_init__(
            _check_model(model),
            _check_input(input),
            _check_dimensions(dimensions),
            _check_encoding(encoding_format),
            _check_metadata(metadata),
        )


@attrs.frozen
class Embedding:
    """One vector: ``index`` is the position of its input in the request."""

    index: int
    vector: tuple[float, ...]


@attrs.frozen(kw_only=True)
class EmbeddingsReply:
    """The answer to an ``EmbedRequest``.

    Attributes:
        embeddings: one ``Embedding`` per input, in the order of the inputs.
        provider: the name of the actor that served it.
        model: the upstream model that answered.
        usage: the tokens of the inputs (``prompt_tokens``), when the provider gave them.
        attempts: every try, in order (the last one succeeded).
        decisions: every decision made on the way (the providers without ``embeddings``
            skipped first).
        request_id: the supervisor's id for this request.
    """

    embeddings: tuple[Embedding, ...]
    provider: str
    model: str
    usage: Usage | None
    attempts: tuple[Attempt, ...]
    decisions: tuple[Decision, ...]
    request_id: int = 0

    @property
    def vectors(self) -> tuple[tuple[float, ...], ...]:
        """The vectors alone, in the order of the inputs."""
        return tuple(e.vector for e in self.embeddings)


def no_vectors(provider: str) -> Failure:
    """The failure of an embeddings attempt whose client answered it like a chat call (a
    client with no ``embed``: a ``relayrace.testing.ScriptedClient``, a custom client)."""
    return Failure(
        category=Category.STREAM_ERROR,
        code="malformed_response",
        message="the provider answered an embeddings call without vectors",
        provider=provider,
    )
