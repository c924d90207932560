"""The three wire formats as the mock provider speaks them: answers, streams, errors and the
deliberately broken bytes of its faults. The formats themselves are
``relayrace.providers``' encoders; this module only says which piece the mock writes when."""

from __future__ import annotations

import json
import time
from typing import Any

import attrs

from .._values import Choice, ToolCall, ToolCallDelta, Usage
from ..providers import anthropic, dumps, gemini, openai
from ._scenarios import MockScenario


class Reply:
    """What one answer needs while it is written (one per attempt)."""

    __slots__ = (
        "model",
        "id",
        "created",
        "text",
        "usage",
        "include_usage",
        "sse",
        "tool_calls",
        "reuse_index",
        "logprobs",
        "refusal",
        "n",
        "pieces_left",
        "tools_sent",
        "payload",
        "_openai",
        "_framer",
    )

    def __init__(self, model: str, seq: int, text: str, prompt: int, completion: int) -> None:
        self.model = model
        self.id = f"mock{seq}"
        self.created = int(time.time())  # a wire field (epoch seconds), not a clock we wait on
        self.text = text
        self.usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
        self.include_usage = False  # OpenAI: stream_options.include_usage
        self.sse = True  # Gemini: alt=sse (else a streamed JSON array)
        self.tool_calls: tuple[ToolCall, ...] = ()
        self.reuse_index = False  # OpenAI: every call under upstream index 0
        self.logprobs = False
        self.refusal: str | None = None
        self.n = 1  # OpenAI: the choices asked for
        self.pieces_left = 0  # text pieces still to stream: the tool calls follow the last
        self.tools_sent = False
        self.payload: dict[str, Any] = {}  # the request's body (set by ``dress``)
        self._openai: openai.StreamEncoder | None = None
        self._framer: gemini.Framer | None = None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def dress(self, fmt: Format, sc: MockScenario, payload: dict[str, Any], pieces: int) -> None:
        """Add what the scenario's agent options ask for (``tools``, ``cached``…); a stream
        of ``pieces`` text pieces sends its tool calls with the last one (so that a ``cut``
        with ``after`` = ``chunks`` breaks the stream after its tool calls)."""
        self.pieces_left = pieces
        self.payload = payload
        if sc.cached:
            self.usage = attrs.evolve(
                self.usage,
                prompt_tokens=self.usage.prompt_tokens + sc.cached,
                cached_tokens=sc.cached,
            )
        if fmt is OPENAI:
            self.reuse_index = sc.reuse_index
            self.logprobs = sc.logprobs
            n = payload.get("n")
            if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 8:
                self.n = n
            if sc.refusal:
                self.refusal, self.text = "I can't help with that.", ""
        if sc.tools and not ends_with_tool_result(fmt, payload):
            names = declared_tools(fmt, payload) or ["mock_tool"]
            bad = sc.bad_args and fmt is not GEMINI
            self.tool_calls = tuple(
                ToolCall(
                    k,
                    f"{'toolu' if fmt is ANTHROPIC else 'call'}_{self.id}_{k}",
                    names[k % len(names)],
                    f'{{"n": {k}, "q": "mo' if bad else json.dumps({"n": k, "q": "mock"}),
                )
                for k in range(sc.tools)
            )

    @property
    def openai(self) -> openai.StreamEncoder:
        """This answer's OpenAI chunk encoder."""
        if self._openai is None:
            self._openai = openai.StreamEncoder(
                f"chatcmpl-{self.id}", self.created, self.include_usage
            )
        return self._openai

    @property
    def framer(self) -> gemini.Framer:
        """This answer's Gemini stream framing."""
        if self._framer is None:
            self._framer = gemini.Framer(self.sse)
        return self._framer


def encode(value: Any) -> bytes:
    """A JSON body."""
    return dumps(value).encode()


class Format:
    """How one provider spells answers, streams and errors."""

    name = ""
    stream_type = b"text/event-stream; charset=utf-8"

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        raise NotImplementedError

    def error_status(self, kind: str) -> int:
        raise NotImplementedError

    def check(self, payload: Any) -> str | None:
        """What is wrong with a request body, or ``None``."""
        return check_payload(self, payload)

    def answer(self, r: Reply) -> Any:
        raise NotImplementedError

    def stream_open(self, r: Reply) -> bytes:
        return b""

    def stream_text(self, r: Reply, piece: str) -> bytes:
        raise NotImplementedError

    def stream_close(self, r: Reply, terminator: bool) -> bytes:
        raise NotImplementedError

    def stream_error(self, r: Reply, kind: str) -> bytes:
        raise NotImplementedError

    def malformed(self, r: Reply) -> bytes:
        raise NotImplementedError

    def stream_tools(self, r: Reply) -> bytes:
        """The events of the answer's tool calls."""
        return b""

    def piece(self, r: Reply, out: bytes) -> bytes:
        """``out`` (a text piece's events), followed by the tool calls after the last one."""
        r.pieces_left -= 1
        if r.pieces_left <= 0 and not r.tools_sent:
            r.tools_sent = True
            out += self.stream_tools(r)
        return out

    def tools_left(self, r: Reply) -> bytes:
        """The tool calls' events, unless a text piece carried them already."""
        if r.tools_sent:
            return b""
        r.tools_sent = True
        return self.stream_tools(r)

    def stream_end(self, r: Reply) -> bytes:
        """Bytes that end the body whatever happened (Gemini's JSON array needs its ``]``)."""
        return b""


