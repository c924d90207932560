"""Driving an HTTP path with ``wrk`` (the compiled load generator): one thread, a Lua script
posting the bench's chat-completion body, closed loop (``connections`` requests in flight, each
connection one request after another), a fixed count (``stop_after``), or paced (open loop).

Debian's ``wrk`` has no ``-R`` (that is ``wrk2``), so the paced run uses wrk's Lua ``delay()``
hook: every request of the thread takes the next slot of one schedule (start + i / rate, from a
monotonic clock through LuaJIT's FFI) and waits for it, whatever the other connections are
doing. wrk times a request from when it is written, not from its slot: when the gateway falls
behind, the latency does not include the queueing (coordinated omission); the achieved rate
falling short of the offered one shows it.

Every answer is checked in Lua: status 200 and, streamed, the ``[DONE]`` line (non-streamed:
a ``choices`` field); anything else counts as failed. The API key travels in the environment
(``RELAYRACE_BENCH_KEY``), never in a file or an argument.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

from ._common import BenchError

#: What the bench prints when ``wrk`` is absent (it installs nothing itself).
WRK_MISSING = (
    "wrk not found on PATH: the gateway workload needs it (Debian/Ubuntu: "
    "`sudo apt-get install wrk`; macOS: `brew install wrk`); skipping the gateway workload"
)

_MARK = "@@wrk "

_SCRIPT = r"""
wrk.method = "POST"
wrk.body = __BODY__
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("RELAYRACE_BENCH_KEY") or "none")

expect = __EXPECT__
stop_after = __STOP_AFTER__
interval_ms = __INTERVAL_MS__
own_timing = __OWN_TIMING__
seen, bad, slot, sent = 0, 0, 0, 0
lat = {}

local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_nsec; } relayrace_timespec;
  int clock_gettime(int clock, relayrace_timespec *tp);
]]
local ts = ffi.new("relayrace_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

if own_timing then
  local req = nil
  function request()
    if req == nil then req = wrk.format() end
    sent = now_us()
    return req
  end
end

function response(status, headers, body)
  if own_timing then lat[#lat + 1] = now_us() - sent end
  seen = seen + 1
  if status ~= 200 or body == nil or not string.find(body, expect, 1, true) then
    bad = bad + 1
  end
  if stop_after > 0 and seen == stop_after then
    wrk.thread:stop()
    io.write("__MARK__stopped\n")
    io.flush()
  end
end

if interval_ms > 0 then
  local start = nil
  function delay()
    local t = now_us() / 1e3
    if start == nil then start = t end
    local due = start + slot * interval_ms
    slot = slot + 1
    if due > t then return due - t end
    return 0
  end
end

local function pick(sorted, q)
  if #sorted == 0 then return 0 end
  local position = q * (#sorted - 1) + 1
  local low = math.floor(position)
  local high = math.min(low + 1, #sorted)
  return sorted[low] + (sorted[high] - sorted[low]) * (position - low)
end

function done(summary, latency, requests)
  local failed_bodies = 0
  local all = {}
  for _, t in ipairs(threads) do
    failed_bodies = failed_bodies + (t:get("bad") or 0)
    for _, v in ipairs(t:get("lat") or {}) do all[#all + 1] = v end
  end
  local p50, p90, p99, mean, max = latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max
  local source = "wrk"
  if #all > 0 then
    table.sort(all)
    local sum = 0
    for _, v in ipairs(all) do sum = sum + v end
    p50, p90, p99, mean, max = pick(all, 0.5), pick(all, 0.9), pick(all, 0.99), sum / #all, all[#all]
    source = "script"
  end
  local e = summary.errors
  io.write(string.format(
    '__MARK__{"requests":%d,"duration_us":%d,"bad":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,"mean":%.1f,"max":%.1f,' ..
    '"source":"%s"}\n',
    summary.requests, summary.duration, failed_bodies, e.connect, e.read, e.write, e.status,
    e.timeout, p50, p90, p99, mean, max, source))
end
"""


def find_wrk() -> str | None:
    """The ``wrk`` executable, or ``None`` (then the gateway workload is skipped)."""
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII text is a valid Lua string literal


def script(
    body: bytes, *, streamed: bool, stop_after: int = 0, rate: float = 0.0, own_timing: bool = False
) -> str:
    """The Lua script for one run (see the module's docstring)."""
    interval = 1000.0 / rate if rate > 0 else 0.0
    return (
        _SCRIPT.replace("__BODY__", _lua_string(body.decode("ascii")))
        .replace("__EXPECT__", _lua_string("[DONE]" if streamed else '"choices"'))
        .replace("__STOP_AFTER__", str(int(stop_after)))
        .replace("__INTERVAL_MS__", repr(interval))
        .replace("__OWN_TIMING__", "true" if own_timing else "false")
        .replace("__MARK__", _MARK)
    )


def _wrk_process(command: list[str], key: str, *, deadline: float) -> tuple[int, list[str], str]:
    """Run wrk; when its script says it has its count (``stopped``), interrupt it (SIGINT: wrk
    then reports at once instead of sleeping out ``-d``). Returns (exit code, result lines,
    stderr)."""
    with tempfile.TemporaryFile("w+") as errors:
        wrk = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=os.environ | {"RELAYRACE_BENCH_KEY": key},
        )
        assert wrk.stdout is not None
        timer = threading.Timer(deadline, wrk.kill)
        timer.start()
        lines: list[str] = []
        try:
            for line in wrk.stdout:
                if line.startswith(_MARK + "stopped"):
                    threading.Thread(target=_interrupt, args=(wrk,), daemon=True).start()
                elif line.startswith(_MARK):
                    lines.append(line.strip())
            code = wrk.wait()
        finally:
            timer.cancel()
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
            wrk.stdout.close()
        errors.seek(0)
        return code, lines, errors.read()


def _interrupt(wrk: subprocess.Popen[str]) -> None:
    # Until wrk's main thread (asleep for -d) takes the signal: a signal may reach the worker
    # thread first, which is ending.
    while wrk.poll() is None:
        wrk.send_signal(signal.SIGINT)
        time.sleep(0.1)


def run_wrk(
    wrk: str,
    url: str,
    body: bytes,
    *,
    streamed: bool,
    key: str,
    connections: int,
    seconds: float,
    stop_after: int = 0,
    rate: float = 0.0,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Run wrk once against ``url`` (one thread); return its figures.

    Returns:
        ``requests`` (completed), ``failed`` (socket errors, non-200 answers and answers without
        their ending), ``ok``, ``wall_s``, ``throughput_rps`` (answers that were ok, per second)
        and ``latency_ms`` (p50 / p90 / p99 / mean / max, from wrk's histogram).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            script(
                body,
                streamed=streamed,
                stop_after=stop_after,
                rate=rate,
                own_timing=connections == 1,
            )
        )
        path = f.name
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        path,
        url,
    ]
    try:
        code, lines, stderr = _wrk_process(command, key, deadline=seconds + timeout + 30)
    finally:
        os.unlink(path)
    if code != 0 or not lines:
        raise BenchError(f"wrk failed against {url} (exit {code}): {stderr[-1000:]}")
    raw = json.loads(lines[-1][len(_MARK) :])
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    # wrk counts a non-2xx answer both in "status" and among the requests our script checked.
    failed = errors + raw["bad"]
    ok = max(0, raw["requests"] - raw["bad"])
    wall = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "ok": ok,
        "failed": failed,
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 1) if wall > 0 else None,
        "latency_ms": {q: round(raw[q] / 1e3, 4) for q in ("p50", "p90", "p99", "mean", "max")},
        "latency_source": raw["source"],
    }
