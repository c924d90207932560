"""The values that flow through relayrace: requests, deltas, replies, attempts and decisions.

All are frozen. ``Request`` validates itself on construction and raises ``BadRequest``, so an
invalid request never reaches a provider.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._errors import BadRequest

# The records of a request's history live in ``_record`` (which ``_errors`` needs without
# needing ``Request``); they are re-exported here for the modules that read them with it.
from ._record import Action as Action
from ._record import Attempt as Attempt
from ._record import Decision as Decision
from ._record import Outcome as Outcome
from ._record import Rule as Rule
from ._record import Scope as Scope
from ._usage import Usage as Usage

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# Parameters we understand and check; anything else is passed through to the provider untouched.
_NUMBER_PARAMS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_COUNT_PARAMS = ("max_tokens", "max_completion_tokens", "n", "seed")
_MAX_MODEL_LENGTH = 256
# Nesting deeper than this in a message, params or metadata is refused (and a structure that
# contains itself ends here instead of in a RecursionError).
_MAX_DEPTH = 64


def _encodes(text: str) -> bool:
    """Can ``text`` be encoded as UTF-8 (it holds no lone surrogate)?"""
    if text.isascii():  # O(1) in CPython: the common case walks nothing
        return True
    try:
        # UTF-16 refuses exactly what UTF-8 refuses (a surrogate code point) and encodes BMP
        # text 5x faster, since it copies code units instead of building byte sequences.
        text.encode("utf-16-le")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(value: Any, depth: int = 0) -> list[str] | None:
    """Find a string that cannot be encoded as UTF-8 (a lone surrogate) in ``value``, walking
    strings, mapping keys and values, lists and tuples.

    Returns ``None`` if every string is fine, else the path to the first bad one as parts in
    reverse order (``[".text", "[0]"]``), built only on the way back from a failure so that a
    valid request pays for one pass over its strings and no path strings. A bad mapping key is
    reported as ``"#key"`` at its mapping (the key itself cannot be named); nesting deeper than
    ``_MAX_DEPTH`` as ``"#depth"``.
    """
    # Exact type checks first: isinstance against the Mapping ABC costs ~0.1 µs a call.
    cls = type(value)
    if cls is str or isinstance(value, str):
        return None if _encodes(value) else []
    is_mapping = cls is dict or (
        cls is not list and cls is not tuple and isinstance(value, Mapping)
    )
    if not is_mapping and not isinstance(value, (list, tuple)):
        return None
    if depth >= _MAX_DEPTH:
        return ["#depth"]
    found: list[str] | None
    if is_mapping:
        for key, item in value.items():
            if (type(key) is str or isinstance(key, str)) and not _encodes(key):
                return ["#key"]
            if type(item) is str:
                if _encodes(item):
                    continue
                found = []
            else:
                found = _bad_text(item, depth + 1)
                if found is None:
                    continue
            found.append(_key_part(key))
            return found
    else:
        for i, item in enumerate(value):
            if type(item) is str:
                if _encodes(item):
                    continue
                found = []
            else:
                found = _bad_text(item, depth + 1)
                if found is None:
                    continue
            found.append(f"[{i}]")
            return found
    return None


def _key_part(key: Any) -> str:
    if isinstance(key, str) and key.isidentifier() and len(key) <= 64:
        return f".{key}"
    # Quoted and cut so that the field name itself stays short and encodable (repr escapes
    # what is not printable).
    return f"[{(key[:32] if isinstance(key, str) else key)!r}]"


def _check_text(value: Any, field: str, index: int | None = None) -> None:
    """Raise ``BadRequest`` naming the first string in ``value`` that is not valid text.

    Raises:
        BadRequest: a string (or a mapping key) cannot be encoded as UTF-8, or the structure
            nests deeper than ``_MAX_DEPTH``.
    """
    found = _bad_text(value)
    if found is None:
        return
    if index is not None:  # formatted only on failure
        field = f"{field}[{index}]"
    problem = "expected valid text (a lone surrogate cannot be encoded as UTF-8)"
    if found and found[0] == "#key":
        found = found[1:]
        problem = "expected keys that are valid text (a lone surrogate cannot be encoded as UTF-8)"
    elif found and found[0] == "#depth":
        found = found[1:]
        problem = f"expected at most {_MAX_DEPTH} levels of nesting"
    raise BadRequest(field + "".join(reversed(found)), problem)


def _check_messages(messages: Any) -> tuple[Mapping[str, Any], ...]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise BadRequest("messages", "expected a list of messages")
    if not messages:
        raise BadRequest("messages", "expected at least one message")
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{i}]", "expected an object with 'role' and 'content'")
        _check_text(message, "messages", i)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"messages[{i}].role", f"expected one of {', '.join(sorted(ROLES))}")
        content = message.get("content")
        if role == "assistant" and "tool_calls" in message:
            _check_message_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls", call_ids)
            if content is None:
                continue
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise BadRequest(
                    f"messages[{i}].tool_call_id",
                    "expected the id of a tool call of an earlier assistant message",
                )
        if isinstance(content, str):
            continue
        if isinstance(content, list) and all(isinstance(part, Mapping) for part in content):
            continue
        raise BadRequest(f"messages[{i}].content", "expected a string or a list of content parts")
    return tuple(messages)


def _check_message_tool_calls(calls: Any, field: str, call_ids: set[str]) -> None:
    """An assistant message's ``tool_calls``: ids (recorded in ``call_ids``), function names
    and arguments that are JSON text."""
    if not isinstance(calls, list) or not calls:
        raise BadRequest(field, "expected a non-empty list of tool calls")
    for j, call in enumerate(calls):
        at = f"{field}[{j}]"
        if not isinstance(call, Mapping):
            raise BadRequest(at, "expected an object with 'id', 'type' and 'function'")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise BadRequest(f"{at}.id", "expected a non-empty string")
        if call.get("type", "function") != "function":
            raise BadRequest(f"{at}.type", "expected 'function'")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise BadRequest(f"{at}.function", "expected an object with 'name' and 'arguments'")
        _check_name(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str) or not _is_json(arguments):
            raise BadRequest(f"{at}.function.arguments", "expected a string of JSON")
        call_ids.add(call_id)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _check_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_MODEL_LENGTH:
        raise BadRequest(field, "expected a non-empty function name")
    return name


_TOOL_CHOICES = ("none", "auto", "required")
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_agent_params(params: Mapping[str, Any]) -> None:
    """The agent surface of the params: ``tools``, ``tool_choice``, ``parallel_tool_calls``,
    ``response_format``, ``logprobs`` / ``top_logprobs``."""
    names: set[str] = set()
    tools = params.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("params.tools", "expected a list of tools")
        for i, tool in enumerate(tools):
            at = f"params.tools[{i}]"
            if not isinstance(tool, Mapping) or tool.get("type") != "function":
                raise BadRequest(at, "expected {'type': 'function', 'function': {...}}")
            function = tool.get("function")
            if not isinstance(function, Mapping):
                raise BadRequest(f"{at}.function", "expected an object with a 'name'")
            name = _check_name(function.get("name"), f"{at}.function.name")
            if name in names:
                raise BadRequest(f"{at}.function.name", f"{name!r} is declared twice")
            names.add(name)
            if "description" in function and not isinstance(function["description"], str):
                raise BadRequest(f"{at}.function.description", "expected a string")
            schema = function.get("parameters")
            if schema is not None and not _is_schema(schema):
                raise BadRequest(f"{at}.function.parameters", "expected a JSON schema object")
    if "tool_choice" in params:
        choice = params["tool_choice"]
        if isinstance(choice, Mapping):
            function = choice.get("function")
            chosen = function.get("name") if isinstance(function, Mapping) else None
            if (
                choice.get("type") != "function"
                or not isinstance(chosen, str)
                or chosen not in names
            ):
                raise BadRequest(
                    "params.tool_choice", "expected a function that params.tools declares"
                )
        elif choice not in _TOOL_CHOICES:
            raise BadRequest(
                "params.tool_choice", "expected none, auto, required or a declared function"
            )
        elif choice == "required" and not names:
            raise BadRequest("params.tool_choice", "'required' needs params.tools")
    if "parallel_tool_calls" in params and not isinstance(params["parallel_tool_calls"], bool):
        raise BadRequest("params.parallel_tool_calls", "expected true or false")
    if "response_format" in params:
        _check_response_format(params["response_format"])
    if "logprobs" in params and not isinstance(params["logprobs"], bool | None):
        raise BadRequest("params.logprobs", "expected true or false")
    if "top_logprobs" in params:
        top = params["top_logprobs"]
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise BadRequest("params.top_logprobs", "expected an integer from 0 to 20")
        if not params.get("logprobs"):
            raise BadRequest("params.top_logprobs", "needs params.logprobs to be true")


def _is_schema(schema: Any) -> bool:
    return isinstance(schema, Mapping) and schema.get("type", "object") == "object"


def _check_response_format(value: Any) -> None:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind not in _RESPONSE_FORMATS:
        raise BadRequest("params.response_format.type", "expected text, json_object or json_schema")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise BadRequest("params.response_format.json_schema", "expected an object")
        _check_name(spec.get("name"), "params.response_format.json_schema.name")
        if not isinstance(spec.get("schema"), Mapping):
            raise BadRequest(
                "params.response_format.json_schema.schema", "expected a JSON schema object"
            )


def _check_params(params: Any) -> Mapping[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise BadRequest("params", "expected an object")
    for key, (low, high) in _NUMBER_PARAMS.items():
        if key in params:
            value = params[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not low <= value <= high
            ):
                raise BadRequest(f"params.{key}", f"expected a number from {low} to {high}")
    for key in _COUNT_PARAMS:
        if key in params:
            value = params[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if key == "seed" else 1)
            ):
                raise BadRequest(f"params.{key}", "expected a positive integer")
    if "stop" in params:
        stop = params["stop"]
        if not (
            stop is None
            or isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise BadRequest("params.stop", "expected a string or a list of strings")
    if "stream" in params:
        raise BadRequest("params.stream", "is chosen by the call (complete or stream), not a param")
    if params:
        _check_text(params, "params")
        _check_agent_params(params)
    return dict(params)


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model", "expected a non-empty string naming a route")
    if len(model) > _MAX_MODEL_LENGTH:
        raise BadRequest("model", f"expected at most {_MAX_MODEL_LENGTH} characters")
    _check_text(model, "model")
    return model


def _check_metadata(metadata: Any) -> Mapping[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise BadRequest("metadata", "expected an object")
    if metadata:
        _check_text(metadata, "metadata")
    return dict(metadata)


@attrs.frozen(init=False)
class Request:
    """A chat request.

    Args:
        model: the name of a route (``Config.routes``); the route picks the provider chain.
        messages: OpenAI-style messages (``{"role": ..., "content": ...}``).
        params: generation parameters passed to the provider (``temperature``, ``max_tokens``…).
        metadata: free-form data carried along for the caller (never sent upstream).

    Raises:
        BadRequest: the request is malformed; ``field`` names the offending part.
    """

    model: str
    messages: tuple[Mapping[str, Any], ...]
    params: Mapping[str, Any]
    metadata: Mapping[str, Any]

    def __init__(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        params: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        self.__attrs_init__(
            _check_model(model),
            _check_messages(messages),
            _check_params(params),
            _check_metadata(metadata),
        )


@attrs.frozen
class ToolCall:
    """A whole tool call of an answer.

    Attributes:
        index: its place among the answer's tool calls (0, 1, 2…).
        id: the call's id (the upstream's, or one we made for a provider that sends none).
        name: the function to call.
        arguments: the arguments as JSON text (checked to parse).
        type: always ``function``.
    """

    index: int
    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        """The call in OpenAI's shape (an item of ``message.tool_calls``)."""
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }


