"""``ScriptedClient``: a provider client driven by a script of outcomes, recording every call.

Each call takes the next step of the script; once the script is spent the last step repeats.
Steps: ``Answer`` (the text in N chunks with delays, then its tool calls, each streamed in two
fragments), ``Fail`` (a classified failure, optionally after some chunks and tool calls), ``Hang`` (never answer, optionally after some chunks), ``Crash`` (raise a
bug, which crashes the actor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._client import ClientCall, Completion, Sink
from .._errors import ProviderError
from .._failure import Category, Failure
from .._values import ToolCall, ToolCallDelta, Usage

if TYPE_CHECKING:
    from .._table import Table

SCRIPTED_ANSWER = "The quick brown fox jumps over the lazy dog."


def split_text(text: str, chunks: int) -> list[str]:
    """Split ``text`` into ``chunks`` nearly equal, non-empty pieces (fewer if it is short)."""
    chunks = max(1, min(chunks, len(text))) if text else 1
    size, extra = divmod(len(text), chunks)
    pieces, start = [], 0
    for i in range(chunks):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


@attrs.frozen(kw_only=True)
class Answer:
    """Answer ``text`` in ``chunks`` deltas: ``first_delay`` before the first, ``delay``
    between the others; optionally stall ``stall`` seconds after ``stall_after`` chunks."""

    text: str = SCRIPTED_ANSWER
    chunks: int = 1
    delay: float = 0.0
    first_delay: float = 0.0
    stall_after: int | None = None
    stall: float = 0.0
    model: str | None = None
    usage: Usage | None = Usage(prompt_tokens=10, completion_tokens=9)
    finish_reason: str = "stop"
    tool_calls: tuple[ToolCall, ...] = ()


@attrs.frozen(kw_only=True)
class Fail:
    """Fail with a classified failure, after sending ``after_chunks`` chunks of ``text``."""

    category: Category
    status: int | None = None
    code: str | None = None
    message: str = "scripted failure"
    retry_after: float | None = None
    should_retry: bool | None = None
    after_chunks: int = 0
    delay: float = 0.0
    text: str = SCRIPTED_ANSWER
    chunks: int = 10
    #: tool calls sent (streamed) after the chunks, before the failure.
    tool_calls: tuple[ToolCall, ...] = ()

    def failure(self) -> Failure:
        return Failure(
            category=self.category,
            code=self.code,
            status=self.status,
            message=self.message,
            retry_after=self.retry_after,
            should_retry=self.should_retry,
        )


@attrs.frozen(kw_only=True)
class Hang:
    """Never finish: hang before the first chunk, or after ``after_chunks`` chunks of ``text``."""

    after_chunks: int = 0
    text: str = SCRIPTED_ANSWER
    chunks: int = 10


@attrs.frozen(kw_only=True)
class Crash:
    """Raise an unexpected exception (a bug in the client): the actor crashes."""

    message: str = "scripted crash"


Step = Answer | Fail | Hang | Crash


@attrs.frozen(kw_only=True)
class RecordedCall:
    """One call a ``ScriptedClient`` received and how it ended (``ok``, ``failed``,
    ``cancelled``, ``crashed``)."""

    model: str
    stream: bool
    prefill: str | None
    messages: tuple[Any, ...]
    step: Step
    started_at: float
    ended_at: float
    outcome: str
    chunks_sent: int


class ScriptedClient:
    """A provider client that follows a script. See the module docstring.

    Args:
        script: the steps, one per call; the last one repeats. Empty: always ``Answer()``.
        accepts_continuation: accept an assistant prefill (answer the rest of the text);
            otherwise a prefill is rejected as ``bad_request``.
    """

    def __init__(self, script: Iterable[Step] = (), *, accepts_continuation: bool = False):
        self.script: list[Step] = list(script) or [Answer()]
        self.accepts_continuation = accepts_continuation
        self.calls: list[RecordedCall] = []
        self.in_flight = 0
        self.closed = False
        self._next = 0

    @classmethod
    def from_table(cls, table: Table) -> ScriptedClient:
        """Build from a config table: ``script = [{do = "answer", chunks = 3}, {do = "fail",
        category = "rate_limit", retry_after = 1}]``."""
        steps: list[Step] = []
        for i, raw in enumerate(table.items("script", [])):
            from .._table import Table as _Table

            step = _Table(raw, f"{table.path}.script[{i}]")
            kind = step.choice("do", ["answer", "fail", "hang", "crash"])
            if kind == "answer":
                steps.append(
                    Answer(
                        text=step.text("text", SCRIPTED_ANSWER),
                        chunks=step.integer("chunks", 1, minimum=1),
                        delay=step.number("delay", 0.0),
                        first_delay=step.number("first_delay", 0.0),
                    )
                )
            elif kind == "fail":
                categories = [c.value for c in Category]
                steps.append(
                    Fail(
                        category=Category(step.choice("category", categories)),
                        status=step.integer("status", None, minimum=100),
                        code=step.text("code", None),
                        retry_after=step.number("retry_after", None),
                        after_chunks=step.integer("after_chunks", 0),
                        delay=step.number("delay", 0.0),
                    )
                )
            elif kind == "hang":
                steps.append(Hang(after_chunks=step.integer("after_chunks", 0)))
            else:
                steps.append(Crash())
            step.done()
        return cls(steps, accepts_continuation=table.flag("accepts_continuation", False))

    def next_step(self) -> Step:
        step = self.script[min(self._next, len(self.script) - 1)]
        self._next += 1
        return step

    @property
    def outcomes(self) -> list[str]:
        return [c.outcome for c in self.calls]

    async def call(self, call: ClientCall, sink: Sink) -> Completion:
        step = self.next_step()
        started = trio.current_time()
        sent = 0
        outcome = "cancelled"
        self.in_flight += 1
        try:
            if call.prefill is not None and not self.accepts_continuation:
                outcome = "failed"
                raise ProviderError(
                    Failure(
                        category=Category.BAD_REQUEST,
                        code="prefill_rejected",
                        status=400,
                        message="this provider does not accept an assistant prefill",
                    )
                )
            if isinstance(step, Crash):
                outcome = "crashed"
                raise RuntimeError(step.message)
            if isinstance(step, Answer):
                text = _continue(step.text, call.prefill)
                pieces = split_text(text, step.chunks)
                if not call.stream:
                    await trio.sleep(step.first_delay + step.delay * (len(pieces) - 1))
                    sink.progress()
                    if text:
                        await sink.delta(text)
                    if step.tool_calls:
                        await sink.tool_calls(
                            [
                                ToolCallDelta(c.index, c.id, c.name, c.arguments)
                                for c in step.tool_calls
                            ]
                        )
                    sent = 1
                else:
                    for i, piece in enumerate(pieces if text else []):
                        await trio.sleep(step.first_delay if i == 0 else step.delay)
                        if step.stall_after is not None and i == step.stall_after:
                            await trio.sleep(step.stall)
                        await sink.delta(piece)
                        sent += 1
                    sent += await _stream_tools(sink, step.tool_calls)
                outcome = "ok"
                return Completion(
                    model=step.model or call.upstream_model,
                    usage=step.usage,
                    finish_reason=step.finish_reason,
                )
            pieces = split_text(_continue(step.text, call.prefill), step.chunks)
            if call.stream:
                for piece in pieces[: step.after_chunks]:
                    await sink.delta(piece)
                    sent += 1
                if isinstance(step, Fail):
                    sent += await _stream_tools(sink, step.tool_calls)
            if isinstance(step, Hang):
                await trio.sleep_forever()
            assert isinstance(step, Fail)
            await trio.sleep(step.delay)
            outcome = "failed"
            raise ProviderError(step.failure())
        finally:
            self.in_flight -= 1
            self.calls.append(
                RecordedCall(
                    model=call.upstream_model,
                    stream=call.stream,
                    prefill=call.prefill,
                    messages=call.request.messages,
                    step=step,
                    started_at=started,
                    ended_at=trio.current_time(),
                    outcome=outcome,
                    chunks_sent=sent,
                )
            )

    async def aclose(self) -> None:
        self.closed = True


async def _stream_tools(sink: Sink, calls: Sequence[ToolCall]) -> int:
    """Send each call in two fragments (id and name with the first half of the arguments,
    then the rest); return the fragments sent."""
    sent = 0
    for c in calls:
        half = len(c.arguments) // 2
        await sink.tool_calls([ToolCallDelta(c.index, c.id, c.name, c.arguments[:half])])
        await sink.tool_calls([ToolCallDelta(c.index, arguments=c.arguments[half:])])
        sent += 2
    return sent


def _continue(text: str, prefill: str | None) -> str:
    if prefill and text.startswith(prefill):
        return text[len(prefill) :]
    return text


def scripted(*steps: Step | Sequence[Step], accepts_continuation: bool = False) -> ScriptedClient:
    """Shorthand: ``scripted(Fail(...), Answer())``."""
    flat: list[Step] = []
    for s in steps:
        if isinstance(s, (Answer, Fail, Hang, Crash)):
            flat.append(s)
        else:
            flat.extend(s)
    return ScriptedClient(flat, accepts_continuation=accepts_continuation)
