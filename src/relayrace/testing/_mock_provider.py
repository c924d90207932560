"""A fault-injecting mock LLM provider: a real HTTP/1.1 server on trio sockets and h11.

One server speaks three wire formats at once:

- OpenAI: ``POST /v1/chat/completions`` (also ``/chat/completions``), JSON or SSE
  (``stream: true``; a usage chunk when ``stream_options.include_usage``; ``data: [DONE]``).
- Anthropic: ``POST /v1/messages``, JSON or SSE (``message_start`` … ``message_stop``).
- Gemini: ``POST /v1beta/models/{model}:generateContent`` and
  ``:streamGenerateContent?alt=sse`` (without ``alt=sse``: a streamed JSON array).
- Embeddings: OpenAI's ``POST /v1/embeddings`` (also ``/embeddings``; ``encoding_format``
  ``float`` or ``base64``) and Gemini's ``:batchEmbedContents``: deterministic vectors of the
  text (``mock_vector``; ``MOCK_DIMENSIONS`` long unless ``dimensions`` /
  ``outputDimensionality`` asks), faults by model name as for chat (a ``cut`` or ``malformed``
  body is cut in half).

Every answer carries the model name that was asked for and a usage block: the prompt tokens are
the words of the request's text, the completion tokens the words of the answer
(``SCRIPTED_ANSWER``, 9 words, repeated ``repeat`` times).

The scenario grammar
--------------------

The model name picks the behaviour, so one server serves every scenario at once::

    model    := scenario ("," key "=" value)*
    examples    ok   ok,chunks=20,delay=0.01   rate-limit,retry_after=2   flaky,tag=east

An ``x-mock-scenario`` request header, in the same grammar, overrides the model name (the answer
still names the model asked for). Commas survive in a Gemini URL path; the path segment is
percent-decoded. An unknown scenario is a 404 model-not-found; an unknown or invalid parameter
is a 400. Delays are seconds (trio time, so a ``MockClock`` drives them). Answers carry the
headers ``x-mock-scenario`` (the scenario that ran) and ``x-mock-attempt`` (the count for this
model name). ``GET /v1/models`` lists the scenarios, ``GET /health`` answers ``{"status": "ok"}``.

=================  ==========================================================================
scenario           behaviour
=================  ==========================================================================
``ok``             the answer in ``chunks`` pieces, ``delay`` apart
``slow``           ``ok`` whose first token comes after ``first_delay`` (default 30 s): a stream
                   sends its headers at once, then nothing until then
``rate-limit``     429, rate limited; a ``Retry-After`` header only with ``retry_after``
``quota``          429, quota / credit spent (``insufficient_quota`` and its equivalents)
``server-error``   500
``flaky``          ``server-error`` with ``times=1``: 500 once, then healthy
``unavailable``    503
``overloaded``     overloaded: 529 ``overloaded_error`` (Anthropic), 503 "overloaded" (others)
``unauthorized``   401
``forbidden``      403
``not-found``      404, model not found
``context-length`` 400 ``context_length_exceeded``
``content-policy`` 400 content-policy rejection (Gemini: a 200 with ``promptFeedback.blockReason
                   = SAFETY``, as Gemini does it)
``no-prefill``     400 when the last message is the assistant's (Gemini: ``model``), else ``ok``
``reset``          the connection is reset (RST) before any header
``hang``           the request is read and never answered
``cut``            the stream stops after ``after`` chunks: the connection is closed without a
                   terminator (``clean=1``: the HTTP body ends properly, still without one);
                   not streaming: the JSON body is cut in half
``stall``          after ``after`` chunks the stream stalls ``stall`` seconds (default 30), then
                   finishes normally
``malformed``      after ``after`` chunks one chunk of broken JSON, then the rest normally;
                   not streaming: a 200 whose JSON body is cut in half
``no-done``        the stream finishes (finish reason, usage) but sends no ``[DONE]`` /
                   ``message_stop`` (Gemini has no terminator: a normal stream)
``stream-error``   after ``after`` chunks an error inside the 200 stream (Anthropic
                   ``event: error``, an OpenAI ``data: {"error": …}`` chunk, a Gemini error
                   chunk), of kind ``error`` (default ``overloaded``); not streaming: that error
                   as an HTTP status
``flapping``       503 for the first ``down`` seconds (default 5) after the server started (or
                   ``reset()``), then healthy; with ``up``, down and up alternate
=================  ==========================================================================

Parameters (any scenario takes any of them; those that do not apply are ignored):

- ``chunks`` (5), ``delay`` (0), ``first_delay`` (0), ``repeat`` (1): the healthy answer.
- ``head_delay`` (0): wait before anything is sent, whatever the scenario.
- ``times``: a fault scenario fails only the first ``times`` requests for this model name (a
  counter per model name, see ``MockProvider.reset``), then answers healthily.
- ``status``: replace the HTTP status of an error; ``retry_after`` (whole seconds, rounded up),
  ``retry_after_ms``, ``should_retry`` (``x-should-retry``): headers sent with an error (Gemini
  also gets a ``RetryInfo`` detail for ``retry_after``).
- ``after`` (2), ``stall`` (30), ``clean`` (0), ``error`` (``overloaded``; one of
  ``rate_limit quota server unavailable overloaded unauthorized forbidden not_found
  context_length content_policy``): the stream faults.
- ``down`` (5), ``up``: ``flapping``.
- ``tag``: ignored; gives a scenario its own name, hence its own ``times`` counter.
- ``tools`` (0): the answer ends with that many tool calls (finish reason ``tool_calls``) of the
  request's declared tools in turn (``mock_tool`` if it declares none), arguments
  ``{"n": K, "q": "mock"}``, streamed in fragments of 4 characters (Anthropic
  ``input_json_delta``; Gemini sends whole calls); but when the conversation ends with a tool
  result the model answers text: a three-turn agent loop works on one model name.
  ``reuse_index=1``: OpenAI streams every call under upstream index 0 (as Ollama does), told
  apart only by its id. ``bad_args=1``: the arguments are not JSON (OpenAI, and Anthropic
  streamed; ignored elsewhere).
- ``cached`` (0): that many of the prompt tokens are reported cached (OpenAI
  ``cached_tokens``, Anthropic ``cache_read_input_tokens``, Gemini ``cachedContentTokenCount``).
- ``logprobs`` (0): OpenAI answers carry log probabilities (one item per text piece).
- ``refusal`` (0): OpenAI answers with a ``refusal`` and no content.
- ``rl_remaining``, ``rl_reset`` (60): every answer carries rate-limit headers saying that many
  requests (and 1000 times as many tokens) remain, whole again in ``rl_reset`` seconds (OpenAI
  ``x-ratelimit-remaining-requests`` / ``-reset-requests: 30s`` and the ``-tokens`` pair;
  Anthropic ``anthropic-ratelimit-requests-remaining`` / ``-reset``, an RFC 3339 time). Error
  answers carry them too (a ``rate-limit`` 429 saying ``0`` remain, as providers send it).
  ``rl_garbage=1``: the same headers, their values unreadable (``lots``, ``soon``).
- A request's ``n`` (OpenAI, up to 8): that many choices, each the same answer.

The log
-------

Every request to an API path is an attempt: a ``MockAttempt`` is appended to ``MockProvider.log``
when it arrives (``outcome="pending"``) and replaced when it ends. Outcomes: ``ok``, ``error``
(an HTTP error status, see ``status``), ``blocked`` (Gemini content policy), ``reset``, ``hang``
(never answered: it ended when the client closed, see ``client_closed_at``), ``cut``,
``malformed``, ``no-done``, ``stream-error``, ``cancelled`` (the client closed the connection
before the answer was complete) and ``aborted`` (the server shut down first).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import NoReturn

import trio

from ._mock_server import Connection
from ._mock_state import MockAttempt as MockAttempt
from ._mock_state import MockState
from ._scenarios import SCENARIOS as SCENARIOS
from ._scenarios import MockScenario as MockScenario
from ._scenarios import mock_model as mock_model

# --- the server --------------------------------------------------------------------------------


class MockProvider(MockState):
    """The mock provider's state: the log, the per-model counters and the connection counts.

    Start it with ``serve_mock_provider()``, or ``await nursery.start(MockProvider().serve)``.

    Attributes:
        log: every attempt, in arrival order (``MockAttempt``).
        open_connections: connections open now.
        accepted: connections accepted since the server started.
        errors: unexpected exceptions inside the mock (bugs), as text; a connection that hits one
            is closed, the server goes on. Tests should expect it to stay empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``, once serving.

        Raises:
            RuntimeError: the server has not started.
        """
        if self._base_url is None:
            raise RuntimeError("the mock provider is not serving yet")
        return self._base_url

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[MockProvider] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on ``host:port`` (0: any free port) and serve until cancelled.

        Reports ``self`` to ``nursery.start`` once listening.

        Raises:
            RuntimeError: this provider is already serving.
            OSError: the address cannot be bound.
        """
        if self._base_url is not None:
            raise RuntimeError("this mock provider is already serving")
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            address = listeners[0].socket.getsockname()
            bound = address[0] if ":" not in address[0] else f"[{address[0]}]"
            self._base_url = f"http://{bound}:{address[1]}"
            self._epoch = trio.current_time()
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._base_url = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open_connections += 1
        connection = Connection(self, stream, self.accepted)
        try:
            await connection.run()
        except Exception as exc:
            # A bug in the mock must not take the server (and every other test client) down.
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)


