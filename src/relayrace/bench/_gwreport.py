"""The gateway workload's part of the report: issue #13's table with this run's numbers, its
targets (met / not met), the detail of every run, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_LABELS = {
    "direct": "direct to the mock",
    "http": "`relayrace serve` (HTTP)",
    "http-w2": "`relayrace serve --workers 2` (HTTP)",
    "ws": "`relayrace serve` (websocket)",
    "litellm": "LiteLLM proxy (`litellm --config`, 1 worker)",
}
_RUNS = {
    "sequential": "sequential (c=1, fixed count)",
    "c1": "closed loop c=1",
    "c32": "closed loop c=32",
    "rate": "paced (open loop)",
}


def _find(gw: dict[str, Any], path: str, mode: str, run: str) -> dict[str, Any] | None:
    for row in gw.get("rows") or []:
        if (row["path"], row["mode"], row["run"]) == (path, mode, run):
            return dict(row)
    return None


def _value(gw: dict[str, Any], path: str, mode: str, run: str, key: str) -> float | None:
    row = _find(gw, path, mode, run)
    if row is None:
        return None
    if key in ("p50", "p99"):
        return (row.get("latency_ms") or {}).get(key)
    value = row.get(key)
    return float(value) if value is not None else None


def gateway_targets(gw: dict[str, Any]) -> list[tuple[str, str, float | None, str, bool | None]]:
    """Issue #13's targets: (name, goal, measured, unit, met)."""
    out: list[tuple[str, str, float | None, str, bool | None]] = []
    for mode, ms in (("non-streamed", 1.0), ("streamed", 1.5)):
        value = _value(gw, "http", mode, "c1", "p50_overhead_ms")
        out.append(
            (
                f"HTTP p50 overhead over direct, {mode}, c=1",
                f"≤ {ms}",
                value,
                "ms",
                value is not None and value <= ms,
            )
        )
    for mode, ms in (("non-streamed", 1.2), ("streamed", 1.8)):
        value = _value(gw, "http", mode, "c1", "gateway_cpu_ms_per_request")
        out.append(
            (
                f"HTTP gateway CPU per {mode} request, c=1",
                f"≤ {ms}",
                value,
                "ms",
                value is not None and value <= ms,
            )
        )
    for mode, rps in (("non-streamed", 650), ("streamed", 450)):
        value = _value(gw, "http", mode, "c32", "throughput_rps")
        out.append(
            (
                f"HTTP req/s, {mode}, c=32, one worker",
                f"≥ {rps}",
                value,
                "req/s",
                value is not None and value >= rps,
            )
        )
    for mode in ("non-streamed", "streamed"):
        one = _value(gw, "http", mode, "c32", "throughput_rps")
        two = _value(gw, "http-w2", mode, "c32", "throughput_rps")
        gain = (two / one - 1) * 100 if one and two is not None else None
        out.append(
            (
                f"HTTP req/s gained by --workers 2, {mode}, c=32",
                "≥ +50 %",
                gain,
                "%",
                gain is not None and gain >= 50.0,
            )
        )
    for mode, times in (("non-streamed", 10.0), ("streamed", 20.0)):
        ours = _value(gw, "http", mode, "c32", "throughput_rps")
        theirs = _value(gw, "litellm", mode, "c32", "throughput_rps")
        ratio = ours / theirs if ours is not None and theirs else None
        out.append(
            (
                f"HTTP req/s / LiteLLM proxy req/s, {mode}, c=32",
                f"≥ {times:g}×",
                ratio,
                "×",
                ratio is not None and ratio >= times,
            )
        )
    http = _value(gw, "http", "streamed", "c32", "gateway_cpu_ms_per_request")
    ws = _value(gw, "ws", "streamed", "c32", "gateway_cpu_ms_per_request")
    excess = (http / ws - 1) * 100 if http is not None and ws else None
    out.append(
        (
            "HTTP CPU per streamed request vs websocket, c=32",
            "≤ +10 %",
            excess,
            "%",
            excess is not None and excess <= 10.0,
        )
    )
    return out


def second_worker_ceiling(
    one_ms: float | None,
    gateway_ms: float | None,
    mock_ms: float | None,
    wrk_ms: float | None,
    cores: int | None,
) -> float | None:
    """The most (%) a second worker can add at c=32 on an otherwise idle machine of ``cores``.

    One worker is bound by its own core: 1 / ``one_ms`` req/s (its CPU per request). Two
    workers costing ``gateway_ms`` per request (together), beside the mock's ``mock_ms`` and
    wrk's ``wrk_ms`` on the same cores, by 2 / ``gateway_ms`` and by ``cores`` / (the sum).
    Given one worker's own costs this is the ideal; given those measured with two workers, what
    two workers can reach as they are. ``None`` when a figure is missing."""
    if not one_ms or not gateway_ms or mock_ms is None or wrk_ms is None or not cores:
        return None
    two = min(2 / gateway_ms, cores / (gateway_ms + mock_ms + wrk_ms))
    return (two * one_ms - 1) * 100