@attrs.frozen
class ToolCallDelta:
    """A fragment of a streamed tool call: ``id`` and ``name`` on a call's first fragment,
    then pieces of its ``arguments`` JSON text. ``index`` says which call it belongs to; it is
    assigned by relayrace (0, 1, 2… per answer), so two calls never share one."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The fragment in OpenAI's shape (an item of ``delta.tool_calls``)."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


def tool_calls_of(fragments: Iterable[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The whole tool calls that ``fragments`` make, by index, in order of index (a call's
    id and name are the first given; its arguments are its fragments' joined)."""
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for fragment in fragments:
        index = fragment.index
        pieces = arguments.setdefault(index, [])
        if fragment.id is not None and index not in ids:
            ids[index] = fragment.id
        if fragment.name is not None and index not in names:
            names[index] = fragment.name
        if fragment.arguments:
            pieces.append(fragment.arguments)
    return tuple(
        ToolCall(index, ids.get(index, f"call_{index}"), names.get(index, ""), "".join(pieces))
        for index, pieces in sorted(arguments.items())
    )


@attrs.frozen
class Delta:
    """A piece of the answer as it streams: ``seq`` counts from 0 for each request.

    A delta carries text, tool-call fragments (``tool_calls``), or both.
    """

    seq: int
    text: str
    provider: str
    tool_calls: tuple[ToolCallDelta, ...] = ()


