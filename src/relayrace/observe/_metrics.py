"""``Metrics``: a supervisor observer that keeps Prometheus metrics in a registry of its own.

The hot path is a request's end: ``request_ended`` files the request, its attempts and its
decisions into plain counters and bucket lists (a dict look-up and a ``bisect`` each), and the
Prometheus metric families are built only when someone scrapes (``_Collector.collect``), where
the health gauges are read from the supervisor too. ``prometheus_client``'s own ``Histogram``
takes a lock and a label look-up per observation, several times what a request costs here.

Labels are bounded sets: the configured route and provider names, categories, actions and the
rule ids of the policy (``policy.rule``, never the matched value); anything else (a name not in
the configuration, more distinct rule ids than ``MAX_RULES``) is counted under ``other``.
Messages and failure texts are never labels; a deployment's model is one (``model``, on the
``relayrace_deployment_*`` metrics) only if it is configured — a provider's ``model`` or a
route's name — and ``other`` otherwise, so that a caller who invents model names behind a
passthrough ``*`` route cannot grow the label set; ``""`` is the provider as a whole.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._errors import RequestFailed
from .._events import Event, EventKind
from .._failure import Category
from .._record import Outcome
from .._values import Reply
from ..actors import State
from ..state import StateStatistics
from ..supervisor import Observer, RequestInfo, RequestTiming, SupervisorView

#: Label value for anything outside the bounded sets.
OTHER = "other"
#: Most distinct rule ids counted apart; later ones are counted as ``other``.
MAX_RULES = 100

# Bucket bounds: the OpenTelemetry GenAI conventions' advice where it gives one.
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

#: The health state gauge's values.
HEALTH_VALUES = {State.OK: 0, State.PROBING: 1, State.BENCHED: 2, State.GAVE_UP: 3}

#: The operator's actions counted by ``relayrace_admin_actions_total`` (``Supervisor.record_admin``).
ADMIN_ACTIONS = frozenset(
    {"bench", "unbench", "drain", "drain_provider", "reload", "reload_refused"}
)
_CATEGORIES = frozenset(c.value for c in Category)
_OK = Outcome.OK


class _Histogram:
    """Bucket counts and a sum; ``counts[i]`` holds the values ``<= bounds[i]`` and above the
    bound before (the last one: above every bound).

    ``add`` only appends to ``pending`` (the hot path); ``flush`` files what is pending into
    the buckets, in one loop, at a scrape or when ``FLUSH_AT`` values wait.
    """

    __slots__ = ("bounds", "counts", "total", "pending", "add")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.pending: list[float] = []
        self.add = self.pending.append

    def flush(self) -> None:
        pending = self.pending
        if pending:
            counts, bounds = self.counts, self.bounds
            for value in pending:
                counts[bisect_left(bounds, value)] += 1
            self.total += sum(pending)
            pending.clear()

    def merge(self, other: _Histogram) -> None:
        other.flush()
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def buckets(self) -> list[tuple[str, float]]:
        self.flush()
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


#: Values a histogram keeps pending before it files them.
FLUSH_AT = 1024


class _RequestStats:
    """The requests of one (route, provider, outcome)."""

    __slots__ = ("duration", "ttft", "tpot", "overhead", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.duration = _Histogram(DURATION_BUCKETS)
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.tpot = _Histogram(TPOT_BUCKETS)
        self.overhead = _Histogram(OVERHEAD_BUCKETS)
        self.tokens_in = 0
        self.tokens_out = 0

    def flush(self) -> None:
        for hist in (self.duration, self.ttft, self.tpot, self.overhead):
            hist.flush()


class Metrics(Observer):
    """Prometheus metrics of one supervisor: pass it to ``open_supervisor(config,
    observers=[metrics])``, then serve ``metrics.registry`` (``serve_metrics``) or read
    ``metrics.render()``.

    Each ``Metrics`` has its own ``CollectorRegistry`` (never the process-wide one), so two
    supervisors in one process never share or collide; one ``Metrics`` watches one supervisor.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._supervisor: SupervisorView | None = None
        self._routes: frozenset[str] = frozenset()
        self._providers: frozenset[str] = frozenset()
        self._requests: dict[tuple[str, str, str], _RequestStats] = {}
        self._attempts: dict[tuple[str, str, str], _Histogram] = {}
        self._decisions: dict[tuple[str, str, str, str], int] = {}
        self._rules: set[str] = set()
        self._health_events: dict[tuple[str, str], int] = {}
        self._admin_actions: dict[str, int] = {}
        self._models: frozenset[str] = frozenset()
        self._deployment_events: dict[tuple[str, str, str], int] = {}
        self._state_degraded = 0  # the shared state's store is away (state_degraded)
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    # --- observer callbacks ----------------------------------------------------------------

    def supervisor_started(self, supervisor: SupervisorView) -> None:
        if self._supervisor is not None and self._supervisor is not supervisor:
            raise RuntimeError("a Metrics watches one supervisor; make one per supervisor")
        self._supervisor = supervisor
        # Called again after each reload: names once configured stay labels (their series
        # exist), so the label sets only grow by what the operator configures.
        self._routes |= frozenset(supervisor.routes)
        self._providers |= frozenset(supervisor.health())
        # The configured models: route names and providers' models (``Supervisor.config``,
        # where the supervisor has one).
        config = getattr(supervisor, "config", None)
        models = {name for name in supervisor.routes if name != "*"}
        models |= {p.model for p in getattr(config, "providers", ()) if p.model is not None}
        self._models |= frozenset(models)

    def request_ended(
        self, outcome: Reply | RequestFailed, info: RequestInfo, timing: RequestTiming
    ) -> None:
        # The hot path: appends and dict look-ups only (see the module's docstring).
        if type(outcome) is Reply:
            reply: Reply | None = outcome
            key = (info.route, outcome.provider, "ok")
        else:
            assert isinstance(outcome, RequestFailed)
            reply = None
            failure = outcome.failure
            key = (info.route, failure.provider or "none", failure.category.value)
        stats = self._requests.get(key)
        if stats is None:
            stats = self._request_stats(key)
        latency, first, provider_time, backoff = timing
        duration = stats.duration
        duration.add(latency)
        own = latency - provider_time - backoff  # ``RequestTiming.overhead``, inlined
        stats.overhead.add(own if own > 0.0 else 0.0)
        if reply is not None:
            if first is not None:
                stats.ttft.add(first)
            usage = reply.usage
            if usage is not None:
                stats.tokens_in += usage.prompt_tokens
                out = usage.completion_tokens
                stats.tokens_out += out
                if first is not None and out > 1:
                    stats.tpot.add((latency - first) / (out - 1))
        if len(duration.pending) >= FLUSH_AT:
            stats.flush()
        attempts = self._attempts
        for a in outcome.attempts:
            why = a.failure
            if why is None:
                akey = (a.actor, "ok" if a.outcome is _OK else "cancelled", "")
            else:
                akey = (a.actor, a.outcome.value, why.category.value)
            hist = attempts.get(akey)
            if hist is None:
                hist = self._attempt_hist(akey)
            hist.add(a.ended_at - a.started_at)
            if len(hist.pending) >= FLUSH_AT:
                hist.flush()
        if outcome.decisions:
            self._count_decisions(outcome)

    def health_changed(self, event: Event) -> None:
        if event.kind is EventKind.ADMIN_ACTION:
            action = event.detail if event.detail in ADMIN_ACTIONS else OTHER
            self._admin_actions[action] = self._admin_actions.get(action, 0) + 1
            return
        if event.kind in (EventKind.STATE_DEGRADED, EventKind.STATE_RESTORED):
            self._state_degraded = int(event.kind is EventKind.STATE_DEGRADED)
            return
        key = (self._provider(event.actor or ""), event.kind.value)
        self._health_events[key] = self._health_events.get(key, 0) + 1
        dkey = (key[0], self._model(event.model), key[1])
        self._deployment_events[dkey] = self._deployment_events.get(dkey, 0) + 1

    # --- bounded labels ----------------------------------------------------------------------

    def _route(self, name: str) -> str:
        return name if name in self._routes else OTHER

    def _provider(self, name: str) -> str:
        return name if name in self._providers or name == "none" else OTHER

    def _model(self, model: str | None) -> str:
        if model is None:
            return ""
        return model if model in self._models else OTHER

    def _request_stats(self, key: tuple[str, str, str]) -> _RequestStats:
        route, provider, result = key
        bounded = (
            self._route(route),
            self._provider(provider),
            result if result == "ok" or result in _CATEGORIES else OTHER,
        )
        stats = self._requests.get(bounded)
        if stats is None:
            stats = self._requests[bounded] = _RequestStats()
        return stats

    def _attempt_hist(self, key: tuple[str, str, str]) -> _Histogram:
        actor, result, category = key
        bounded = (
            self._provider(actor),
            result,
            category if not category or category in _CATEGORIES else OTHER,
        )
        hist = self._attempts.get(bounded)
        if hist is None:
            hist = self._attempts[bounded] = _Histogram(DURATION_BUCKETS)
        return hist

    def _count_decisions(self, outcome: Reply | RequestFailed) -> None:
        decisions = self._decisions
        for d in outcome.decisions:
            rule = f"{d.rule.policy}.{d.rule.rule}"
            if rule not in self._rules:
                if len(self._rules) >= MAX_RULES:
                    rule = OTHER
                else:
                    self._rules.add(rule)
            category = d.category or ""
            key = (
                d.action.value,
                self._provider(d.actor or "none"),
                category if not category or category in _CATEGORIES else OTHER,
                rule,
            )
            decisions[key] = decisions.get(key, 0) + 1


