"""The gateway report's account of ``--workers 2`` (issue #13): the most a second worker can
add on the machine's cores, from the run's own CPU per request, beside the target."""

from __future__ import annotations

from typing import Any

import pytest

from relayrace.bench._gwreport import gateway_markdown, second_worker_ceiling


def test_the_ceiling_is_the_cores_left_over_by_the_mock_and_wrk():
    # 0.6 ms per request in the gateway, 0.2 in the mock and wrk: one worker does 1667/s on
    # its core; two share 2 cores with them: 2 / 0.8 ms = 2500/s, +50 %.
    assert second_worker_ceiling(0.6, 0.6, 0.15, 0.05, 2) == pytest.approx(50.0)
    # Four cores: two workers are bound by their own two cores, +100 %.
    assert second_worker_ceiling(0.6, 0.6, 0.15, 0.05, 4) == pytest.approx(100.0)
    # Two workers costing 0.8 ms per request: 2 / 1.0 ms = 2000/s, +20 %.
    assert second_worker_ceiling(0.6, 0.8, 0.15, 0.05, 2) == pytest.approx(20.0)
    assert second_worker_ceiling(0.6, 0.6, None, 0.05, 2) is None


def _row(path: str, mode: str, rps: float, gateway_ms: float, idle: float) -> dict[str, Any]:
    return {
        "path": path,
        "mode": mode,
        "run": "c32",
        "connections": 32,
        "requests": int(rps * 10),
        "throughput_rps": rps,
        "latency_ms": {"p50": 20.0, "p99": 40.0},
        "failed": 0,
        "gateway_cpu_ms_per_request": gateway_ms,
        "mock_cpu_ms_per_request": 0.16,
        "wrk_cpu_ms_per_request": 0.02,
        "machine_idle_cores": idle,
    }


def test_an_unmet_workers_target_says_how_much_was_possible():
    rows = [
        _row("http", mode, 1000.0, 0.6, 0.3) | {"mode": mode}
        for mode in ("non-streamed", "streamed")
    ] + [_row("http-w2", mode, 1200.0, 0.7, 0.0) for mode in ("non-streamed", "streamed")]
    text = "\n".join(gateway_markdown({"rows": rows, "model": "ok", "cores": 2}, {}, None))
    gained = [line for line in text.splitlines() if "gained by --workers 2" in line]
    assert len(gained) == 2
    assert all("not met: at most +54 % on 2 cores" in line for line in gained), gained
    assert "one worker used 0.600 ms of CPU, the mock 0.160, wrk 0.020" in text
    # two workers: 2 / (0.7 + 0.16 + 0.02) ms = 2273/s against 1667/s
    assert (
        "the gateway used 0.700 ms per request and the mock 0.160: at those costs, at most **+36 %**"
        in text
    )
    assert "0.30 cores idle during the one-worker run and 0.00 during the two-worker" in text