class OpenAI(Format):
    name = openai.NAME

    def error_status(self, kind: str) -> int:
        return openai.error_status(kind)

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        return openai.error_body(kind, model)

    def answer(self, r: Reply) -> Any:
        return openai.completion(
            id=f"chatcmpl-{r.id}",
            created=r.created,
            model=r.model,
            text=r.text,
            usage=r.usage,
            finish_reason=r.finish_reason,
            tool_calls=r.tool_calls,
            refusal=r.refusal,
            logprobs=[_logprob(r.text)] if r.logprobs else None,
            choices=[Choice(index=i, text=r.text, finish_reason="stop") for i in range(1, r.n)],
        )

    def stream_open(self, r: Reply) -> bytes:
        out = r.openai.opening(r.model)
        if r.refusal:
            out += r.openai.refusal(r.model, r.refusal)
        return out

    def stream_text(self, r: Reply, piece: str) -> bytes:
        if r.refusal:
            return self.piece(r, b"")
        if r.logprobs:
            return self.piece(r, r.openai.logprobs(r.model, piece, [_logprob(piece)]))
        return self.piece(r, r.openai.content(r.model, piece))

    def stream_tools(self, r: Reply) -> bytes:
        out = b""
        upstream = (lambda _: 0) if r.reuse_index else None
        for call in r.tool_calls:
            for fragment in _fragments(call):
                out += r.openai.tool_calls(r.model, [fragment], upstream_index=upstream)
        return out

    def stream_close(self, r: Reply, terminator: bool) -> bytes:
        out = self.tools_left(r)
        for i in range(1, r.n):
            out += r.openai.other_choice(r.model, i, r.text, "stop")
        return out + r.openai.closing(r.model, r.finish_reason, r.usage, terminator=terminator)

    def stream_error(self, r: Reply, kind: str) -> bytes:
        return r.openai.error(kind, r.model)

    def malformed(self, r: Reply) -> bytes:
        return (
            b'data: {"id":"chatcmpl-' + r.id.encode() + b'","choices":[{"delta":{"content":"br\n\n'
        )


class Anthropic(Format):
    name = anthropic.NAME

    def error_status(self, kind: str) -> int:
        return anthropic.error_status(kind)

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        return anthropic.error_body(kind, model)

    def answer(self, r: Reply) -> Any:
        return anthropic.message(
            id=f"msg_{r.id}",
            model=r.model,
            text=r.text,
            usage=r.usage,
            finish_reason=r.finish_reason,
            tool_calls=_valid(r.tool_calls),
        )

    def stream_open(self, r: Reply) -> bytes:
        return anthropic.opening(
            id=f"msg_{r.id}",
            model=r.model,
            prompt_tokens=r.usage.prompt_tokens,
            cached_tokens=r.usage.cached_tokens,
            cache_creation_tokens=r.usage.cache_creation_tokens,
        )

    def stream_text(self, r: Reply, piece: str) -> bytes:
        return self.piece(r, anthropic.text_delta(piece))

    def stream_tools(self, r: Reply) -> bytes:
        out = b""
        for call in r.tool_calls:
            block = call.index + 1  # block 0 is the text
            out += anthropic.tool_use_start(block, call.id, call.name)
            for fragment in _fragments(call):
                out += anthropic.input_json_delta(block, fragment.arguments)
        return out

    def stream_close(self, r: Reply, terminator: bool) -> bytes:
        return self.tools_left(r) + anthropic.closing(
            r.finish_reason,
            r.usage.completion_tokens,
            terminator=terminator,
            last_block=len(r.tool_calls),
        )

    def stream_error(self, r: Reply, kind: str) -> bytes:
        return anthropic.error_event(kind, r.model)

    def malformed(self, r: Reply) -> bytes:
        return (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_del\n\n'
        )