@attrs.frozen(kw_only=True)
class Choice:
    """One choice of an answer asked for with ``n > 1`` (see ``Reply.choices``)."""

    index: int
    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None
    refusal: str | None = None
    logprobs: Mapping[str, Any] | None = None


@attrs.frozen(kw_only=True)
class Reply:
    """A complete answer.

    Attributes:
        text: the whole answer; empty when ``text_kept`` is ``False``.
        provider: the name of the actor that served it.
        model: the upstream model that actually answered.
        usage: token counts, when the provider gave them.
        attempts: every try, in order (the last one succeeded).
        decisions: every decision made on the way.
        was_terminus: the answer came from the terminus actor.
        finish_reason: the provider's finish reason (``stop``, ``length``…).
        request_id: the supervisor's id for this request.
        text_kept: ``False`` for a stream whose text grew past ``StreamPolicy.keep_text``: it
            was passed on as deltas and not kept, and ``text`` is empty (never a truncated
            text). Always ``True`` for ``complete()``.
        tool_calls: the answer's tool calls, whole, in order (assembled from the fragments
            of a stream).
        refusal: what the model said instead of an answer (OpenAI's ``refusal``), if it did.
        logprobs: OpenAI's ``{"content": [...]}`` log probabilities of the answer (merged
            over a stream), when asked for and given.
        choices: every choice of an answer with several (``n > 1``), in order; the first is
            the one the other fields describe (and a stream's deltas carry: the others
            arrive whole here). Empty for an answer of one choice.
    """

    text: str
    provider: str
    model: str
    usage: Usage | None
    attempts: tuple[Attempt, ...]
    decisions: tuple[Decision, ...]
    was_terminus: bool = False
    finish_reason: str | None = None
    request_id: int = 0
    text_kept: bool = True
    tool_calls: tuple[ToolCall, ...] = ()
    refusal: str | None = None
    logprobs: Mapping[str, Any] | None = None
    choices: tuple[Choice, ...] = ()
