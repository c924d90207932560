"""``relayrace bench --only state`` (issue #16's benchmark) end to end at a tiny size: a real
redis-server, two ``relayrace serve --workers 2`` (local and redis state), wrk, and the bench
propagation between two processes. Never asserts a speed: only that every run happened, no
request failed, the redis runs really went through Redis, and the report says so."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from relayrace.bench import main
from relayrace.bench._main import parser, plan
from relayrace.bench._statereport import state_markdown, summarise_state

needs = pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("redis-server") is None,
    reason="needs wrk and redis-server (apt-get install wrk redis-server)",
)


@needs
def test_quick_state_bench_compares_local_and_redis_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--quick", "--only", "state", "--requests", "40", "--out", str(tmp_path)]
    assert main([*args, "--no-plots"]) == 0
    (json_path,) = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    assert results["errors"] == []
    state = results["state"]
    runs = state["runs"]
    # Every scenario and mode, once per gateway (local, redis and the A/A control, a second
    # local), each with its count and no failure.
    assert sorted((r["scenario"], r["mode"], r["backend"]) for r in runs) == sorted(
        (s, m, b)
        for s in ("healthy", "failing", "flapping", "outage")
        for m in ("non-streamed", "streamed")
        for b in ("local", "redis", "local-aa")
    )
    assert all(r["requests"] >= 40 and r["failed"] == 0 for r in runs)
    assert all(r["gateway_cpu_ms_per_request"] > 0 for r in runs)
    # The redis gateway wrote to Redis (the failure counts reaching the threshold, benches,
    # its full reads): the only one that talks to it, so Redis worked; while the local
    # gateway's runs leave it idle but for the redis gateway's periodic full read.
    assert state["redis_commands"]["scripts"] > 0
    failing = {
        r["backend"]: r for r in runs if (r["scenario"], r["mode"]) == ("failing", "non-streamed")
    }
    assert failing["local"]["redis_scripts_per_request"] < 0.25
    summary = state["summary"]
    assert len(summary["rows"]) == 8
    assert all(math.isfinite(r["cpu_cost_pct"]) for r in summary["rows"])
    # The A/A control beside the cost, each with its spread over the repeats (one here).
    for r in summary["rows"]:
        assert math.isfinite(r["aa_cost_pct"])
        assert r["aa_cost_spread_pct"] == [r["aa_cost_pct"]] * 2
        assert r["cpu_cost_spread_pct"] == [r["cpu_cost_pct"]] * 2
    propagation = summary["propagation"]
    assert propagation["benches"] == 20
    assert 0 < propagation["latency_ms"]["p50"] <= propagation["latency_ms"]["p99"] < 10_000
    targets = [t for t in results["targets"] if t["target"].startswith(("shared state", "a bench"))]
    assert len(targets) == 10 and all(t["measured"] is not None for t in targets)
    markdown = (tmp_path / "latest-quick.md").read_text()
    assert "## 7. Shared state" in markdown
    assert "| failing | non-streamed |" in markdown and "Bench propagation:" in markdown
    assert "| cost [min, max] | A/A [min, max] |" in markdown
    assert markdown in capsys.readouterr().out


def test_the_state_workload_is_skipped_without_redis_server_and_wrk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither wrk nor redis-server there
    assert main(["--quick", "--only", "state", "--out", str(tmp_path), "--no-plots"]) == 0
    (json_path,) = tmp_path.glob("*-quick.json")
    state = json.loads(json_path.read_text())["state"]
    assert state["summary"] is None
    assert "apt-get install redis-server" in state["skipped"]
    assert "apt-get install wrk" in state["skipped"]
    out = capsys.readouterr().out
    assert "redis-server not found on PATH" in out and "Skipped: " in out


def test_repeats_apply_to_the_state_workload() -> None:
    assert plan(parser().parse_args(["--only", "state"]))["state"]["repeats"] == 3
    assert plan(parser().parse_args(["--only", "state", "--repeats", "5"]))["state"]["repeats"] == 5
    assert plan(parser().parse_args(["--quick", "--only", "state"]))["state"]["repeats"] == 1


def _run(backend: str, repeat: int, cpu: float) -> dict[str, object]:
    return {
        "scenario": "failing",
        "mode": "streamed",
        "backend": backend,
        "repeat": repeat,
        "throughput_rps": 1000.0,
        "gateway_cpu_ms_per_request": cpu,
        "redis_cpu_ms_per_request": 0.01 if backend == "redis" else None,
        "redis_commands_per_request": 0.1,
        "redis_scripts_per_request": 0.02,
        "latency_ms": {"p50": 1.0, "p99": 5.0},
        "requests": 1000,
        "failed": 0,
    }


def test_the_cost_and_the_a_a_control_are_medians_of_the_repeats_with_their_spread() -> None:
    # Three repeats: local 1.0 ms each time; redis +2 %, +10 %, -4 %; local-aa -1 %, +6 %, +3 %.
    rows = [
        _run(backend, repeat, cpu)
        for repeat, (redis, aa) in enumerate([(1.02, 0.99), (1.10, 1.06), (0.96, 1.03)])
        for backend, cpu in (("local", 1.0), ("redis", redis), ("local-aa", aa))
    ]
    (row,) = summarise_state(rows)
    assert row["pairs"] == 3
    assert row["cpu_cost_pct"] == pytest.approx(2.0)
    assert row["cpu_cost_spread_pct"] == pytest.approx([-4.0, 10.0])
    assert row["aa_cost_pct"] == pytest.approx(3.0)
    assert row["aa_cost_spread_pct"] == pytest.approx([-1.0, 6.0])
    assert row["cpu_cost_with_redis_server_pct"] == pytest.approx(3.0)
    # Against the mean of the triple's two local gateways: 1.02 / 0.995, 1.10 / 1.03, 0.96 / 1.015.
    assert row["cpu_cost_vs_both_locals_pct"] == pytest.approx((1.02 / 0.995 - 1) * 100)
    assert row["local-aa"]["gateway_cpu_ms_per_request"] == pytest.approx(1.03)
    lines = state_markdown({"summary": {"rows": [row], "propagation": {}}, "parameters": {}})
    assert any("| 2.0 % [-4.0, +10.0] | 3.0 % [-1.0, +6.0] |" in line for line in lines)
    assert any(
        "cost 2.0 % [-4.0, +10.0], A/A 3.0 % [-1.0, +6.0]; redis against the mean" in line
        and "2.5 % [-5.4, +6.8]" in line
        for line in lines
    )
