"""``relayrace bench`` smoke check: a tiny quick run (mock provider and workers as their own
processes, no LiteLLM) writes a results JSON and a Markdown report with the expected keys.

Never asserts a speed: only that the harness runs, every request succeeds, and the figures
are there.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from relayrace.bench import main


def test_quick_bench_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "--quick",
            "--only",
            "overhead,compare,faults",
            "--no-litellm",
            "--requests",
            "6",
            "--concurrency",
            "1,2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--no-plots",
        ]
    )
    assert status == 0
    (json_path,) = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    assert results["errors"] == []
    assert {"machine", "parameters", "overhead", "compare", "faults", "targets", "mock"} <= set(
        results
    )
    assert results["machine"]["versions"]["trio"]
    assert results["parameters"]["peers"] == ["httpx", "relayrace"]

    for mode in ("complete", "stream"):
        row = results["overhead"]["summary"][mode]
        for key in ("httpx_cpu_us", "relayrace_cpu_us", "httpx_wall_us", "relayrace_wall_us"):
            assert row[key] > 0
        assert math.isfinite(row["cpu_overhead_pct"])
        # The supervisor with a Metrics observer ran beside it, in the same rounds.
        assert row["metrics_cpu_us"] > 0
        assert math.isfinite(row["metrics_cost_pct"]) and row["scrape_cpu_us"] > 0

    rows = results["compare"]["summary"]
    assert {(r["peer"], r["mode"], r["concurrency"]) for r in rows} == {
        (peer, mode, c)
        for peer in ("httpx", "relayrace")
        for mode in ("complete", "stream", "failover")
        for c in (1, 2)
    }
    for row in rows:
        assert row["failed"] == 0
        assert row["throughput_rps"] > 0 and row["p50_ms"] > 0
        # Failover really hit the mock twice per request; the others once.
        assert row["upstream_per_request"] == (2.0 if row["mode"] == "failover" else 1.0)
    assert results["compare"]["ratios"] == []  # no LiteLLM in this run

    (faults,) = results["faults"]["summary"]
    assert faults["requests"] > 0 and faults["success_share"] == 1.0

    targets = {t["target"]: t for t in results["targets"]}
    assert any("supervisor CPU" in name for name in targets)
    metrics_targets = [t for name, t in targets.items() if name.startswith("metrics CPU")]
    assert len(metrics_targets) == 2
    assert all(t["goal"] == "< 3 %" and t["measured"] is not None for t in metrics_targets)

    markdown = (tmp_path / "latest-quick.md").read_text()
    assert "## 1. In-process overhead" in markdown
    assert "## 2. relayrace vs LiteLLM" in markdown
    assert markdown in capsys.readouterr().out


def test_unknown_workload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])
    assert "unknown workload nonsense" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_quick_gateway_bench_drives_every_path_with_wrk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["--quick", "--only", "gateway", "--no-litellm", "--out", str(tmp_path), "--no-plots"]
    )
    assert status == 0
    (json_path,) = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    assert results["errors"] == []
    gateway = results["gateway"]["summary"]
    assert gateway["paths"]["litellm"]["available"] is False
    rows = {(r["path"], r["mode"], r["run"]): r for r in gateway["rows"]}
    runs = ("sequential", "c1", "c32", "rate")
    expected = {
        (path, mode, run)
        for path in ("direct", "http")
        for mode in ("non-streamed", "streamed")
        for run in runs
    } | {("ws", "streamed", run) for run in runs}
    expected |= {("http-w2", mode, "c32") for mode in ("non-streamed", "streamed")}
    assert set(rows) == expected
    for (path, _mode, run), row in rows.items():
        assert row["failed"] == 0 and row["ok"] > 0 and row["throughput_rps"] > 0
        if run == "sequential":
            assert row["requests"] == 50
        if path != "direct":
            assert row["gateway_cpu_ms_per_request"] > 0
            assert math.isfinite(row["p50_overhead_ms"])
    targets = {t["target"]: t for t in results["targets"]}
    assert targets["HTTP p50 overhead over direct, non-streamed, c=1"]["measured"] is not None
    assert targets["HTTP req/s / LiteLLM proxy req/s, streamed, c=32"]["met"] is None
    assert targets["HTTP req/s gained by --workers 2, streamed, c=32"]["measured"] is not None

    markdown = (tmp_path / "latest-quick.md").read_text()
    assert "| path | c=1 non-streamed p50 (+overhead) |" in markdown
    assert "### Targets of issue #13 in this run" in markdown
    assert markdown in capsys.readouterr().out


def test_the_gateway_workload_is_skipped_without_wrk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no wrk there
    status = main(["--quick", "--only", "gateway", "--out", str(tmp_path), "--no-plots"])
    assert status == 0
    (json_path,) = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    assert "apt-get install wrk" in results["gateway"]["skipped"]
    assert results["gateway"]["summary"] is None
    out = capsys.readouterr().out
    assert "wrk not found on PATH" in out and "Skipped: wrk not found" in out


def test_quick_routing_bench_reports_each_run(tmp_path: Path) -> None:
    """The routing workload: latency and hedging vs priority, every request answered, the
    figures in the JSON and the Markdown (speeds are reported, not asserted)."""
    args = ["--quick", "--only", "routing", "--requests", "16", "--out", str(tmp_path)]
    assert main([*args, "--no-plots"]) == 0
    (json_path,) = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    assert results["errors"] == []
    rows = results["routing"]["summary"]
    assert [(r["scenario"], r["strategy"], r["hedge"]) for r in rows] == [
        ("slow", "priority", None),
        ("slow", "latency", None),
        ("stalls", "priority", None),
        ("stalls", "priority", "p95"),
    ]
    for row in rows:
        assert row["failed"] == 0 and row["requests"] == 16
        assert row["ttft_ms"]["p50"] > 0 and row["ttft_ms"]["p99"] >= row["ttft_ms"]["p50"]
        assert row["upstream_per_request"] >= 1.0
        assert sum(row["served_by"].values()) == 16
    assert rows[0]["served_by"] == {"p0": 16}  # priority never leaves the slow first provider
    assert rows[0]["hedges"] == rows[1]["hedges"] == rows[2]["hedges"] == 0
    markdown = (tmp_path / "latest-quick.md").read_text()
    assert "## 6. Routing: latency strategy and hedged first tokens" in markdown
    assert "| stalls | priority + hedge p95 |" in markdown
