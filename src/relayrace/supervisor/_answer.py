"""Pieces of a run's answer worked out apart from the failover loop: every choice of an answer
with several, and whether a restarted answer gave back the tool calls the caller holds."""

from __future__ import annotations

from .._client import Completion
from .._values import Choice, ToolCall, ToolCallDelta, tool_calls_of


def choices_of(
    completion: Completion, parts: list[str] | None, tools: list[ToolCallDelta]
) -> tuple[Choice, ...]:
    """Every choice of an answer with several (the first from the run's own ``parts`` and
    ``tools``); ``()`` for one choice."""
    if not completion.choices:
        return ()
    first = Choice(
        index=0,
        text="".join(parts or ()),
        tool_calls=tool_calls_of(tools),
        finish_reason=completion.finish_reason,
        refusal=completion.refusal,
        logprobs=completion.logprobs,
    )
    return (first, *completion.choices)


def caught_up(again: dict[int, list[str]], held: tuple[ToolCall, ...]) -> bool:
    """Whether a restarted answer (``again``: each call's name and arguments so far) gave back
    every held call whole (it may add more)."""
    return all(
        call.index in again
        and again[call.index][0] == call.name
        and again[call.index][1].startswith(call.arguments)
        for call in held
    )
