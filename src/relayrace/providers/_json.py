"""Small pure helpers shared by the wire formats: reading untrusted JSON, writing compact JSON,
and OpenAI-style request fields every format translates."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ._errors import MalformedStream
from ._sse import ServerSentEvent


def dumps(value: Any) -> str:
    """Compact JSON, non-ASCII kept as is (what every encoder here writes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: ``dumps`` of a string (the C encoder ``json.dumps`` itself uses with ``ensure_ascii=False``),
#: for events formatted around a JSON string rather than built as a dict per delta.
dumps_str: Callable[[str], str] = json.encoder.encode_basestring


def get(obj: Any, *path: str | int) -> Any:
    """``obj[p0][p1]…`` or ``None`` when any step is missing or of the wrong type."""
    for key in path:
        if isinstance(key, int):
            if not isinstance(obj, list) or not -len(obj) <= key < len(obj):
                return None
            obj = obj[key]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(key)
    return obj


def load_event(event: ServerSentEvent) -> dict[str, Any]:
    """The JSON object in an event's data.

    Raises:
        json.JSONDecodeError: the data is not JSON (mapped to ``stream_error``).
        MalformedStream: the data is JSON but not an object.
    """
    return expect_object(json.loads(event.data), "event")


def expect_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object.

    Raises:
        MalformedStream: it is not (code ``malformed_event`` / ``malformed_response``).
    """
    if not isinstance(value, dict):
        code = "malformed_event" if where == "event" else "malformed_response"
        raise MalformedStream(
            code, f"expected a JSON object in the {where}, got {type(value).__name__}"
        )
    return value


def as_int(value: Any) -> int:
    """A token count: a non-negative integer, or 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def text_of(content: Any) -> str:
    """The text of an OpenAI-style message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def stop_sequences(value: Any) -> list[str] | None:
    """OpenAI's ``stop`` (a string or a list of strings) as a list, or ``None``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        stops = [s for s in value if isinstance(s, str)]
        return stops or None
    return None


def max_tokens_of(params: Mapping[str, Any], default: int | None) -> int | None:
    """The request's output-token limit (``max_completion_tokens`` or ``max_tokens``)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def parse_data_url(url: str) -> tuple[str, str] | None:
    """``(media_type, base64 data)`` of a ``data:…;base64,…`` URL, or ``None``."""
    if not url.startswith("data:"):
        return None
    header, comma, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not comma or encoding != "base64" or not media_type:
        return None
    return media_type, data
