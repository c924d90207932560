"""One connection of the mock provider: an h11 server loop that reads requests and answers them
with the scenario their model name picks (see ``_mock_provider`` for the behaviour)."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import struct
from typing import Any
from urllib.parse import unquote

import attrs
import h11
import trio

from ..providers import ERROR_KINDS
from ._mock_embeddings import GEMINI_EMBEDDINGS, OPENAI_EMBEDDINGS
from ._mock_formats import (
    ANTHROPIC,
    GEMINI,
    OPENAI,
    Format,
    Gemini,
    Reply,
    encode,
    ends_with_assistant,
    prompt_words,
    stream_type,
)
from ._mock_state import MockAttempt, MockState, Plan
from ._scenarios import ERROR_SCENARIOS, SCENARIOS, MockScenario, rate_limit_headers

_SCENARIO_HEADER = b"x-mock-scenario"

_MAX_BODY = 16 * 1024 * 1024
_RECEIVE_SIZE = 65536


class _ClientGone(Exception):
    """The client closed the connection while the mock was still answering."""


class Connection:
    """One client connection: reads requests with h11, answers them one after another."""

    __slots__ = ("mock", "stream", "id", "h11", "out", "body", "closed", "gone_at")

    def __init__(self, mock: MockState, stream: trio.SocketStream, connection_id: int) -> None:
        self.mock = mock
        self.stream = stream
        self.id = connection_id
        self.h11 = h11.Connection(h11.SERVER)
        self.out: list[bytes] = []  # bytes h11 has framed, to send at the next flush
        self.body: list[bytes] = []  # body bytes not yet given to h11
        self.closed = False  # we closed the socket (cut, reset)
        self.gone_at: float | None = None  # when the client's end was seen closed

    # --- bytes in and out ---

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data and self.gone_at is None:
            self.gone_at = trio.current_time()
        return data

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive())
                continue
            return event

    def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.out.append(data)

    def _gone(self) -> _ClientGone:
        if self.gone_at is None:
            self.gone_at = trio.current_time()
        return _ClientGone()

    async def _flush(self) -> None:
        self._seal()
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._gone() from None

    async def _pause(self, seconds: float) -> None:
        """Send what is pending, then wait ``seconds`` while watching for the client to close.

        Waiting on the socket rather than sleeping notices a close without a second task.

        Raises:
            _ClientGone: the client closed the connection.
        """
        if seconds <= 0:
            return
        await self._flush()
        with trio.move_on_after(seconds):
            while True:
                data = await self._receive()
                if not data:
                    raise self._gone()
                self.h11.receive_data(data)  # a pipelined request: kept for the next cycle

    async def _close(self, reset: bool = False) -> None:
        if reset:
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.closed = True
        await trio.aclose_forcefully(self.stream)

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None) -> None:
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        self._send(h11.Response(status_code=status, headers=headers))
        if body:
            self._send(h11.Data(data=body))
        if body is not None:
            self._send(h11.EndOfMessage())

    # --- the request loop ---

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_event()
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or PAUSED after a protocol switch we refuse)
                body: list[bytes] = []
                size = 0
                while True:
                    part = await self._next_event()
                    if isinstance(part, h11.Data):
                        size += len(part.data)
                        if size > _MAX_BODY:
                            await self._refuse(413, "request body too large")
                            return
                        body.append(bytes(part.data))
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return  # the client went away mid-request
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, f"malformed HTTP request: {exc}")
                return
            await self._answer(event, b"".join(body))
            if self.closed or self.h11.our_state is not h11.DONE:
                return
            if self.h11.their_state is not h11.DONE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _refuse(self, status: int, message: str) -> None:
        """Answer a request h11 could not read, then close (the log gets an ``other`` attempt).

        A request cut short by the client's close is logged as ``cancelled``, unanswered.
        """
        now = trio.current_time()
        gone = self.gone_at is not None
        self.mock.log.append(
            MockAttempt(
                seq=len(self.mock.log),
                connection=self.id,
                format="other",
                path="",
                model="",
                scenario="",
                attempt=0,
                stream=False,
                started_at=now,
                ended_at=now,
                outcome="cancelled" if gone else "error",
                status=None if gone else status,
                client_closed_at=self.gone_at,
            )
        )
        if gone or self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = encode(OPENAI.error_body("bad_request", status, message, None))
        with contextlib.suppress(h11.LocalProtocolError):
            self._respond(status, [(b"content-type", b"application/json")], body)
        with contextlib.suppress(_ClientGone):
            await self._flush()

    async def _answer(self, request: h11.Request, body: bytes) -> None:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        method = request.method
        if method == b"HEAD":  # a HEAD response has no body, which h11 enforces
            self._send(h11.Response(status_code=405, headers=[(b"content-length", b"0")]))
            self._send(h11.EndOfMessage())
            await self._flush()
            return
        fmt: Format | None = None
        model = ""
        stream = False
        if path in ("/v1/chat/completions", "/chat/completions"):
            fmt = OPENAI
        elif path in ("/v1/embeddings", "/embeddings"):
            fmt = OPENAI_EMBEDDINGS
        elif path == "/v1/messages":
            fmt = ANTHROPIC
        elif path.startswith(("/v1beta/models/", "/v1/models/")):
            model, _, action = path.partition("/models/")[2].rpartition(":")
            if action in ("generateContent", "streamGenerateContent"):
                fmt = GEMINI
                model = unquote(model)
                stream = action == "streamGenerateContent"
            elif action == "batchEmbedContents":
                fmt, model = GEMINI_EMBEDDINGS, unquote(model)
        elif method == b"GET" and path in ("/v1/models", "/models"):
            data = [{"id": name, "object": "model", "owned_by": "mock"} for name in SCENARIOS]
            self._json(200, {"object": "list", "data": data})
            await self._flush()
            return
        elif method == b"GET" and path == "/health":
            self._json(200, {"status": "ok"})
            await self._flush()
            return

        mock = self.mock
        log = mock.log
        seq = len(log)
        now = trio.current_time()
        record = MockAttempt(
            seq=seq,
            connection=self.id,
            format=fmt.name if fmt is not None else "other",
            path=path,
            model=model,
            scenario="",
            attempt=0,
            stream=stream,
            started_at=now,
        )
        log.append(record)
        state = _Outcome()
        try:
            if fmt is None:
                status = 404 if method in (b"GET", b"POST") else 405
                message = f"unknown path {path!r} (method {method.decode('latin-1')})"
                self._json(status, OPENAI.error_body("bad_request", status, message, None))
                state.finish("error", status)
                await self._flush()
                return
            if method != b"POST":
                message = f"{path} takes POST"
                self._json(405, fmt.error_body("bad_request", 405, message, None))
                state.finish("error", 405)
                await self._flush()
                return
            await self._attempt(fmt, request, body, model, stream, query, record, log, seq, state)
        except _ClientGone:
            if state.outcome == "pending":
                state.outcome = "cancelled"
        finally:
            if state.outcome == "pending":
                state.outcome = "aborted"
            log[seq] = attrs.evolve(
                state.record or record,
                ended_at=trio.current_time(),
                outcome=state.outcome,
                status=state.status,
                chunks=state.chunks,
                client_closed_at=self.gone_at,
            )

    def _json(
        self, status: int, value: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = headers or []
        headers.append((b"content-type", b"application/json"))
        self._respond(status, headers, encode(value))

    async def _attempt(
        self,
        fmt: Format,
        request: h11.Request,
        body: bytes,
        model: str,
        stream: bool,
        query: str,
        record: MockAttempt,
        log: list[MockAttempt],
        seq: int,
        state: _Outcome,
    ) -> None:
        mock = self.mock
        problem: str | None
        try:
            payload = json.loads(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            payload = None
            problem = f"We could not parse the JSON body of your request: {exc}"
        else:
            problem = fmt.check(payload)
        if payload is not None and problem is None and not isinstance(fmt, Gemini):
            model = payload["model"]
            stream = payload.get("stream") is True
        if problem is not None:
            state.record = attrs.evolve(record, model=model, stream=stream, request=payload)
            log[seq] = state.record
            self._json(400, fmt.error_body("bad_request", 400, problem, None))
            state.finish("error", 400)
            await self._flush()
            return

        spec = model
        for name, value in request.headers:
            if name == _SCENARIO_HEADER:
                spec = value.decode("utf-8", "replace")
        plan: Plan | None = None
        problem_kind = "bad_request"
        try:
            plan = mock._plan(spec)
        except LookupError as exc:
            problem_kind, problem = "not_found", str(exc.args[0])
        except ValueError as exc:
            problem = str(exc)
        attempt = mock._count(spec)
        state.record = attrs.evolve(
            record,
            model=model,
            stream=stream,
            scenario=plan.scenario.name if plan is not None else "",
            attempt=attempt,
            request=payload,
        )
        log[seq] = state.record
        if plan is None:
            if problem_kind == "not_found":
                status = fmt.error_status("not_found")
                body_value = fmt.error_body("not_found", status, model, None)
                # Keep the provider's wording, and say what the mock knows.
                _append_message(body_value, f" ({problem})")
            else:
                status = 400
                body_value = fmt.error_body("bad_request", status, problem or "", None)
            self._json(status, body_value)
            state.finish("error", status)
            await self._flush()
            return
        sc = plan.scenario

        reply = Reply(
            model,
            seq,
            plan.text,
            max(1, prompt_words(fmt, payload)),
            plan.words,
        )
        reply.dress(fmt, sc, payload, len(plan.pieces))
        if fmt is OPENAI:
            options = payload.get("stream_options")
            reply.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        elif fmt is GEMINI:
            reply.sse = "alt=sse" in query.split("&")

        await self._pause(sc.head_delay)
        fault = _fault(mock, fmt, sc, attempt, payload)
        extra = [
            (b"x-mock-scenario", sc.name.encode()),
            (b"x-mock-attempt", str(attempt).encode()),
            *rate_limit_headers(sc),
        ]
        if fault in ERROR_KINDS:
            self._error(fmt, fault, sc, reply, extra, state)
            await self._flush()
            return
        if fault == "reset":
            state.finish("reset", None)
            await self._close(reset=True)
            return
        if fault == "hang":
            state.outcome = "hang"
            await self._pause(math.inf)
            return  # unreachable: the pause ends when the client closes
        if fault == "blocked":
            assert isinstance(fmt, Gemini)
            if stream:
                self._respond(200, [(b"content-type", stream_type(fmt, reply)), *extra], None)
                self._data(fmt.frame(reply, encode(fmt.blocked(reply))))
                self._data(fmt.stream_end(reply))
                self._end()
            else:
                self._json(200, fmt.blocked(reply), extra)
            state.finish("blocked", 200)
            await self._flush()
            return
        if stream:
            await self._stream(fmt, sc, plan, reply, fault, extra, state)
        else:
            await self._whole(fmt, sc, plan, reply, fault, extra, state)

    def _error(
        self,
        fmt: Format,
        kind: str,
        sc: MockScenario,
        reply: Reply,
        headers: list[tuple[bytes, bytes]],
        state: _Outcome,
    ) -> None:
        status = sc.status or fmt.error_status(kind)
        if sc.retry_after is not None:
            headers.append((b"retry-after", str(math.ceil(sc.retry_after)).encode()))
        if sc.retry_after_ms is not None:
            headers.append((b"retry-after-ms", str(sc.retry_after_ms).encode()))
        if sc.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if sc.should_retry else b"false"))
        self._json(status, fmt.error_body(kind, status, reply.model, sc), headers)
        state.finish("error", status)

    async def _stream(
        self,
        fmt: Format,
        sc: MockScenario,
        plan: Plan,
        reply: Reply,
        fault: str | None,
        extra: list[tuple[bytes, bytes]],
        state: _Outcome,
    ) -> None:
        pieces = plan.pieces
        after = min(sc.after, len(pieces)) if fault is not None else -1
        outcome = "no-done" if fault == "no-done" else "ok"
        self._respond(200, [(b"content-type", stream_type(fmt, reply)), *extra], None)
        state.status = 200
        await self._pause(sc.first_delay)
        opened = False
        for i in range(len(pieces) + 1):
            if i == after:
                if fault == "cut":
                    if not sc.clean:
                        await self._flush()
                        state.finish("cut", 200)
                        await self._close()
                        return
                    self._data(fmt.stream_end(reply))
                    self._end()
                    state.finish("cut", 200)
                    await self._flush()
                    return
                if fault == "stall":
                    await self._pause(sc.stall)
                elif fault in ("malformed", "stream-error"):
                    if not opened:
                        opened = True
                        self._data(fmt.stream_open(reply))
                    if fault == "malformed":
                        self._data(fmt.malformed(reply))
                        outcome = "malformed"
                    else:
                        self._data(fmt.stream_error(reply, sc.error))
                        self._data(fmt.stream_end(reply))
                        self._end()
                        state.finish("stream-error", 200)
                        await self._flush()
                        return
            if i == len(pieces):
                break
            if i:
                await self._pause(sc.delay)
            if not opened:
                opened = True
                self._data(fmt.stream_open(reply))
            self._data(fmt.stream_text(reply, pieces[i]))
            state.chunks += 1
        if not opened:
            self._data(fmt.stream_open(reply))
        self._data(fmt.stream_close(reply, fault != "no-done"))
        self._data(fmt.stream_end(reply))
        self._end()
        await self._flush()
        state.finish(outcome, 200)

    def _data(self, data: bytes) -> None:
        """Queue body bytes; those queued between two waits go out as one HTTP chunk (one h11
        event instead of one per SSE event: h11's bookkeeping is most of the mock's CPU)."""
        if data:
            self.body.append(data)

    def _seal(self) -> None:
        if self.body:
            data = b"".join(self.body)
            self.body.clear()
            self._send(h11.Data(data=data))

    def _end(self) -> None:
        self._seal()
        self._send(h11.EndOfMessage())

    async def _whole(
        self,
        fmt: Format,
        sc: MockScenario,
        plan: Plan,
        reply: Reply,
        fault: str | None,
        extra: list[tuple[bytes, bytes]],
        state: _Outcome,
    ) -> None:
        wait = sc.first_delay + sc.delay * (len(plan.pieces) - 1)
        if fault == "stall":
            wait += sc.stall
        await self._pause(wait)
        if fault == "stream-error":
            self._error(fmt, sc.error, sc, reply, extra, state)
            await self._flush()
            return
        body = encode(fmt.answer(reply))
        headers = [(b"content-type", b"application/json"), *extra]
        if fault == "cut" and not sc.clean:
            headers.append((b"content-length", str(len(body)).encode()))
            self._send(h11.Response(status_code=200, headers=headers))
            self.out.append(body[: len(body) // 2])  # raw: h11 would refuse a short body
            await self._flush()
            state.finish("cut", 200)
            await self._close()
            return
        outcome = "ok"
        if fault in ("cut", "malformed"):
            body = body[: len(body) // 2]
            outcome = "cut" if fault == "cut" else "malformed"
        else:
            state.chunks = 1
        self._respond(200, headers, body)
        await self._flush()
        state.finish(outcome, 200)


class _Outcome:
    """How the attempt is going: written as it goes, read when it ends."""

    __slots__ = ("outcome", "status", "chunks", "record")

    def __init__(self) -> None:
        self.outcome = "pending"
        self.status: int | None = None
        self.chunks = 0
        self.record: MockAttempt | None = None

    def finish(self, outcome: str, status: int | None) -> None:
        self.outcome = outcome
        self.status = status


def _append_message(body: Any, text: str) -> None:
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        error["message"] += text


def _fault(
    mock: MockState, fmt: Format, sc: MockScenario, attempt: int, payload: dict[str, Any]
) -> str | None:
    """What this attempt does: an error kind, a fault name, or ``None`` for a healthy answer."""
    kind = sc.kind
    if kind == "ok":
        return None
    if kind == "flapping":
        elapsed = trio.current_time() - mock._epoch
        if sc.up is not None and sc.down + sc.up > 0:
            elapsed %= sc.down + sc.up
        return "unavailable" if elapsed < sc.down else None
    if kind == "no-prefill":
        return "prefill" if ends_with_assistant(fmt, payload) else None
    if sc.times is not None and attempt > sc.times:
        return None
    error = ERROR_SCENARIOS.get(kind)
    if error == "content_policy" and fmt is GEMINI:
        return "blocked"
    return error or kind
