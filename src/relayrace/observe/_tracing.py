"""``Tracing``: a supervisor observer that makes OpenTelemetry spans: one per request, with a
child span per attempt, GenAI attributes (``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.*``) and the routing decisions as span events.

``opentelemetry-api`` is optional (``pip install 'relayrace[otel]'``). Without it a ``Tracing``
is disabled (``enabled`` is ``False``) and the supervisor never calls it: free. With the API but
no SDK configured, the API's no-op tracer makes the spans, which cost little.

Span times: a request's span starts on the wall clock when the request started; attempts'
start and end are placed on it from their trio-clock offsets, so the trace keeps the real
durations even though trio's clock is not the wall clock.
"""

from __future__ import annotations

from typing import Any

from .._errors import RequestFailed
from .._record import Attempt, Decision
from .._values import Reply
from ..supervisor import Observer, RequestInfo, RequestTiming

try:
    from opentelemetry import trace as otel_trace
except ImportError:  # the optional extra is not installed
    otel_trace = None  # type: ignore[assignment]

#: ``gen_ai.operation.name`` of every request.
OPERATION = "chat"


class Tracing(Observer):
    """Spans for the requests of one supervisor.

    Args:
        tracer_provider: the OpenTelemetry ``TracerProvider`` to use (default: the global one).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        #: ``False`` when ``opentelemetry-api`` is not installed: the supervisor skips it.
        self.enabled = otel_trace is not None
        self._tracer: Any = None
        if otel_trace is not None:
            self._tracer = otel_trace.get_tracer("relayrace", tracer_provider=tracer_provider)
        self._spans: dict[int, Any] = {}

    def request_started(self, info: RequestInfo) -> None:
        span = self._tracer.start_span(
            f"{OPERATION} {info.model}",
            kind=otel_trace.SpanKind.SERVER
            if info.surface != "python"
            else otel_trace.SpanKind.INTERNAL,
            start_time=_ns(info.wall_started),
            attributes={
                "gen_ai.operation.name": OPERATION,
                "gen_ai.request.model": info.model,
                "relayrace.request_id": info.request_id,
                "relayrace.route": info.route,
                "relayrace.surface": info.surface,
                "relayrace.streaming": info.streaming,
            },
        )
        self._spans[info.request_id] = span

    def attempt_ended(self, attempt: Attempt, info: RequestInfo) -> None:
        parent = self._spans.get(info.request_id)
        if parent is None:
            return
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.request.model": info.model,
            "gen_ai.provider.name": attempt.actor,
            "relayrace.attempt.number": attempt.number,
            "relayrace.attempt.outcome": attempt.outcome.value,
            "relayrace.attempt.deltas": attempt.deltas,
        }
        failure = attempt.failure
        if failure is not None:
            attributes["error.type"] = failure.category.value
            if failure.status is not None:
                attributes["http.response.status_code"] = failure.status
        span = self._tracer.start_span(
            f"{OPERATION} {attempt.actor}",
            context=otel_trace.set_span_in_context(parent),
            kind=otel_trace.SpanKind.CLIENT,
            start_time=_ns(info.wall_started + attempt.started_at - info.started),
            attributes=attributes,
        )
        if failure is not None:
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, failure.message))
        span.end(end_time=_ns(info.wall_started + attempt.ended_at - info.started))

    def decision(self, decision: Decision, info: RequestInfo) -> None:
        span = self._spans.get(info.request_id)
        if span is None:
            return
        span.add_event(
            f"relayrace.decision.{decision.action.value}",
            attributes={
                "relayrace.decision.action": decision.action.value,
                "relayrace.decision.scope": decision.scope.value,
                "relayrace.decision.actor": decision.actor or "",
                "relayrace.decision.category": decision.category or "",
                "relayrace.decision.rule": str(decision.rule),
                "relayrace.decision.reason": decision.reason,
                "relayrace.decision.wait": decision.wait,
            },
        )

    def request_ended(
        self, outcome: Reply | RequestFailed, info: RequestInfo, timing: RequestTiming
    ) -> None:
        span = self._spans.pop(info.request_id, None)
        if span is None:
            return
        span.set_attribute("relayrace.provider_time", timing.provider_time)
        span.set_attribute("relayrace.gateway_overhead", timing.overhead)
        if timing.first_token is not None:
            span.set_attribute("relayrace.time_to_first_token", timing.first_token)
        if isinstance(outcome, Reply):
            span.set_attribute("gen_ai.provider.name", outcome.provider)
            span.set_attribute("gen_ai.response.model", outcome.model or "")
            if outcome.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [outcome.finish_reason])
            if outcome.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", outcome.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", outcome.usage.completion_tokens)
        else:
            failure = outcome.failure
            span.set_attribute("error.type", failure.category.value)
            if failure.provider:
                span.set_attribute("gen_ai.provider.name", failure.provider)
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, failure.message))
        span.end(end_time=_ns(info.wall_started + timing.latency))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
