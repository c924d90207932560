"""Why ``relayrace serve --workers 2`` does not add 50 % over one worker here: how wrk's
connections spread over the workers, and what CPU each process uses.

Runs the mock provider, ``relayrace serve`` with one worker and with two (as ``relayrace bench
--only gateway`` does: the real command, a generated config, ``ok,chunks=20``), and drives each
with ``wrk`` at c=32 (one thread, closed loop, keep-alive), non-streamed and streamed, rounds
interleaved. For each run it prints the req/s, the established connections each worker holds
(sampled mid-run from /proc: SO_REUSEPORT hashes each new connection to a worker, and with
keep-alive the split lasts the whole run) and the CPU of every process as a share of one core
(wrk, the mock, the parent, each worker), with the machine's idle share and what the rest of the
machine (other users) took.

    .venv/bin/python benchmarks/workers_spread.py [SECONDS] [ROUNDS]
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Any

from relayrace.bench._common import ROUTE, cpu_seconds_of
from relayrace.bench._gateway import _body
from relayrace.bench._gwprocs import Gateway, relayrace_serve
from relayrace.bench._gwreport import second_worker_ceiling
from relayrace.bench._procs import mock_process
from relayrace.bench._wrk import find_wrk, run_wrk

MODEL = "ok,chunks=20"
ROUTE_BODY = {"non-streamed": False, "streamed": True}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def connections_per_pid(port: int, pids: list[int]) -> dict[int, int]:
    """Established connections to local ``port`` held by each of ``pids``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
                        inodes.add(cols[9])
        except OSError:
            continue
    held = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        held[pid] = n
    return held


def one_run(wrk: str, gateway: Gateway, mock_pid: int, mode: str, seconds: float) -> dict[str, Any]:
    workers = children(gateway.pid) or [gateway.pid]
    port = int(gateway.http_url.rsplit(":", 1)[1])
    procs = {"mock": mock_pid, "parent": gateway.pid} | {f"w{i}": p for i, p in enumerate(workers)}
    if len(workers) == 1 and workers[0] == gateway.pid:
        procs = {"mock": mock_pid, "gateway": gateway.pid}
    spread: dict[int, int] = {}

    def sample() -> None:
        time.sleep(seconds / 2)
        spread.update(connections_per_pid(port, workers))

    sampler = threading.Thread(target=sample)
    cpu0 = {name: cpu_seconds_of(pid) or 0.0 for name, pid in procs.items()}
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = machine_jiffies()
    start = time.perf_counter()
    sampler.start()
    result = run_wrk(
        wrk,
        f"{gateway.http_url}/v1/chat/completions",
        _body(ROUTE, ROUTE_BODY[mode]),
        streamed=ROUTE_BODY[mode],
        key=gateway.token,
        connections=32,
        seconds=seconds,
    )
    wall = time.perf_counter() - start
    sampler.join()
    busy1, total1 = machine_jiffies()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    share = {
        name: ((cpu_seconds_of(pid) or 0.0) - cpu0[name]) / wall for name, pid in procs.items()
    }
    share["wrk"] = (kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) / wall
    cores = os.cpu_count() or 1
    machine_busy = (busy1 - busy0) / max(1, total1 - total0) * cores  # in cores
    rps = result["throughput_rps"] or 0.0
    gateway_share = sum(v for k, v in share.items() if k not in ("mock", "wrk"))
    return {
        "rps": rps,
        "spread": [spread.get(p, 0) for p in workers] if len(workers) > 1 else None,
        "cpu": share,
        # CPU ms per request of the gateway (all its processes), the mock, wrk
        "ms": {
            name: (used / rps * 1e3 if rps else None)
            for name, used in (
                ("gateway", gateway_share),
                ("mock", share["mock"]),
                ("wrk", share["wrk"]),
            )
        },
        "idle": cores - machine_busy,
        "others": machine_busy - sum(share.values()),
    }


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    wrk = find_wrk()
    if wrk is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    cores = os.cpu_count() or 1
    with (
        mock_process() as (mock_url, mock_pid),
        relayrace_serve(mock_url, MODEL, 256) as one,
        relayrace_serve(mock_url, MODEL, 256, workers=2) as two,
    ):
        for gateway in (one, two):  # warm-up: every worker, both modes
            for mode in ROUTE_BODY:
                one_run(wrk, gateway, mock_pid, mode, 3)
        print(f"{cores} cores; c=32, {seconds:g} s per run; CPU in cores (1.0 = one core)")
        print(
            "| round | mode | workers | req/s | conns per worker | CPU per process |"
            " CPU ms/req gateway / mock / wrk | idle | others |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        ideal: dict[str, list[str]] = {mode: [] for mode in ROUTE_BODY}
        real: dict[str, list[str]] = {mode: [] for mode in ROUTE_BODY}
        for r in range(rounds):
            for mode in ROUTE_BODY:
                one_ms: dict[str, float | None] = {}
                for label, gateway in (("1", one), ("2", two)):
                    got = one_run(wrk, gateway, mock_pid, mode, seconds)
                    cpu = ", ".join(f"{k} {v:.2f}" for k, v in got["cpu"].items())
                    spread = "/".join(map(str, got["spread"])) if got["spread"] else "32"
                    ms = got["ms"]
                    costs = " / ".join("–" if v is None else f"{v:.3f}" for v in ms.values())
                    print(
                        f"| {r} | {mode} | {label} | {got['rps']:.0f} | {spread} | {cpu} |"
                        f" {costs} | {got['idle']:.2f} | {got['others']:.2f} |",
                        flush=True,
                    )
                    if label == "1":
                        one_ms = ms
                    g = one_ms.get("gateway")
                    limit = second_worker_ceiling(g, ms["gateway"], ms["mock"], ms["wrk"], cores)
                    if limit is not None:
                        (ideal if label == "1" else real)[mode].append(f"{limit:+.0f} %")
        for mode in ROUTE_BODY:
            print(
                f"most a second worker can add, {mode}, on {cores} otherwise idle cores: at one"
                f" worker's CPU per request {', '.join(ideal[mode])}; at the two workers'"
                f" {', '.join(real[mode])}"
            )


if __name__ == "__main__":
    main()
