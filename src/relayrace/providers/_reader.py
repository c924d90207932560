"""The base of the wire formats' response readers."""

from __future__ import annotations

from typing import Any

from .._values import Choice, Usage
from ._errors import check_text
from ._sse import ServerSentEvent
from ._tools import ToolCallBuilder


class Reader:
    """Reads one attempt's response in one wire format.

    A subclass turns each SSE event (``event``) or the whole JSON body (``whole``) into the text
    to pass on, puts the tool-call fragments it reads in ``tools`` (the client passes on
    ``tools.take()`` after each event), and records the refusal, log probabilities, the finish reason, usage and answering model on the way. It raises
    ``UpstreamErrorBody`` for an error inside the response and ``MalformedStream`` for data it
    cannot read (and ``ValueError`` for data that is not JSON); it never raises anything else,
    whatever the provider sends.

    Args:
        model: the model asked for (the answer's model until the provider names another).
    """

    def __init__(self, model: str):
        self.model = model
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        #: a finish reason (or its equivalent) arrived: the answer is whole.
        self.finished = False
        #: the stream's own terminator arrived (``[DONE]``, ``message_stop``).
        self.terminated = False
        self.tools = ToolCallBuilder()
        #: what the model said instead of an answer (OpenAI's ``refusal``), if it did.
        self.refusal: str | None = None
        #: the answer's log probabilities (OpenAI's ``logprobs.content`` items), if given.
        self.logprobs: list[Any] | None = None

    def add_logprobs(self, logprobs: Any) -> None:
        """Merge a choice's ``logprobs`` (``{"content": [...]}``) into ``logprobs``."""
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(logprobs["content"])

    def event(self, event: ServerSentEvent) -> str | None:
        """Read one SSE event; return the text it adds to the answer."""
        raise NotImplementedError

    def whole(self, body: Any) -> str:
        """Read a whole (non-streamed) JSON body; return the answer's text."""
        raise NotImplementedError

    def other_choices(self) -> list[Choice]:
        """The answer's choices past the first (``n > 1``), whole, once it has ended.

        Raises:
            MalformedStream: ``malformed_tool_call``, arguments of one that are not JSON.
        """
        return []

    def answered_by(self, model: Any) -> None:
        """Record the model the provider says answered (ignored unless a non-empty string).

        Raises:
            MalformedStream: ``malformed_text``, a name that cannot be encoded (checked when it
                changes, before any text of the event is passed on).
        """
        if isinstance(model, str) and model and model != self.model:
            self.model = check_text(model, "a model name")