def _costs(row: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """CPU ms per request of the gateway, the mock and wrk in a run."""
    g, m, w = (row.get(f"{k}_cpu_ms_per_request") for k in ("gateway", "mock", "wrk"))
    return g, m, w


def _why_workers(gw: dict[str, Any]) -> tuple[dict[str, float | None], list[str]]:
    """Per mode, the ceiling of the --workers 2 gain, and a line each on what bounds it."""
    ceilings: dict[str, float | None] = {}
    lines = []
    cores = gw.get("cores")
    for mode in ("non-streamed", "streamed"):
        one, two = _find(gw, "http", mode, "c32"), _find(gw, "http-w2", mode, "c32")
        if one is None or two is None:
            continue
        g, m, w = _costs(one)
        g2, m2, w2 = _costs(two)
        ceilings[mode] = ideal = second_worker_ceiling(g, g, m, w, cores)
        real = second_worker_ceiling(g, g2, m2, w2, cores)
        if ideal is None or real is None:
            continue
        lines.append(
            f"- {mode}: per request, one worker used {_fmt(g, 3)} ms of CPU, the mock "
            f"{_fmt(m, 3)}, wrk {_fmt(w, 3)}, all on these {cores} cores: even with the cores "
            f"otherwise idle, a second worker could add at most **{ideal:+.0f} %**. With two, "
            f"the gateway used {_fmt(g2, 3)} ms per request and the mock {_fmt(m2, 3)}: at "
            f"those costs, at most **{real:+.0f} %**. The machine left "
            f"{_fmt(one.get('machine_idle_cores'))} cores idle during the one-worker run and "
            f"{_fmt(two.get('machine_idle_cores'))} during the two-worker run."
        )
    if lines:
        lines = [
            "### Why `--workers 2` adds what it adds here",
            "",
            *lines,
            "",
            "`benchmarks/workers_spread.py` also shows how wrk's 32 connections spread over "
            "the two workers (SO_REUSEPORT's hash; keep-alive keeps the split) and each "
            "process's CPU.",
            "",
        ]
    return ceilings, lines


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def gateway_markdown(
    gw: dict[str, Any], parameters: dict[str, Any], litellm: str | None
) -> list[str]:
    """The gateway section of the Markdown report."""
    labels = dict(_LABELS)
    if litellm:
        labels["litellm"] = f"LiteLLM proxy {litellm} (`litellm --config`, 1 worker)"
    lines = [
        "## 3. Gateway: each path as its users meet it (issue #13)",
        "",
        f"`wrk` (one thread) posting the same chat completion to every HTTP path, the mock "
        f"answering `{gw.get('model')}`; the websocket endpoint by the bench's trio load "
        "generator. Gateway CPU is the gateway process's user+sys time (its forked workers "
        "included) per request. Latency at c=1 is timed per request by the wrk script; at "
        "c>1 it is wrk's histogram (which wrk corrects for coordinated omission).",
        "",
    ]

    def c1(path: str, mode: str, key: str) -> str:
        return _fmt(_value(gw, path, mode, "c1", key))

    def p50(path: str, mode: str) -> str:
        if _find(gw, path, mode, "c1") is None:
            return "–"
        added = f" (+{c1(path, mode, 'p50_overhead_ms')})" if path != "direct" else ""
        return f"{c1(path, mode, 'p50')} ms{added}"

    rows = [
        [
            labels[path],
            p50(path, "non-streamed"),
            c1(path, "non-streamed", "gateway_cpu_ms_per_request"),
            p50(path, "streamed"),
            c1(path, "streamed", "gateway_cpu_ms_per_request"),
            _fmt(_value(gw, path, "non-streamed", "c32", "throughput_rps"), 0),
            _fmt(_value(gw, path, "streamed", "c32", "throughput_rps"), 0),
        ]
        for path in ("direct", "http", "http-w2", "ws", "litellm")
        if any(r["path"] == path for r in gw.get("rows") or [])
    ]
    lines += _table(
        [
            "path",
            "c=1 non-streamed p50 (+overhead)",
            "CPU ms/req",
            "c=1 streamed p50 (+overhead)",
            "CPU ms/req",
            "c=32 non-streamed req/s",
            "c=32 streamed req/s",
        ],
        rows,
    )
    skipped = {k: v["reason"] for k, v in (gw.get("paths") or {}).items() if not v["available"]}
    lines += [f"- {labels[k]}: not measured: {reason}" for k, reason in skipped.items()]
    if skipped:
        lines.append("")
    lines += ["### Targets of issue #13 in this run", ""]
    ceilings, why = _why_workers(gw)

    def verdict(name: str, value: float | None, met: bool | None) -> str:
        if value is None:
            return "not run"
        if met:
            return "met"
        limit = next((c for m, c in ceilings.items() if name.endswith(f"{m}, c=32")), None)
        if "--workers 2" in name and limit is not None:
            return f"not met: at most {limit:+.0f} % on {gw.get('cores')} cores (below)"
        return "not met"

    lines += _table(
        ["target", "goal", "measured", "met"],
        [
            [
                name,
                goal if goal.endswith(("%", "×")) else f"{goal} {unit}",
                f"{_fmt(value)} {unit}",
                verdict(name, value, met),
            ]
            for name, goal, value, unit, met in gateway_targets(gw)
        ],
    )
    lines += why
    seq = [r for r in gw.get("rows") or [] if r["run"] == "sequential" and r["path"] != "direct"]
    if seq:
        lines += [
            f"### Sequential overhead: c=1, {parameters.get('sequential')} requests per path and "
            "mode (comparable to the published LiteLLM / Portkey / Bifrost overhead figures)",
            "",
        ]
        lines += _table(
            ["path", "mode", "p50 added ms", "p99 added ms", "CPU ms/req", "failed"],
            [
                [
                    labels[r["path"]],
                    r["mode"],
                    _fmt(r.get("p50_overhead_ms"), 3),
                    _fmt(r.get("p99_overhead_ms"), 3),
                    _fmt(r.get("gateway_cpu_ms_per_request"), 3),
                    str(r["failed"]),
                ]
                for r in seq
            ],
        )
    lines += [
        f"### Every run (paced: {parameters.get('rate')} req/s offered over "
        f"{parameters.get('rate_connections')} connections; wrk's Lua `delay()` keeps one "
        "schedule, since Debian's wrk has no `-R`)",
        "",
    ]
    lines += _table(
        [
            "path",
            "mode",
            "run",
            "conn.",
            "requests",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p50 +ms",
            "p99 +ms",
            "CPU ms/req",
            "failed",
        ],
        [
            [
                r["path"],
                r["mode"],
                _RUNS.get(r["run"], r["run"]),
                str(r["connections"]),
                str(r["requests"]),
                _fmt(r["throughput_rps"], 0),
                _fmt((r["latency_ms"] or {}).get("p50")),
                _fmt((r["latency_ms"] or {}).get("p99")),
                _fmt(r.get("p50_overhead_ms")),
                _fmt(r.get("p99_overhead_ms")),
                _fmt(r.get("gateway_cpu_ms_per_request")),
                str(r["failed"]),
            ]
            for r in gw.get("rows") or []
        ],
    )
    return lines


def gateway_plot(gw: dict[str, Any], pyplot: Any, out: Path, suffix: str, run: str) -> list[str]:
    """One figure: c=32 req/s, c=1 p50 overhead, c=1 gateway CPU per request, by path and mode."""
    paths = [
        p
        for p in ("direct", "http", "http-w2", "ws", "litellm")
        if any(r["path"] == p for r in gw.get("rows") or [])
    ]
    if not paths:
        return []
    panels = (
        ("c32", "throughput_rps", "req/s at c=32", True),
        ("c1", "p50_overhead_ms", "p50 overhead over direct at c=1 (ms)", False),
        ("c1", "gateway_cpu_ms_per_request", "gateway CPU per request at c=1 (ms)", False),
    )
    figure, axes = pyplot.subplots(1, len(panels), figsize=(15, 4.5))
    width = 0.38
    for ax, (which, key, title, log) in zip(axes, panels, strict=True):
        for offset, mode in ((-width / 2, "non-streamed"), (width / 2, "streamed")):
            values = [_value(gw, p, mode, which, key) or 0.0 for p in paths]
            ax.bar([i + offset for i in range(len(paths))], values, width, label=mode)
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels(paths)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    figure.suptitle(f"gateways in front of the same mock, wrk one thread ({run})")
    figure.tight_layout()
    path = out / f"gateway{suffix}.png"
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return [str(path)]
