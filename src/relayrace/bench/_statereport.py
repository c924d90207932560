"""The state workload's part of the report (issue #16): the cost table, the bench propagation,
and its targets (met / not met)."""

from __future__ import annotations

from typing import Any

from ._common import median

#: The target of issue #16: the shared state's gateway CPU per request over local state.
COST_TARGET_PCT = 3.0
#: The target of issue #16: a bench seen by the other instances within this, on loopback.
PROPAGATION_TARGET_MS = 100.0


#: The gateways of the state workload: the two backends and the A/A control (a second local).
_GATEWAYS = ("local", "redis", "local-aa")
_MODES = ("non-streamed", "streamed")
_MEDIANS = (
    "throughput_rps",
    "gateway_cpu_ms_per_request",
    "redis_cpu_ms_per_request",
    "redis_commands_per_request",
    "redis_scripts_per_request",
)


def _change(new: float | None, base: float | None) -> float | None:
    return None if new is None or not base else (new / base - 1) * 100


def _spread(values: list[float | None]) -> dict[str, float | None]:
    """The median of ``values`` with their min and max (``None`` where there are none)."""
    present = [v for v in values if v is not None]
    return {
        "median": median(present),
        "min": min(present, default=None),
        "max": max(present, default=None),
    }


def summarise_state(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario and mode: each gateway's medians; per repeat (a triple of runs), the cost
    (redis / local gateway CPU per request) and the A/A control (local-aa / local), each as
    the median over the repeats with its spread."""
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        for mode in _MODES:
            mine = [r for r in rows if (r["scenario"], r["mode"]) == (scenario, mode)]
            if not mine:
                continue
            row: dict[str, Any] = {"scenario": scenario, "mode": mode}
            for name in _GATEWAYS:
                runs = [r for r in mine if r["backend"] == name]
                if not runs:
                    continue
                row[name] = {key: median([r[key] for r in runs]) for key in _MEDIANS} | {
                    "p50_ms": median([(r["latency_ms"] or {}).get("p50") for r in runs]),
                    "p99_ms": median([(r["latency_ms"] or {}).get("p99") for r in runs]),
                    "requests": sum(r["requests"] for r in runs),
                    "failed": sum(r["failed"] for r in runs),
                }
            costs, control, both, with_redis, throughput = [], [], [], [], []
            for repeat in sorted({r["repeat"] for r in mine}):
                triple = {r["backend"]: r for r in mine if r["repeat"] == repeat}
                local, redis, aa = (triple.get(n) for n in _GATEWAYS)
                if local is None or redis is None:
                    continue
                cpu = "gateway_cpu_ms_per_request"
                costs.append(_change(redis[cpu], local[cpu]))
                server = redis["redis_cpu_ms_per_request"]
                if redis[cpu] is not None and server is not None:
                    with_redis.append(_change(redis[cpu] + server, local[cpu]))
                throughput.append(_change(redis["throughput_rps"], local["throughput_rps"]))
                if aa is not None:
                    control.append(_change(aa[cpu], local[cpu]))
                    if local[cpu] is not None and aa[cpu] is not None:
                        both.append(_change(redis[cpu], (local[cpu] + aa[cpu]) / 2))
            cost, aa_cost = _spread(costs), _spread(control)
            row["cpu_cost_pct"] = cost["median"]
            row["cpu_cost_spread_pct"] = [cost["min"], cost["max"]]
            row["aa_cost_pct"] = aa_cost["median"]
            row["aa_cost_spread_pct"] = [aa_cost["min"], aa_cost["max"]]
            row["cpu_cost_vs_both_locals_pct"] = median(both)
            row["cpu_cost_with_redis_server_pct"] = median(with_redis)
            row["throughput_change_pct"] = median(throughput)
            row["pairs"] = len([c for c in costs if c is not None])
            row["per_repeat"] = {"cost_pct": costs, "aa_pct": control, "vs_both_locals_pct": both}
            out.append(row)
    return out


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


def _spread_text(spread: dict[str, float | None]) -> str:
    return _pct(spread["median"], [spread["min"], spread["max"]])


def _pct(value: float | None, spread: list[float | None] | None) -> str:
    low, high = spread or (None, None)
    if low is None or high is None:
        return f"{_fmt(value, 1)} %"
    return f"{_fmt(value, 1)} % [{low:+.1f}, {high:+.1f}]"


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
        f"Three `relayrace serve --workers 2`, the same config but for `[state] backend`: "
        f"`local`, `redis` (one redis-server {state.get('redis_server') or ''} on loopback) and "
        f"`local-aa`, a second `local` (the A/A control); `wrk` at c={p.get('clients')} for "
        f"{p.get('seconds')} s per run, the three gateways' runs interleaved (the order rotates "
        f"through the permutations), {p.get('repeats')} repeat(s). `healthy`: one healthy "
        "provider; `failing`: the first provider answers 503 to every request and is exempt "
        "from benching (every request fails over; its failure count stays past the threshold); "
        "`flapping`: the first provider, exempt too, is down (503) 20 ms and up 20 ms in turn "
        "(half the requests fail over; the count reaches the threshold and resets ~25 times a "
        "second); `outage`: the "
        "first provider answers 503 and is benched (0.1 s benches, a probe under the fleet's "
        "lease every 0.1 s). Gateway CPU: the serve process and its workers; redis-server's CPU "
        "is given apart and is not in the gateway's. Cost: redis / local gateway CPU per "
        "request within each repeat; A/A: local-aa / local the same way, the noise floor a "
        "cost must clear: the median over the repeats, [min, max]. Redis scripts / commands "
        "per request: what redis-server ran during the redis runs (`INFO commandstats`: the "
        "`EVALSHA`s, and every command including those the scripts ran).",
        "",
        "| scenario | mode | local req/s | redis req/s | local CPU ms/req | redis CPU ms/req "
        "| cost [min, max] | A/A [min, max] | redis-server CPU ms/req | cost incl. redis-server "
        "| Redis scripts / commands per req | failed (local / redis / A/A) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lo, re_ = r["local"], r["redis"]
        aa = r.get("local-aa") or {}
        lines.append(
            f"| {r['scenario']} | {r['mode']} | {_fmt(lo['throughput_rps'], 0)} "
            f"| {_fmt(re_['throughput_rps'], 0)} | {_fmt(lo['gateway_cpu_ms_per_request'], 3)} "
            f"| {_fmt(re_['gateway_cpu_ms_per_request'], 3)} "
            f"| {_pct(r['cpu_cost_pct'], r.get('cpu_cost_spread_pct'))} "
            f"| {_pct(r.get('aa_cost_pct'), r.get('aa_cost_spread_pct'))} "
            f"| {_fmt(re_['redis_cpu_ms_per_request'], 4)} "
            f"| {_fmt(r['cpu_cost_with_redis_server_pct'], 1)} % "
            f"| {_fmt(re_['redis_scripts_per_request'])} / "
            f"{_fmt(re_['redis_commands_per_request'])} "
            f"| {lo['failed']} / {re_['failed']} / {_fmt(aa.get('failed'))} |"
        )
    pooled = {
        key: _spread([v for r in summary["rows"] for v in (r.get("per_repeat") or {}).get(key, [])])
        for key in ("cost_pct", "aa_pct", "vs_both_locals_pct")
    }
    if pooled["cost_pct"]["median"] is not None:
        lines += [
            "",
            f"Pooled over every scenario, mode and repeat "
            f"({len(summary['rows'])} × {p.get('repeats')} triples), median [min, max]: cost "
            f"{_spread_text(pooled['cost_pct'])}, A/A {_spread_text(pooled['aa_pct'])}; redis "
            f"against the mean of the two local gateways of its triple (halves the baseline's "
            f"noise): {_spread_text(pooled['vs_both_locals_pct'])}.",
        ]
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
