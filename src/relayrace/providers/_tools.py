"""Tool calls as the readers meet them: indexes assigned by us, fragments passed on, argument
JSON checked at the end of the answer. Written once for every wire format."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable
from typing import Any

from .._values import ToolCallDelta
from ._errors import MalformedStream, check_text


class ToolCallBuilder:
    """The tool calls of one answer, as a reader reads them.

    Each call is opened under the upstream's own key (a call id, a content-block index) and
    gets the next index of ours (0, 1, 2…), so that two calls never merge even where an
    upstream reuses its index 0. What each event adds waits in ``pending`` for the client to
    pass on (``take``); ``check`` says whether every call's arguments are JSON.
    """

    __slots__ = ("_keys", "_arguments", "pending")

    def __init__(self) -> None:
        self._keys: dict[Hashable, int] = {}
        self._arguments: list[list[str]] = []
        self.pending: list[ToolCallDelta] = []

    @property
    def count(self) -> int:
        """The calls opened so far."""
        return len(self._arguments)

    def index_of(self, key: Hashable) -> int | None:
        """Our index of the call opened under ``key``, if one was."""
        return self._keys.get(key)

    def start(self, key: Hashable, call_id: Any, name: Any) -> int:
        """Open a call (its first fragment: id and name); return its index.

        Raises:
            MalformedStream: ``malformed_tool_call``, a call without a function name.
        """
        if not isinstance(name, str) or not name:
            raise MalformedStream("malformed_tool_call", "a tool call without a function name")
        check_text(name, "a function name")
        if not isinstance(call_id, str) or not call_id:
            call_id = None
        else:
            check_text(call_id, "a tool call id")
        index = len(self._arguments)
        self._keys[key] = index
        self._arguments.append([])
        self.pending.append(ToolCallDelta(index, call_id or f"call_{index}", name, ""))
        return index

    def add(self, index: int, arguments: Any) -> None:
        """A fragment of the arguments of call ``index``.

        Raises:
            MalformedStream: ``malformed_tool_call``, arguments that are not text.
        """
        if not isinstance(arguments, str):
            raise MalformedStream("malformed_tool_call", "tool-call arguments that are not text")
        if not arguments:
            return
        check_text(arguments, "tool-call arguments")
        self._arguments[index].append(arguments)
        pending = self.pending
        if pending and pending[-1].index == index:
            last = pending[-1]  # one fragment per call and event
            pending[-1] = ToolCallDelta(index, last.id, last.name, last.arguments + arguments)
        else:
            pending.append(ToolCallDelta(index, arguments=arguments))

    def take(self) -> list[ToolCallDelta]:
        """The fragments read since the last ``take``."""
        pending, self.pending = self.pending, []
        return pending

    def check(self) -> None:
        """Every call's arguments parse as JSON (called when the answer is whole).

        Raises:
            MalformedStream: ``malformed_tool_call``, naming the call's index (never its text).
        """
        for index, pieces in enumerate(self._arguments):
            try:
                json.loads("".join(pieces))
            except ValueError:
                raise MalformedStream(
                    "malformed_tool_call", f"the arguments of tool call {index} are not JSON"
                ) from None


def arguments_object(arguments: str) -> Any:
    """A request's tool-call arguments (JSON text, checked by ``Request``) as a value."""
    try:
        return json.loads(arguments)
    except ValueError:  # Request checks them; a hand-made message may not have been
        return {}


def made_id(index: int, name: str, arguments: str) -> str:
    """An id for a call whose upstream sends none (Gemini): the same for the same answer, so
    that a restarted attempt gives the caller the ids it already has."""
    digest = hashlib.sha256(f"{name}\0{arguments}".encode()).hexdigest()[:16]
    return f"call_{index}_{digest}"


def function_tools(params: Any) -> list[dict[str, Any]]:
    """The ``function`` objects of a request's ``tools`` (checked by ``Request``)."""
    tools = params.get("tools") if hasattr(params, "get") else None
    if not isinstance(tools, list):
        return []
    return [tool["function"] for tool in tools if isinstance(tool, dict) and "function" in tool]


def chosen_function(params: Any) -> str | None:
    """The function a request's ``tool_choice`` names, if it names one."""
    choice = params.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None