class _Collector(Collector):
    """Builds the metric families of a ``Metrics`` when the registry is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield from self._requests(m)
        attempts = HistogramMetricFamily(
            "gen_ai_client_operation_duration_seconds",
            "Duration of each attempt on a provider, in seconds, by provider, outcome "
            "(ok/failed/cancelled) and error type (the failure's category).",
            labels=("provider", "outcome", "error_type"),
            unit="seconds",
        )
        for key, hist in sorted(m._attempts.items()):
            attempts.add_metric(list(key), hist.buckets(), hist.total)
        yield attempts
        decisions = CounterMetricFamily(
            "relayrace_decisions",
            "Routing decisions (retry, failover, skip, stop) by action, provider, failure "
            "category and the rule that made them (policy.rule).",
            labels=("action", "provider", "category", "rule"),
        )
        for dkey, n in sorted(m._decisions.items()):
            decisions.add_metric(list(dkey), n)
        yield decisions
        events = CounterMetricFamily(
            "relayrace_provider_health_events",
            "Health changes of each provider's actor by kind (actor_benched, actor_probing, "
            "actor_recovered, actor_restarted, actor_gave_up; fleet_benched, fleet_unbenched: "
            "another instance's bench reaching this one).",
            labels=("provider", "kind"),
        )
        for hkey, n in sorted(m._health_events.items()):
            events.add_metric(list(hkey), n)
        yield events
        admin = CounterMetricFamily(
            "relayrace_admin_actions",
            "Operator actions through the admin API or a signal, by action (bench, unbench, "
            "drain, drain_provider, reload, reload_refused).",
            labels=("action",),
        )
        for action, n in sorted(m._admin_actions.items()):
            admin.add_metric([action], n)
        yield admin
        deployment_events = CounterMetricFamily(
            "relayrace_deployment_health_events",
            "Health changes by provider, deployment (model: a configured one, other, or empty "
            "for the provider as a whole) and kind.",
            labels=("provider", "model", "kind"),
        )
        for ekey, n in sorted(m._deployment_events.items()):
            deployment_events.add_metric(list(ekey), n)
        yield deployment_events
        yield GaugeMetricFamily(
            "relayrace_state_degraded",
            "1 while the shared state's store (Redis) is away and this process serves on local "
            "state ([state] backend = \"redis\"), else 0.",
            value=m._state_degraded,
        )
        if m._supervisor is not None:
            yield from self._live(m._supervisor)

    def _requests(self, m: Metrics) -> Iterator[Metric]:
        labels = ("route", "provider", "outcome")
        duration = HistogramMetricFamily(
            "gen_ai_server_request_duration_seconds",
            "Duration of each request through the gateway, in seconds, by route, the provider "
            "that served it (or failed it last) and outcome (ok or the failure's category).",
            labels=labels,
            unit="seconds",
        )
        ttft = HistogramMetricFamily(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from a successful request's start to the first token its caller got.",
            labels=("route", "provider"),
            unit="seconds",
        )
        tpot = HistogramMetricFamily(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, of successful requests.",
            labels=("route", "provider"),
            unit="seconds",
        )
        tokens = CounterMetricFamily(
            "relayrace_tokens",
            "Tokens used by successful requests as their providers reported them, by route, "
            "provider and token type (input/output).",
            labels=("route", "provider", "token_type"),
        )
        overheads: dict[str, _Histogram] = {}
        for key, stats in sorted(m._requests.items()):
            route, provider, result = key
            duration.add_metric(list(key), stats.duration.buckets(), stats.duration.total)
            merged = overheads.get(route)
            if merged is None:
                merged = overheads[route] = _Histogram(OVERHEAD_BUCKETS)
            merged.merge(stats.overhead)
            if result != "ok":
                continue
            for family, hist in ((ttft, stats.ttft), (tpot, stats.tpot)):
                family.add_metric([route, provider], hist.buckets(), hist.total)
            tokens.add_metric([route, provider, "input"], stats.tokens_in)
            tokens.add_metric([route, provider, "output"], stats.tokens_out)
        overhead = HistogramMetricFamily(
            "relayrace_gateway_overhead_seconds",
            "Time of each request spent in the gateway itself: its duration less the time "
            "waiting on providers and the pauses before retries.",
            labels=("route",),
            unit="seconds",
        )
        for route, hist in sorted(overheads.items()):
            overhead.add_metric([route], hist.buckets(), hist.total)
        yield from (duration, ttft, tpot, tokens, overhead)

    def _live(self, sup: SupervisorView) -> Iterator[Metric]:
        try:
            health = sup.health()
            stats = sup.statistics()
            depths = sup.inbox_depths()
        except RuntimeError:  # scraped from outside the supervisor's trio run
            return
        state = GaugeMetricFamily(
            "relayrace_provider_health_state",
            "Health of each provider's actor: 0 ok, 1 probing, 2 benched, 3 gave up.",
            labels=("provider",),
        )
        in_flight = GaugeMetricFamily(
            "relayrace_provider_in_flight",
            "Attempts running on each provider.",
            labels=("provider",),
        )
        benches = GaugeMetricFamily(
            "relayrace_provider_bench_count",
            "Automatic benches of each provider in a row since its last success.",
            labels=("provider",),
        )
        failures = GaugeMetricFamily(
            "relayrace_provider_consecutive_failures",
            "Counted failures of each provider since its last success.",
            labels=("provider",),
        )
        deployments = GaugeMetricFamily(
            "relayrace_deployment_health_state",
            "Health of each deployment a provider has served: 0 ok, 1 probing, 2 benched (by "
            "provider and model; the worst of those counted as other).",
            labels=("provider", "model"),
        )
        inbox = GaugeMetricFamily(
            "relayrace_provider_inbox_depth",
            "Attempts waiting in each provider's inbox for a free slot.",
            labels=("provider",),
        )
        drained = GaugeMetricFamily(
            "relayrace_provider_drained",
            "1 while a provider is drained (POST /admin/providers/{name}/drain), else 0.",
            labels=("provider",),
        )
        for name, snap in sorted(health.items()):
            state.add_metric([name], HEALTH_VALUES.get(snap.state, 0))
            drained.add_metric([name], 1.0 if snap.bench_reason == "drained" else 0.0)
            in_flight.add_metric([name], snap.in_flight)
            inbox.add_metric([name], depths.get(name, 0))
            benches.add_metric([name], snap.bench_count)
            failures.add_metric([name], snap.consecutive_failures)
            worst: dict[str, int] = {}
            for model, d in snap.deployments.items():
                label = self._m._model(model)
                worst[label] = max(worst.get(label, 0), HEALTH_VALUES.get(d.state, 0))
            for label, v in sorted(worst.items()):
                deployments.add_metric([name, label], v)
        yield from (state, in_flight, inbox, benches, failures, deployments, drained)
        yield GaugeMetricFamily(
            "relayrace_requests_in_flight", "Requests in flight.", value=stats.in_flight
        )
        tokens = stats.retry_tokens
        yield GaugeMetricFamily(
            "relayrace_retry_budget_tokens",
            "Retries the supervisor-wide retry budget allows now.",
            value=tokens if math.isfinite(tokens) else 0.0,
        )
        yield CounterMetricFamily(
            "relayrace_events_dropped",
            "Events a lagging subscriber lost (subscribe(), not the metrics).",
            value=stats.events_dropped,
        )
        if sup.shared_state is not None:
            yield from _shared_state(sup.shared_state.statistics())


def _shared_state(stats: StateStatistics) -> Iterator[Metric]:
    """The shared state's store as this process sees it ([state] backend = "redis")."""
    yield GaugeMetricFamily(
        "relayrace_state_connected",
        "1 while this process has a session with the shared state's store, else 0.",
        value=1.0 if stats.connected else 0.0,
    )
    yield GaugeMetricFamily(
        "relayrace_state_instances",
        "Instances sharing the state as of this process's last full read, itself included.",
        value=stats.instances,
    )
    yield GaugeMetricFamily(
        "relayrace_state_writes_queued",
        "Changes to the shared state waiting for the background writer.",
        value=stats.queued,
    )
    for name, text, value in (
        (
            "relayrace_state_writes_dropped",
            "Changes not queued because the writer's queue was full ([state] queue_size); "
            "benches and pins among them are published again by the next full read.",
            stats.dropped,
        ),
        ("relayrace_state_reconnects", "Sessions with the store lost and tried again.", stats.reconnects),
        (
            "relayrace_state_republished",
            "Benches and pins the store lacked (restarted, flushed) and were written again.",
            stats.republished,
        ),
        (
            "relayrace_state_messages_ignored",
            "Messages on the shared channel that were not relayrace's (ignored).",
            stats.ignored,
        ),
    ):
        yield CounterMetricFamily(name, text, value=value)
