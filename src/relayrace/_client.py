"""The boundary between an actor and the provider it talks to: the contract between the config
(which builds clients), the actors (which drive them) and the clients.

A provider client is any object with an ``accepts_continuation`` flag, an async ``call``
method and an async ``aclose`` (``ProviderClient``, checked by mypy where a client is given).
The actor gives it a ``ClientCall`` and a ``Sink``; the client pushes text deltas and tool-call
fragments (indexed 0, 1, 2… per answer) into the sink as they arrive and returns a
``Completion``, or raises ``ProviderError`` carrying a
classified ``Failure``. Any other exception is a bug in the client: the actor crashes and its
supervisor restarts it.

Budgets are the actor's business, not the client's: the actor runs the call inside cancel scopes
for the time to first token, the idle time between deltas and the whole attempt. A client that
speaks a non-streamed API calls ``sink.progress()`` when the response starts arriving so that
the actor switches from the first-token budget to the idle budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

from ._embedding import EmbedRequest
from ._ratelimit import RateLimits
from ._values import Choice, Request, ToolCallDelta, Usage

#: the yes/no capabilities, in the order a skip names the first one missing.
CAPABILITY_FLAGS = ("tools", "vision", "json_schema", "n", "logprobs", "embeddings")


@attrs.frozen(kw_only=True)
class Capabilities:
    """What a provider can serve; a request that needs more is not sent to it (a ``skip``
    decision naming the capability), and one that no provider of its route can serve is a
    ``BadRequest`` before any call.

    Each HTTP client kind declares its defaults (``default_capabilities``); a provider's
    config overrides them key by key (``[providers.capabilities]``). Whether a provider
    continues a partial answer is ``ProviderConfig.accepts_continuation``, not here.

    Attributes:
        tools: tool calling (``tools``, assistant ``tool_calls``, ``tool`` messages).
        vision: image content parts.
        json_schema: structured output (``response_format`` ``json_object`` / ``json_schema``).
        n: several choices (``n > 1``).
        logprobs: log probabilities (``logprobs: true``).
        embeddings: an embeddings endpoint (for the gateway's ``/v1/embeddings``).
        max_context_tokens: the largest prompt, estimated at 4 characters a token; ``None``:
            no limit known.
        configured: the keys the config set (a skip's rule says ``config``), the others
            being the client kind's defaults (``default``).
    """

    tools: bool = True
    vision: bool = True
    json_schema: bool = True
    n: bool = True
    logprobs: bool = True
    embeddings: bool = True
    max_context_tokens: int | None = None
    configured: frozenset[str] = frozenset()
    #: nothing is lacking: no request is ever skipped for a capability (worked out once:
    #: routing asks it of every actor of every request).
    everything: bool = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        everything = self.max_context_tokens is None and all(
            getattr(self, name) for name in CAPABILITY_FLAGS
        )
        object.__setattr__(self, "everything", everything)

    def source(self, name: str) -> str:
        """Where a capability's value came from: ``config`` or ``default``."""
        return "config" if name in self.configured else "default"


@attrs.frozen(kw_only=True)
class ClientCall:
    """What one attempt asks of a provider client.

    Attributes:
        request: the caller's request.
        model: the upstream model to ask for (from the provider's config), or ``None`` to pass
            the request's model name through.
        stream: stream the answer (deltas as they come) rather than ask for it whole.
        prefill: text the answer must continue (an assistant prefill), or ``None``.
        actor: the name of the actor making the call (for error messages).
        embed: the kind of call: set, an embeddings call of this request (``request`` is then
            the run's stand-in, never sent); ``None``, a chat call of ``request``. A client that
            answers an embeddings call returns its vectors in ``Completion.embeddings``; one
            that answers it like a chat call fails the attempt (``malformed_response``).
    """

    request: Request
    model: str | None = None
    stream: bool = False
    prefill: str | None = None
    actor: str = ""
    embed: EmbedRequest | None = None

    @property
    def upstream_model(self) -> str:
        return self.model if self.model is not None else self.request.model


@attrs.frozen(kw_only=True)
class Completion:
    """How a successful call ended.

    Attributes:
        refusal: what the model said instead of an answer, if it did.
        logprobs: the answer's log probabilities (OpenAI's ``{"content": [...]}``), if given.
        choices: the choices past the first (``n > 1``), whole.
        embeddings: the vectors of an embeddings call (``ClientCall.embed``), in input order.
        limits: what the provider's headers said of its rate limits (``None``: nothing), which
            the supervisor's admission learns from.
    """

    model: str
    usage: Usage | None = None
    finish_reason: str | None = None
    refusal: str | None = None
    logprobs: Mapping[str, Any] | None = None
    choices: tuple[Choice, ...] = ()
    embeddings: tuple[tuple[float, ...], ...] | None = None
    limits: RateLimits | None = None


class Sink(Protocol):
    """Where a client sends what it receives."""

    async def delta(self, text: str) -> None:
        """Send one piece of the answer (may wait: a slow caller slows the provider read)."""

    async def tool_calls(self, fragments: Sequence[ToolCallDelta]) -> None:
        """Send tool-call fragments (like a delta, they are output: may wait)."""

    def progress(self) -> None:
        """The provider has started answering (its response headers arrived)."""


#: What an active probe of a benched provider sends: ``models`` (its model list, free),
#: ``completion`` (a one-token completion of the actor's model: billed), or ``off`` (none: the
#: next request after the bench is the probe).
PROBE_MODES = ("models", "completion", "off")
ProbeMode = Literal["models", "completion", "off"]


@runtime_checkable
class ProbingClient(Protocol):
    """A provider client that can probe its provider while the actor has it benched
    (optional: a client without ``probe`` is probed by the next request, passively).

    ``open`` builds what the client needs to send (its connection pool, its TLS context), so
    that none of it is built on the request path; the supervisor calls it when it starts.
    """

    def open(self) -> None:
        """Build the client's connection pool now (idempotent; a closed client reopens)."""
        ...

    def probes(self, model: str | None) -> bool:
        """Whether ``probe`` sends anything for an actor of this upstream ``model`` (``None``:
        passed through); if not, the actor leaves probing to the next request."""
        ...

    async def probe(self, *, model: str | None, actor: str) -> bool | None:
        """Send one cheap request to check the provider (the actor applies the budget).

        Args:
            model: the upstream model of the actor (``None``: passed through, unknown).
            actor: the actor's name (for error messages).

        Returns:
            ``True``: the deployment answered a completion (it serves); ``False``: the provider
            answered (reachable, the key works) but that does not prove the deployment serves;
            ``None``: nothing was sent (probing off, or it needs a model the actor lacks).

        Raises:
            ProviderError: the provider failed the probe; ``.failure`` says how.
        """
        ...


@runtime_checkable
class ProviderClient(Protocol):
    """A client for one provider. See the module docstring for the contract."""

    accepts_continuation: bool

    async def call(self, call: ClientCall, sink: Sink) -> Completion:
        """Run one attempt.

        Raises:
            ProviderError: the provider failed; ``.failure`` says how.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; called when the actor stops for good."""
        ...