class Gemini(Format):
    name = gemini.NAME
    stream_type = b"text/event-stream"

    def error_status(self, kind: str) -> int:
        return gemini.error_status(kind)

    def error_body(self, kind: str, status: int, model: str, sc: MockScenario | None) -> Any:
        retry_after = sc.retry_after if sc is not None else None
        return gemini.error_body(kind, model, status=status, retry_after=retry_after)

    def blocked(self, r: Reply) -> Any:
        return gemini.blocked(id=r.id, model=r.model, prompt_tokens=r.usage.prompt_tokens)

    def frame(self, r: Reply, data: bytes) -> bytes:
        return r.framer.frame(data)

    def answer(self, r: Reply) -> Any:
        return gemini.response(
            id=r.id,
            model=r.model,
            text=r.text,
            finish_reason=r.finish_reason,
            usage=r.usage,
            tool_calls=r.tool_calls,
        )

    def stream_text(self, r: Reply, piece: str) -> bytes:
        return self.piece(r, r.framer.write(gemini.response(id=r.id, model=r.model, text=piece)))

    def stream_tools(self, r: Reply) -> bytes:
        if not r.tool_calls:
            return b""
        calls = gemini.response(id=r.id, model=r.model, text="", tool_calls=r.tool_calls)
        return r.framer.write(calls)

    def stream_close(self, r: Reply, terminator: bool) -> bytes:
        out = self.tools_left(r)
        return out + r.framer.write(
            gemini.response(
                id=r.id, model=r.model, text="", finish_reason=r.finish_reason, usage=r.usage
            )
        )

    def stream_error(self, r: Reply, kind: str) -> bytes:
        return r.framer.write(self.error_body(kind, self.error_status(kind), r.model, None))

    def malformed(self, r: Reply) -> bytes:
        return r.framer.frame(b'{"candidates":[{"content":{"parts":[{"text":"br')

    def stream_end(self, r: Reply) -> bytes:
        return r.framer.end()


OPENAI = OpenAI()
ANTHROPIC = Anthropic()
GEMINI = Gemini()


def _fragments(call: ToolCall, size: int = 4) -> list[ToolCallDelta]:
    """A call as the mock streams it: id and name first, the arguments ``size`` characters at
    a time."""
    pieces = [call.arguments[i : i + size] for i in range(0, len(call.arguments), size)]
    first = ToolCallDelta(call.index, call.id, call.name, pieces[0] if pieces else "")
    return [first, *(ToolCallDelta(call.index, arguments=piece) for piece in pieces[1:])]


def _valid(calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
    """Calls whose arguments a format that writes them as objects can write."""
    out = []
    for call in calls:
        try:
            json.loads(call.arguments)
        except ValueError:
            call = attrs.evolve(call, arguments="{}")
        out.append(call)
    return tuple(out)


def _logprob(text: str) -> dict[str, Any]:
    return {"token": text, "logprob": -0.25, "bytes": list(text.encode()), "top_logprobs": []}


def declared_tools(fmt: Format, payload: dict[str, Any]) -> list[str]:
    """The function names a request declares, in order."""
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return []
    if fmt is GEMINI:
        tools = [d for t in tools if isinstance(t, dict) for d in t.get("functionDeclarations", [])]
    elif fmt is OPENAI:
        tools = [t.get("function") for t in tools if isinstance(t, dict)]
    return [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]


def ends_with_tool_result(fmt: Format, payload: dict[str, Any]) -> bool:
    """Whether the request's last turn gives tool results (the model then answers in text)."""
    turns = payload.get("contents" if fmt is GEMINI else "messages")
    last = turns[-1] if isinstance(turns, list) and turns else None
    if not isinstance(last, dict):
        return False
    if fmt is OPENAI:
        return last.get("role") == "tool"
    blocks = last.get("parts" if fmt is GEMINI else "content")
    kind = "functionResponse" if fmt is GEMINI else "tool_result"
    return isinstance(blocks, list) and any(
        isinstance(b, dict) and (kind in b or b.get("type") == kind) for b in blocks
    )


def stream_type(fmt: Format, reply: Reply) -> bytes:
    """The content type of a streamed answer."""
    return fmt.stream_type if reply.sse else b"application/json"


def check_payload(fmt: Format, payload: Any) -> str | None:
    """What is wrong with a request body, or ``None``."""
    if not isinstance(payload, dict):
        return "the request body must be a JSON object"
    if fmt is GEMINI:
        contents = payload.get("contents")
        if not isinstance(contents, list) or not contents:
            return "contents: expected a non-empty list"
        return None
    if not isinstance(payload.get("model"), str):
        return "model: expected a string"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: expected a non-empty list"
    return None


def _count_words(node: Any) -> int:
    if isinstance(node, str):
        return len(node.split())
    if isinstance(node, list):
        return sum(_count_words(item) for item in node)
    if isinstance(node, dict):
        return sum(_count_words(node[key]) for key in ("content", "text", "parts") if key in node)
    return 0


def prompt_words(fmt: Format, payload: dict[str, Any]) -> int:
    """The words of a request's text (the mock's prompt token count)."""
    if fmt is GEMINI:
        return _count_words(payload.get("contents")) + _count_words(
            payload.get("systemInstruction")
        )
    words = _count_words(payload.get("messages"))
    if fmt is ANTHROPIC:
        words += _count_words(payload.get("system"))
    return words


def ends_with_assistant(fmt: Format, payload: dict[str, Any]) -> bool:
    """Whether the request ends with the assistant's turn (a prefill)."""
    turns = payload.get("contents" if fmt is GEMINI else "messages")
    last = turns[-1] if isinstance(turns, list) and turns else None
    role = last.get("role") if isinstance(last, dict) else None
    return role == ("model" if fmt is GEMINI else "assistant")
