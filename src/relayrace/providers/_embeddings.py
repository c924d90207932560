"""The embeddings wire formats, pure: OpenAI's ``POST /embeddings`` and Gemini's
``POST /{version}/models/{model}:batchEmbedContents`` — payloads, reply readers and encoders
(the gateway and the mock write replies with the encoders).

Errors are those of each provider's chat API (same bodies, same statuses): a non-2xx answer is
classified like a chat one, and an ``{"error": …}`` body inside a 200 is an
``UpstreamErrorBody``. A reply that cannot be read (no vectors, a count that does not match the
inputs, a vector of the wrong length or with something other than finite numbers) is a
``MalformedStream`` of code ``malformed_response``. Anthropic has no embeddings API.
"""

from __future__ import annotations

import base64
import math
import struct
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .._values import Usage
from ._errors import MalformedStream, UpstreamErrorBody
from ._gemini import API_VERSION
from ._json import as_int, expect_object, get

#: the path of OpenAI's endpoint under the API root (``…/v1``).
OPENAI_PATH = "/embeddings"

Vector = tuple[float, ...]
#: what a reader gives: the vectors (in input order), the upstream model if named, the usage.
Answer = tuple[tuple[Vector, ...], str | None, Usage | None]


def encode_vector(vector: Sequence[float], encoding_format: str = "float") -> list[float] | str:
    """A vector as OpenAI writes it: a list of numbers, or (``base64``) the base64 of its
    little-endian float32 values."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


def vector_of(values: Any) -> Vector | None:
    """A vector read from the wire: a non-empty list of finite numbers, or OpenAI's base64 of
    little-endian float32; ``None`` if it is neither."""
    floats: Sequence[Any]
    if isinstance(values, str):
        try:
            raw = base64.b64decode(values, validate=True)
        except ValueError:
            return None
        if len(raw) % 4:
            return None
        floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    elif isinstance(values, list):
        floats = values
    else:
        return None
    if not floats:
        return None
    # The common case in one pass in C (every value a float), ints converted otherwise; a sum
    # that is not finite means an inf or a NaN (or values near 1e308: no embedding's).
    if all(type(x) is float for x in floats):
        vector = tuple(floats)
    elif all(type(x) is float or type(x) is int for x in floats):
        vector = tuple(map(float, floats))
    else:
        return None
    return vector if math.isfinite(sum(vector)) else None


def _malformed(message: str) -> MalformedStream:
    return MalformedStream("malformed_response", message)


def _checked(vectors: list[Vector], count: int, dimensions: int | None) -> tuple[Vector, ...]:
    if len(vectors) != count:
        raise _malformed(f"{len(vectors)} vectors for {count} inputs")
    if dimensions is not None:
        for vector in vectors:
            if len(vector) != dimensions:
                raise _malformed(f"a vector of {len(vector)} dimensions, {dimensions} asked for")
    return tuple(vectors)


# --- OpenAI -------------------------------------------------------------------------------------


def openai_payload(
    inputs: Sequence[str],
    *,
    model: str,
    dimensions: int | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of ``POST /embeddings``: always floats from upstream (the gateway writes base64
    itself when asked), so that every provider's vectors are read the same way."""
    body: dict[str, Any] = {**(extra_body or {}), "model": model, "input": list(inputs)}
    body["encoding_format"] = "float"
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def openai_reply(body: Any, *, count: int, dimensions: int | None = None) -> Answer:
    """Read OpenAI's reply to ``count`` inputs: ``data[i].embedding`` (numbers or base64) by
    ``data[i].index``, ``model``, ``usage.prompt_tokens``; each vector ``dimensions`` long
    when that was asked for.

    Raises:
        UpstreamErrorBody: the body is an error.
        MalformedStream: the body cannot be read as vectors for the request.
    """
    body = expect_object(body, "response")
    if body.get("error"):
        raise UpstreamErrorBody(body)
    data = body.get("data")
    if not isinstance(data, list):
        raise _malformed("the response has no 'data' list")
    indexed: list[tuple[int, Vector]] = []
    for position, item in enumerate(data):
        index = get(item, "index")
        if index is None:
            index = position
        if isinstance(index, bool) or not isinstance(index, int):
            raise _malformed(f"data[{position}].index is not an integer")
        vector = vector_of(get(item, "embedding"))
        if vector is None:
            raise _malformed(f"data[{position}].embedding is not a vector")
        indexed.append((index, vector))
    indexed.sort(key=lambda pair: pair[0])
    if [index for index, _ in indexed] != list(range(len(indexed))):
        raise _malformed("the indexes of 'data' are not 0, 1, 2…")
    vectors = [vector for _, vector in indexed]
    model = body.get("model")
    prompt = get(body, "usage", "prompt_tokens")
    usage = Usage(prompt_tokens=as_int(prompt)) if prompt is not None else None
    model = model if isinstance(model, str) else None
    return _checked(vectors, count, dimensions), model, usage


def openai_embeddings(
    vectors: Sequence[Sequence[float]],
    *,
    model: str,
    usage: Usage | None = None,
    encoding_format: str = "float",
) -> dict[str, Any]:
    """OpenAI's reply (``object: list``), vectors as numbers or base64."""
    prompt = usage.prompt_tokens if usage is not None else 0
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


# --- Gemini -------------------------------------------------------------------------------------


def gemini_path(model: str, *, api_version: str = API_VERSION) -> str:
    """The path of ``batchEmbedContents`` under the API root."""
    name = urllib.parse.quote(model.removeprefix("models/"), safe="")
    return f"/{api_version}/models/{name}:batchEmbedContents"


def gemini_payload(
    inputs: Sequence[str],
    *,
    model: str,
    dimensions: int | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of ``batchEmbedContents``: one request per input, each naming the model."""
    name = model if model.startswith("models/") else f"models/{model}"
    requests = []
    for text in inputs:
        one: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            one["outputDimensionality"] = dimensions
        requests.append(one)
    return {**(extra_body or {}), "requests": requests}


def gemini_reply(body: Any, *, count: int, dimensions: int | None = None) -> Answer:
    """Read Gemini's reply to ``count`` inputs: ``embeddings[i].values`` in input order (it
    names no model and reports no usage).

    Raises:
        UpstreamErrorBody: the body is an error.
        MalformedStream: the body cannot be read as vectors for the request.
    """
    body = expect_object(body, "response")
    if body.get("error"):
        raise UpstreamErrorBody(body)
    items = body.get("embeddings")
    if not isinstance(items, list):
        raise _malformed("the response has no 'embeddings' list")
    vectors: list[Vector] = []
    for index, item in enumerate(items):
        values = get(item, "values")
        vector = None if isinstance(values, str) else vector_of(values)  # numbers only
        if vector is None:
            raise _malformed(f"embeddings[{index}].values is not a vector")
        vectors.append(vector)
    return _checked(vectors, count, dimensions), None, None


def gemini_embeddings(vectors: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Gemini's reply to ``batchEmbedContents``."""
    return {"embeddings": [{"values": list(vector)} for vector in vectors]}


def gemini_inputs(payload: Any) -> list[str] | None:
    """The texts of a ``batchEmbedContents`` body (the mock reads them), or ``None`` if it is
    not one."""
    requests = get(payload, "requests")
    if not isinstance(requests, list) or not requests:
        return None
    texts = []
    for one in requests:
        parts = get(one, "content", "parts")
        if not isinstance(parts, list) or not parts:
            return None
        text = "".join(str(get(part, "text") or "") for part in parts)
        texts.append(text)
    return texts
