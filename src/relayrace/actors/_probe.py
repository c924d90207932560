"""Active probes: the actor's own cheap request to a benched provider (``ProbingClient.probe``),
run within the health policy's ``probe_timeout``, its outcome as a verdict or a ``Failure``; and
the requests the HTTP clients probe with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import attrs
import httpx
import trio

from .._client import ClientCall
from .._decide import capped_wait
from .._errors import ProviderError
from .._failure import Category, Failure
from .._policy import HealthPolicy
from .._values import Request, ToolCallDelta
from ._body import read_at_most
from ._boundary import AttemptState, UpstreamStatus, map_provider_errors

#: ``ProbingClient.probe``, bound to a client.
Probe = Callable[..., Awaitable[bool | None]]


@attrs.frozen
class ProbeOutcome:
    """What a probe found: ``failure`` if it failed, else ``proven`` (``True``: the deployment
    answered a completion; ``False``: the provider answered, or nothing was sent)."""

    proven: bool = False
    failure: Failure | None = None


async def run_probe(
    probe: Probe, *, model: str | None, actor: str, policy: HealthPolicy
) -> ProbeOutcome:
    """Run one probe within ``policy.probe_timeout``.

    Raises:
        Exception: what the client raised that was not a ``ProviderError`` (a bug).
    """
    with trio.move_on_after(policy.probe_timeout) as scope:
        try:
            verdict = await probe(model=model, actor=actor)
        except ProviderError as exc:
            return ProbeOutcome(failure=capped_wait(exc.failure.with_provider(actor), policy))
        return ProbeOutcome(proven=bool(verdict))
    assert scope.cancelled_caught
    message = f"{actor}: the probe budget of {policy.probe_timeout:g}s ran out"
    return ProbeOutcome(
        failure=Failure(
            category=Category.TIMEOUT, code="probe_timeout", message=message, provider=actor
        )
    )


# --- what the HTTP clients send --------------------------------------------------------------------


class _Discard:
    """The sink of a completion probe: its answer goes nowhere."""

    async def delta(self, text: str) -> None:
        pass

    async def tool_calls(self, fragments: Sequence[ToolCallDelta]) -> None:
        pass

    def progress(self) -> None:
        pass


DISCARD = _Discard()


def completion_probe(model: str, actor: str) -> ClientCall:
    """The call of a ``completion`` probe: one token of ``model``, not streamed."""
    request = Request(model, [{"role": "user", "content": "ping"}], params={"max_tokens": 1})
    return ClientCall(request=request, model=model, actor=actor)


async def get_ok(
    http: httpx.AsyncClient,
    url: httpx.URL,
    *,
    label: str,
    actor: str,
    secrets: Sequence[str],
    error_limit: int,
) -> None:
    """``GET url`` (a model list) and check the answer is a 2xx (reading at most
    ``error_limit`` bytes of an error body).

    Raises:
        ProviderError: any other status, or a transport failure (``map_provider_errors``).
    """
    state = AttemptState(stream=False)
    with map_provider_errors(state, label=label, provider=actor, secrets=secrets):
        request = http.build_request("GET", url, headers={"accept": "application/json"})
        response = await http.send(request, stream=True)
        try:
            state.response_started = True
            if not 200 <= response.status_code < 300:
                content = await read_at_most(response, error_limit)
                raise UpstreamStatus(response.status_code, content, response.headers)
            # The list itself is not needed (it may be long): closing it unread drops the
            # connection, cheaper than reading a large body.
        finally:
            await response.aclose()
