"""``relayrace bench``: the load benchmarks of issue #6, side by side, reproducible.

Every workload runs against the mock provider in its own process; every peer runs in its own
worker process (trio for bare httpx and relayrace, asyncio for LiteLLM), with the same request,
the same count, the same concurrency and the same mock. Ratios are taken within one repeat;
the summary reports medians over the repeats.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import MODES, BenchError, cpu_seconds_of, machine, median
from ._procs import Runner, mock_process
from ._progress import Progress
from ._report import targets, write_reports
from ._routing_bench import routing_params, routing_weight, run_routing_workload
from ._state import run_state_workload, state_params, state_weight

WORKLOADS = ("overhead", "compare", "gateway", "scale", "faults", "routing", "state")

# Rough seconds per request of each peer, for the progress bar's weights only.
_COST = {"httpx": 0.0012, "relayrace": 0.0016, "litellm": 0.012}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected whole numbers, 1 or more")
    return values


def _workloads(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload {', '.join(unknown) or '(none)'}; choose from {', '.join(WORKLOADS)}"
        )
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relayrace bench",
        description="Load benchmarks: relayrace vs bare httpx vs LiteLLM's Router, against the "
        "mock provider run as its own process. Writes a results JSON and a Markdown table "
        "(and PNG plots when matplotlib is installed) under --out.",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run that ends within a minute")
    p.add_argument(
        "--only", type=_workloads, default=list(WORKLOADS), help=f"workloads: {','.join(WORKLOADS)}"
    )
    p.add_argument("--repeats", type=int, help="repeats of each comparison (medians reported)")
    p.add_argument("--requests", type=int, help="measured requests per peer, mode and concurrency")
    p.add_argument("--concurrency", type=_ints, help="concurrency levels, e.g. 1,8,50,128")
    p.add_argument("--scale", type=_ints, help="in-flight stream counts, e.g. 1,10,100,1000,10000")
    p.add_argument("--chunks", type=int, default=20, help="deltas per streamed answer (20)")
    p.add_argument("--rate", type=int, help="gateway: paced (open-loop) request rate per second (500)")
    p.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="where results go"
    )
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters of the run, from the options and the quick / full defaults."""
    quick = args.quick
    litellm = not args.no_litellm and importlib.util.find_spec("litellm") is not None
    return {
        "quick": quick,
        "workloads": args.only,
        "repeats": args.repeats or (1 if quick else 3),
        "requests": args.requests or (60 if quick else 400),
        "concurrency": args.concurrency or ([1, 8] if quick else [1, 8, 50, 128]),
        "chunks": args.chunks,
        "overhead": {
            "requests": args.requests or (300 if quick else 2000),
            "rounds": 3 if quick else 6,
            "concurrency": 1,
        },
        "scale": args.scale or ([10, 100] if quick else [1, 10, 100, 1000, 10000]),
        # bare httpx, for reference, up to this many streams
        "scale_httpx_up_to": 0 if quick else 1000,
        "faults": {
            "seconds": 2.0 if quick else 15.0,
            "concurrency": 8 if quick else 32,
            "modes": ["complete"] if quick else ["complete", "stream"],
        },
        "gateway": {
            "rate": args.rate or (100 if quick else 500),
            "rate_connections": 16 if quick else 64,
            "seconds": 1.0 if quick else 8.0,
            "clients": 32,
            "sequential": 50 if quick else 1000,
            "warmup": 0.0 if quick else 1.0,
            "chunks": args.chunks,
            "litellm": litellm,
        },
        "routing": routing_params(quick, args.requests),
        "state": state_params(quick, args.requests, args.repeats),
        "peers": ["httpx", "relayrace"] + (["litellm"] if litellm else []),
        "litellm_available": litellm,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; return the exit status (1 if a workload could not run at all)."""
    args = parser().parse_args(argv)
    params = plan(args)
    started = time.time()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "schema": 1,
        "run": stamp,
        "command": "relayrace bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "machine": machine(),
        "parameters": params,
        "errors": [],
    }
    progress = Progress(_weight(params), stream=open(os.devnull, "w") if args.quiet else None)
    try:
        with mock_process() as (url, mock_pid):
            results["mock"] = {"url": url}
            mock_cpu = cpu_seconds_of(mock_pid)
            runner = _Runner(url, params, progress, results["errors"])
            for workload in WORKLOADS:
                if workload in params["workloads"]:
                    results[workload] = getattr(runner, workload)()
            mock_cpu_end = cpu_seconds_of(mock_pid)
            if mock_cpu is not None and mock_cpu_end is not None:
                results["mock"]["cpu_s"] = round(mock_cpu_end - mock_cpu, 3)
    except BenchError as exc:
        progress.close()
        print(f"relayrace bench: {exc}", file=sys.stderr)
        return 1
    progress.close()
    results["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat()
    results["duration_s"] = round(time.time() - started, 2)
    results["targets"] = targets(results)
    paths = write_reports(results, args.out, plots_wanted=not args.no_plots)
    if not args.quiet:
        print(paths["markdown_text"])
        for kind in ("json", "markdown", "plots"):
            value = paths.get(kind)
            if value:
                print(f"{kind}: {value}", file=sys.stderr)
    return 0


def _weight(params: dict[str, Any]) -> float:
    total = 0.0
    workloads = params["workloads"]
    if "overhead" in workloads:
        total += params["overhead"]["requests"] * 2 * 3 * 0.0015
    if "compare" in workloads:
        per = params["requests"] * 1.2 * len(MODES) * len(params["concurrency"])
        total += params["repeats"] * sum(per * _COST[p] for p in params["peers"])
    if "gateway" in workloads:
        from ._gateway import workload_weight

        total += workload_weight(params["gateway"])
    if "scale" in workloads:
        total += sum(max(2.0, n * 0.01) * 1.5 + 1 for n in params["scale"]) * 2
    if "faults" in workloads:
        total += params["faults"]["seconds"] * len(params["faults"]["modes"]) + 1
    if "routing" in workloads:
        total += routing_weight(params["routing"])
    if "state" in workloads:
        total += state_weight(params["state"])
    return total


class _Runner(Runner):
    """The workloads: each runs its jobs in worker processes and summarises their results."""

    # --- workload 1 ---

    def overhead(self) -> dict[str, Any]:
        p = self.params["overhead"]
        job = {
            "kind": "overhead",
            "requests": p["requests"],
            "rounds": p["rounds"],
            "chunks": self.params["chunks"],
            "tag": self.tag("ovh"),
        }
        runs = []
        for repeat in range(self.params["repeats"]):
            (result,) = self.run(
                "trio",
                [job | {"tag": self.tag("ovh")}],
                [p["requests"] * 6 * 0.0015],
                [f"overhead: supervisor vs bare httpx, repeat {repeat + 1}"],
            )
            if result is not None and "error" not in result:
                runs.append(result)
        summary: dict[str, Any] = {}
        for mode in ("complete", "stream"):
            row: dict[str, Any] = {}
            for peer in ("httpx", "relayrace"):
                rounds = [r for run in runs for r in run[mode][peer]]
                row[f"{peer}_cpu_us"] = median([r["cpu_us_per_request"] for r in rounds])
                row[f"{peer}_wall_us"] = median([r["wall_us_per_request"] for r in rounds])
            # Ratio per round (the two peers ran back to back), then the median.
            ratios = [
                (s["cpu_us_per_request"] / h["cpu_us_per_request"])
                for run in runs
                for h, s in zip(run[mode]["httpx"], run[mode]["relayrace"], strict=True)
            ]
            wall_ratios = [
                (s["wall_us_per_request"] / h["wall_us_per_request"])
                for run in runs
                for h, s in zip(run[mode]["httpx"], run[mode]["relayrace"], strict=True)
            ]
            cpu_ratio, wall_ratio = median(ratios), median(wall_ratios)
            row["cpu_overhead_pct"] = (cpu_ratio - 1) * 100 if cpu_ratio is not None else None
            row["wall_overhead_pct"] = (wall_ratio - 1) * 100 if wall_ratio is not None else None
            row["rounds"] = len(ratios)
            # The metrics' cost: the observed supervisor over the bare one, per round.
            costs = [
                (m["cpu_us_per_request"] / s["cpu_us_per_request"] - 1) * 100
                for run in runs
                for s, m in zip(run[mode]["relayrace"], run[mode].get("metrics", []), strict=False)
            ]
            row["metrics_cpu_us"] = median(
                [r["cpu_us_per_request"] for run in runs for r in run[mode].get("metrics", [])]
            )
            row["metrics_cost_pct"] = median(costs)
            row["scrape_cpu_us"] = median([run.get(f"{mode}_scrape_cpu_us") for run in runs])
            row["scrape_every"] = runs[0]["requests_per_round"] if runs else None
            row["metrics_cost_us"] = median(
                [
                    m["cpu_us_per_request"] - s["cpu_us_per_request"]
                    for run in runs
                    for s, m in zip(
                        run[mode]["relayrace"], run[mode].get("metrics", []), strict=False
                    )
                ]
            )
            summary[mode] = row
        return {"runs": runs, "summary": summary}

    # --- workload 2 ---

    def compare(self) -> dict[str, Any]:
        params = self.params
        peers = params["peers"]
        repeats: list[dict[str, dict[tuple[str, int], dict[str, Any]]]] = []
        for repeat in range(params["repeats"]):
            # Rotate the order of the peers from one repeat to the next.
            order = peers[repeat % len(peers) :] + peers[: repeat % len(peers)]
            by_peer: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
            for peer in order:
                jobs, weights, labels = [], [], []
                for mode in MODES:
                    for concurrency in params["concurrency"]:
                        jobs.append(
                            {
                                "kind": "load",
                                "peer": peer,
                                "mode": mode,
                                "requests": params["requests"],
                                "concurrency": concurrency,
                                "chunks": params["chunks"],
                                "tag": self.tag(peer[:2]),
                            }
                        )
                        weights.append(params["requests"] * 1.2 * _COST[peer])
                        labels.append(
                            f"compare {repeat + 1}/{params['repeats']}: {peer} {mode} c={concurrency}"
                        )
                results = self.run("litellm" if peer == "litellm" else "trio", jobs, weights, labels)
                by_peer[peer] = {
                    (job["mode"], job["concurrency"]): result
                    for job, result in zip(jobs, results, strict=True)
                    if result is not None and "error" not in result
                }
            repeats.append(by_peer)
        summary, ratios = [], []
        for mode in MODES:
            for concurrency in params["concurrency"]:
                key = (mode, concurrency)
                for peer in peers:
                    rows = [r[peer][key] for r in repeats if key in r.get(peer, {})]
                    if not rows:
                        continue
                    summary.append(
                        {
                            "mode": mode,
                            "concurrency": concurrency,
                            "peer": peer,
                            "repeats": len(rows),
                            "cpu_us_per_request": median([r["cpu_us_per_request"] for r in rows]),
                            "throughput_rps": median([r["throughput_rps"] for r in rows]),
                            "p50_ms": median([r["latency_ms"]["p50"] for r in rows if r["latency_ms"]]),
                            "p99_ms": median([r["latency_ms"]["p99"] for r in rows if r["latency_ms"]]),
                            "first_delta_p50_ms": median(
                                [r["first_delta_ms"]["p50"] for r in rows if r["first_delta_ms"]]
                            ),
                            "failed": sum(r["failed"] for r in rows),
                            "upstream_per_request": median(
                                [
                                    (r["upstream"]["primary"] + r["upstream"]["secondary"])
                                    / (r["requests"] + r["upstream"]["warmup"])
                                    for r in rows
                                    if r["upstream"]["primary"] is not None
                                    and r["upstream"]["secondary"] is not None
                                ]
                            ),
                        }
                    )
                if "litellm" not in peers:
                    continue
                pairs = [
                    (r["relayrace"][key], r["litellm"][key])
                    for r in repeats
                    if key in r.get("relayrace", {}) and key in r.get("litellm", {})
                ]
                if not pairs:
                    continue
                ratios.append(
                    {
                        "mode": mode,
                        "concurrency": concurrency,
                        "repeats": len(pairs),
                        # > 1 means relayrace is better, for every ratio.
                        "throughput": median(
                            [rr["throughput_rps"] / lt["throughput_rps"] for rr, lt in pairs]
                        ),
                        "cpu": median(
                            [lt["cpu_us_per_request"] / rr["cpu_us_per_request"] for rr, lt in pairs]
                        ),
                        "p50_latency": median(
                            [lt["latency_ms"]["p50"] / rr["latency_ms"]["p50"] for rr, lt in pairs]
                        ),
                        "p99_latency": median(
                            [lt["latency_ms"]["p99"] / rr["latency_ms"]["p99"] for rr, lt in pairs]
                        ),
                    }
                )
        raw = [
            {peer: {f"{m}@{c}": result for (m, c), result in rows.items()} for peer, rows in r.items()}
            for r in repeats
        ]
        return {"summary": summary, "ratios": ratios, "runs": raw}

    # --- workload 3 ---

    def gateway(self) -> dict[str, Any]:
        from ._gateway import run_gateway_workload

        return run_gateway_workload(self)

    # --- workload 4 ---

    def scale(self) -> dict[str, Any]:
        rows = []
        for n in self.params["scale"]:
            peers = ["relayrace"] + (["httpx"] if n <= self.params["scale_httpx_up_to"] else [])
            for peer in peers:
                job = {
                    "kind": "scale",
                    "peer": peer,
                    "streams": n,
                    "chunks": self.params["chunks"],
                    "tag": self.tag("sc"),
                }
                # A fresh process per level: the RSS baseline is not a previous level's heap.
                (result,) = self.run(
                    "trio",
                    [job],
                    [max(2.0, n * 0.01) * 1.5 + 1],
                    [f"scale: {n} streams in flight, {peer}"],
                )
                if result is not None and "error" not in result:
                    rows.append(result)
        return {"summary": rows}

    # --- workload 5 ---

    def faults(self) -> dict[str, Any]:
        p = self.params["faults"]
        jobs = [
            {
                "kind": "faults",
                "concurrency": p["concurrency"],
                "seconds": p["seconds"],
                "stream": mode == "stream",
                "chunks": self.params["chunks"],
                "tag": self.tag("ft"),
            }
            for mode in p["modes"]
        ]
        results = self.run(
            "trio",
            jobs,
            [p["seconds"] + 1] * len(jobs),
            [f"faults: {mode}, one of three half failing, one benched" for mode in p["modes"]],
        )
        return {"summary": [r for r in results if r is not None and "error" not in r]}

    # --- workload 6 ---

    def routing(self) -> dict[str, Any]:
        return run_routing_workload(self)

    # --- workload 7 ---

    def state(self) -> dict[str, Any]:
        return run_state_workload(self)


def dump(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, sort_keys=False, default=str)