# --- entry points ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_mock_provider(
    host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[MockProvider]:
    """Run a mock provider for the body of the ``async with``; stop it (and close every
    connection it holds) on exit.

    Args:
        host: the address to listen on.
        port: the port; 0 picks a free one (see ``MockProvider.base_url``).

    Raises:
        OSError: the address cannot be bound.
    """
    mock = MockProvider()
    async with trio.open_nursery() as nursery:
        await nursery.start(mock.serve, host, port)
        try:
            yield mock
        finally:
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mock provider as a process: print its URL, serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="relayrace mock-provider",
        description="A fault-injecting mock LLM provider (OpenAI, Anthropic and Gemini wire "
        "formats). The model name picks the scenario, e.g. 'ok,chunks=20,delay=0.01' or "
        "'rate-limit,retry_after=2'. Scenarios: " + ", ".join(SCENARIOS) + ". Agent options "
        "on any scenario: tools=N (N tool calls of the declared tools; text once the "
        "conversation ends with a tool result), reuse_index=1, bad_args=1, cached=N, "
        "logprobs=1, refusal=1; an OpenAI request's n gives n choices.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8900, help="port (0: any free port)")
    args = parser.parse_args(argv)

    async def run() -> int:
        mock = MockProvider()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(mock.serve, args.host, args.port)
                except OSError as exc:
                    print(
                        f"relayrace mock-provider: cannot listen on {args.host}:{args.port}: {exc}",
                        file=sys.stderr,
                    )
                    return 1
                print(mock.base_url, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        return 0

    return trio.run(run)


if __name__ == "__main__":
    sys.exit(main())
