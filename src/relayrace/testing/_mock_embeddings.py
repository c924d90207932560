"""The embeddings APIs as the mock provider speaks them: OpenAI's ``POST /embeddings`` and
Gemini's ``:batchEmbedContents``, answered with deterministic vectors made from each input's
text (the same text, the same vector, on every run). Faults come from the model name as for
chat (``server-error``, ``hang``, ``malformed``…); the replies are written by
``relayrace.providers.embeddings``."""

from __future__ import annotations

import hashlib
from typing import Any

from .._values import Usage
from ..providers import embeddings
from ._mock_formats import Gemini, OpenAI, Reply

#: the length of a vector when the request asks for none.
MOCK_DIMENSIONS = 8


def mock_vector(text: str, dimensions: int = MOCK_DIMENSIONS) -> tuple[float, ...]:
    """The mock's vector of ``text``: values in [-1, 1) made from its SHA-256, multiples of
    1/128 (exact in float32, so that base64 and JSON carry the same numbers)."""
    out: list[float] = []
    block = 0
    while len(out) < dimensions:
        digest = hashlib.sha256(f"{block}:{text}".encode()).digest()
        out.extend((byte - 128) / 128 for byte in digest)
        block += 1
    return tuple(out[:dimensions])


def _dimensions(value: Any) -> int | None:
    if value is None:
        return MOCK_DIMENSIONS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        return None
    return value


def _vectors(texts: list[str], dimensions: int) -> list[tuple[float, ...]]:
    return [mock_vector(text, dimensions) for text in texts]


def _words(texts: list[str]) -> int:
    return max(1, sum(len(text.split()) for text in texts))


class OpenAIEmbeddings(OpenAI):
    """``POST /v1/embeddings``."""

    def check(self, payload: Any) -> str | None:
        if not isinstance(payload, dict):
            return "the request body must be a JSON object"
        if not isinstance(payload.get("model"), str):
            return "model: expected a string"
        texts = payload.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            return "input: expected a string or a non-empty list of strings"
        if not all(isinstance(text, str) and text for text in texts):
            return "input: expected non-empty strings"
        if _dimensions(payload.get("dimensions")) is None:
            return "dimensions: expected an integer from 1 to 4096"
        if payload.get("encoding_format", "float") not in ("float", "base64"):
            return "encoding_format: expected float or base64"
        return None

    def answer(self, r: Reply) -> Any:
        payload = r.payload
        texts = payload["input"]
        texts = [texts] if isinstance(texts, str) else texts
        dimensions = _dimensions(payload.get("dimensions")) or MOCK_DIMENSIONS
        return embeddings.openai_embeddings(
            _vectors(texts, dimensions),
            model=r.model,
            usage=Usage(prompt_tokens=_words(texts)),
            encoding_format=payload.get("encoding_format", "float"),
        )


class GeminiEmbeddings(Gemini):
    """``POST /v1beta/models/{model}:batchEmbedContents``."""

    def check(self, payload: Any) -> str | None:
        texts = embeddings.gemini_inputs(payload)
        if texts is None:
            return "requests: expected a non-empty list of {model, content: {parts: [{text}]}}"
        for i, one in enumerate(payload["requests"]):
            if not isinstance(one.get("model"), str) or not one["model"].startswith("models/"):
                return f"requests[{i}].model: expected 'models/NAME'"
            if _dimensions(one.get("outputDimensionality")) is None:
                return f"requests[{i}].outputDimensionality: expected an integer from 1 to 4096"
        return None

    def answer(self, r: Reply) -> Any:
        payload = r.payload
        texts = embeddings.gemini_inputs(payload) or []
        vectors = [
            mock_vector(text, _dimensions(one.get("outputDimensionality")) or MOCK_DIMENSIONS)
            for text, one in zip(texts, payload["requests"], strict=True)
        ]
        return embeddings.gemini_embeddings(vectors)


OPENAI_EMBEDDINGS = OpenAIEmbeddings()
GEMINI_EMBEDDINGS = GeminiEmbeddings()
