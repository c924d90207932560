"""The state workload's part of the report (issue #16): the cost table, the bench propagation,
and its targets (met / not met)."""

from __future__ import annotations

from typing import Any

#: The target of issue #16: the shared state's gateway CPU per request over local state.
COST_TARGET_PCT = 3.0
#: The target of issue #16: a bench seen by the other instances within this, on loopback.
PROPAGATION_TARGET_MS = 100.0


def state_targets(state: dict[str, Any]) -> list[tuple[str, str, float | None, str, bool | None]]:
    """Issue #16's targets: (name, goal, measured, unit, met)."""
    out: list[tuple[str, str, float | None, str, bool | None]] = []
    for row in (state.get("summary") or {}).get("rows") or []:
        cost = row["cpu_cost_pct"]
        out.append(
            (
                f"shared state: gateway CPU per request, redis vs local, {row['scenario']} "
                f"{row['mode']}, c=32, 2 workers",
                f"≤ +{COST_TARGET_PCT:g} %",
                cost,
                "%",
                cost is not None and cost <= COST_TARGET_PCT,
            )
        )
    ms = ((state.get("summary") or {}).get("propagation") or {}).get("latency_ms") or {}
    for q in ("p50", "p99"):
        value = ms.get(q)
        out.append(
            (
                f"a bench seen by the other process, {q}",
                f"≤ {PROPAGATION_TARGET_MS:g}",
                value,
                "ms",
                value is not None and value <= PROPAGATION_TARGET_MS,
            )
        )
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def state_markdown(state: dict[str, Any] | None) -> list[str]:
    """The state section of the Markdown report."""
    if not state:
        return []
    title = '## 7. Shared state: `[state] backend = "redis"` vs `"local"` (issue #16)'
    if state.get("skipped"):
        return [title, "", f"Skipped: {state['skipped']}", ""]
    summary, p = state["summary"], state.get("parameters") or {}
    lines = [
        title,
        "",
        f"Two `relayrace serve --workers 2`, the same config but for `[state] backend`, one "
        f"redis-server {state.get('redis_server') or ''} on loopback; `wrk` at c={p.get('clients')} "
        f"for {p.get('seconds')} s per run, the two backends' runs interleaved, "
        f"{p.get('repeats')} repeat(s), medians. `healthy`: one healthy provider; `failing`: "
        "the first provider answers 503 to every request and is exempt from benching (every "
        "request fails over and writes its failure count); `outage`: the first provider answers "
        "503 and is benched (0.1 s benches, a probe under the fleet's lease every 0.1 s). "
        "Gateway CPU: the serve process and its workers; redis-server's CPU is given apart and "
        "is not in the gateway's. Cost: redis / local gateway CPU per request within each pair "
        "of runs, median. Redis scripts / commands per request: what redis-server ran during the "
        "redis runs (`INFO commandstats`: the `EVALSHA`s, and every command including those "
        "the scripts ran).",
        "",
        "| scenario | mode | local req/s | redis req/s | local CPU ms/req | redis CPU ms/req "
        "| cost | redis-server CPU ms/req | cost incl. redis-server | Redis scripts / commands "
        "per req "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lo, re_ = r["local"], r["redis"]
        lines.append(
            f"| {r['scenario']} | {r['mode']} | {_fmt(lo['throughput_rps'], 0)} "
            f"| {_fmt(re_['throughput_rps'], 0)} | {_fmt(lo['gateway_cpu_ms_per_request'], 3)} "
            f"| {_fmt(re_['gateway_cpu_ms_per_request'], 3)} | {_fmt(r['cpu_cost_pct'], 1)} % "
            f"| {_fmt(re_['redis_cpu_ms_per_request'], 4)} "
            f"| {_fmt(r['cpu_cost_with_redis_server_pct'], 1)} % "
            f"| {_fmt(re_['redis_scripts_per_request'])} / "
            f"{_fmt(re_['redis_commands_per_request'])} "
            f"| {lo['failed']} / {re_['failed']} |"
        )
    prop = summary.get("propagation") or {}
    ms = prop.get("latency_ms") or {}
    lines += [
        "",
        f"Bench propagation: one process (its own `RedisState`) benches a deployment, another "
        f"(its own) sees it in its mirror: over {prop.get('benches')} benches p50 "
        f"{_fmt(ms.get('p50'))} ms, p90 {_fmt(ms.get('p90'))} ms, p99 {_fmt(ms.get('p99'))} ms, "
        f"max {_fmt(ms.get('max'))} ms (target ≤ {PROPAGATION_TARGET_MS:g} ms; resolution: "
        f"{prop.get('resolution')}).",
        "",
    ]
    return lines
