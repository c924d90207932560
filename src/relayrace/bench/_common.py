"""What every part of the harness shares: the request, the statistics, RSS, machine facts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

#: The one request every peer sends (same messages, same parameters, same mock).
MESSAGES: list[dict[str, str]] = [
    {"role": "user", "content": "Say something about a quick brown fox, please."}
]
#: The route / model group name callers ask for.
ROUTE = "bench"
#: What the bench sends as the API key (the mock accepts any).
API_KEY = "sk-bench"

MODES = ("complete", "stream", "failover")
#: Prefix of a worker's result lines (anything else on its stdout is a peer's chatter).
MARK = "@@bench "


class BenchError(Exception):
    """A process of the bench could not start or broke."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of already sorted values, by linear interpolation."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarise_ms(seconds: Sequence[float]) -> dict[str, float] | None:
    """p50 / p90 / p99 / mean / max of durations given in seconds, in milliseconds."""
    if not seconds:
        return None
    values = sorted(s * 1e3 for s in seconds)
    return {
        "p50": round(percentile(values, 0.50), 4),
        "p90": round(percentile(values, 0.90), 4),
        "p99": round(percentile(values, 0.99), 4),
        "mean": round(statistics.fmean(values), 4),
        "max": round(values[-1], 4),
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size of a process (default: this one), from /proc; ``None`` elsewhere."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of another process, from /proc; ``None`` where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> int | None:
    """Raise this process's open-file limit to its hard limit (10 000 streams need sockets)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Facts about the machine and the software that produced a run."""
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "load_average_at_start": load,
        "versions": {
            name: version_of(name)
            for name in (
                "relayrace",
                "trio",
                "httpx",
                "httpcore",
                "h11",
                "trio-websocket",
                "litellm",
                "openai",
                "aiohttp",
                "matplotlib",
            )
        },
    }


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (a server that forks its
    workers), from /proc; ``None`` where unavailable."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    own = cpu_seconds_of(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds_of(p) or 0.0 for p in tree - {pid})
