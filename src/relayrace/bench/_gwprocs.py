"""The gateways of the gateway workload, each its own process started the way its users start
it, with a generated config pointing at the bench's mock: ``relayrace serve`` (TOML) and
LiteLLM's proxy server (``litellm --config``, YAML, one worker).

Both demand a bearer token (as a deployment would); the bench makes one per run and passes it
in the environment only.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx

from ._common import API_KEY, ROUTE, BenchError, cpu_seconds_of, tree_cpu_seconds

#: How long LiteLLM's proxy may take to answer its liveness probe (it imports a great deal:
#: over a minute on a busy 2-core machine).
LITELLM_START_TIMEOUT = 240.0
_TOKEN_ENV = "RELAYRACE_BENCH_TOKEN"


@attrs.frozen
class Gateway:
    """A running gateway: where to send requests, its token, the pid whose CPU is measured."""

    name: str
    http_url: str
    token: str
    pid: int
    ws_url: str | None = None


def _serve_toml(mock_url: str, model: str, concurrency: int, extra: str = "") -> str:
    return f"""
[server]
http_host = "127.0.0.1"
http_port = 0
ws_host = "127.0.0.1"
ws_port = 0
tokens_env = ["{_TOKEN_ENV}"]
max_in_flight_per_connection = {concurrency}
max_connections = {max(1024, concurrency)}
shutdown_grace = 1.0

[[providers]]
name = "mock"
kind = "openai"
model = {json.dumps(model)}
base_url = {json.dumps(mock_url + "/v1")}
api_key_env = "RELAYRACE_BENCH_UPSTREAM_KEY"
max_concurrency = {concurrency}
inbox_size = {max(256, concurrency)}

[[routes]]
model = {json.dumps(ROUTE)}
chain = ["mock"]
{extra}"""


def _stop(process: subprocess.Popen[str], grace: float = 15.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def relayrace_serve(
    mock_url: str, model: str, concurrency: int, *, workers: int = 1, extra_toml: str = ""
) -> Iterator[Gateway]:
    """``relayrace serve --config <generated> --workers N`` on free ports; yields it once both
    endpoints listen (its pid: the parent, whose CPU counts its workers'). ``extra_toml`` is
    appended to the generated config (more providers, routes, ``[state]``, policies)."""
    token = "rr-" + secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile("w+") as errors:
        config = Path(folder) / "relayrace.toml"
        config.write_text(_serve_toml(mock_url, model, concurrency, extra_toml))
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relayrace._cli",
                "serve",
                "--config",
                str(config),
                "--log-level",
                "WARNING",
                "--workers",
                str(workers),
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=os.environ | {_TOKEN_ENV: token, "RELAYRACE_BENCH_UPSTREAM_KEY": API_KEY},
        )
        try:
            assert process.stdout is not None
            urls: dict[str, str] = {}
            while len(urls) < 2:
                line = process.stdout.readline()
                if not line:
                    process.wait(timeout=10)
                    errors.seek(0)
                    raise BenchError(f"relayrace serve did not start: {errors.read()[-2000:]}")
                if line.startswith("relayrace: ") and " on " in line:
                    kind, url = line[len("relayrace: ") :].strip().split(" on ", 1)
                    urls[kind] = url.split()[0]
            yield Gateway("relayrace", urls["http"], token, process.pid, ws_url=urls["websocket"])
        finally:
            _stop(process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _litellm_yaml(mock_url: str, model: str) -> str:
    # JSON is YAML: no YAML writer needed.
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": ROUTE,
                    "litellm_params": {
                        "model": f"openai/{model}",
                        "api_base": mock_url + "/v1",
                        "api_key": "os.environ/RELAYRACE_BENCH_UPSTREAM_KEY",
                    },
                }
            ],
            "litellm_settings": {"telemetry": False, "drop_params": True},
        },
        indent=1,
    )


def litellm_command() -> str | None:
    """The ``litellm`` proxy command of this interpreter's environment, or ``None``."""
    beside = Path(sys.executable).parent / "litellm"
    return str(beside) if beside.exists() else shutil.which("litellm")


@contextlib.contextmanager
def litellm_proxy(mock_url: str, model: str) -> Iterator[Gateway]:
    """LiteLLM's proxy server (``litellm --config <generated> --num_workers 1``) with a master
    key; yields it once ``/health/liveliness`` answers. Raises ``BenchError`` (with the reason)
    when it is not installed or does not come up."""
    command = litellm_command()
    if command is None:
        raise BenchError(
            "LiteLLM's proxy is not installed (pip install 'litellm[proxy]', or the bench's "
            "extra: pip install -e '.[compare]')"
        )
    token = "sk-" + secrets.token_hex(16)
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile("w+") as output:
        config = Path(folder) / "litellm.yaml"
        config.write_text(_litellm_yaml(mock_url, model))
        process = subprocess.Popen(
            [
                command,
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=folder,
            env=os.environ
            | {
                "LITELLM_MASTER_KEY": token,
                "RELAYRACE_BENCH_UPSTREAM_KEY": API_KEY,
                "LITELLM_TELEMETRY": "False",
                "LITELLM_LOG": "ERROR",
            },
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + LITELLM_START_TIMEOUT
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    tail = output.read()[-1500:].replace(token, "<master key>")
                    raise BenchError(f"LiteLLM's proxy exited with {process.returncode}: {tail}")
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"LiteLLM's proxy did not answer within {LITELLM_START_TIMEOUT:.0f} s"
                    )
                try:
                    if httpx.get(f"{url}/health/liveliness", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield Gateway("litellm", url, token, process.pid)
        finally:
            _stop(process)


def pid_listening(port: int) -> int | None:
    """The process listening on TCP ``port`` of this machine (the mock), from /proc; ``None``
    where it cannot be told."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError, ValueError, IndexError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        return int(entry)
    return None


@attrs.frozen
class Usage:
    """CPU seconds used so far: the gateway (its workers included), the mock, this process's
    reaped children (``wrk``, once a run has ended), and the machine's busy and total jiffies."""

    gateway: float | None
    mock: float | None
    children: float
    busy: int
    total: int

    @classmethod
    def now(cls, gateway_pid: int | None, mock_pid: int | None) -> Usage:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open("/proc/stat") as f:
            jiffies = [int(x) for x in f.readline().split()[1:9]]
        idle = jiffies[3] + jiffies[4]
        return cls(
            tree_cpu_seconds(gateway_pid) if gateway_pid is not None else None,
            cpu_seconds_of(mock_pid) if mock_pid is not None else None,
            kids.ru_utime + kids.ru_stime,
            sum(jiffies) - idle,
            sum(jiffies),
        )

    def until(self, later: Usage, wall: float) -> dict[str, float | None]:
        """What was used between this and ``later`` (``wall`` seconds apart): the gateway's,
        the mock's and wrk's CPU seconds, and the cores the machine left idle (on average)."""

        def delta(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        cores = os.cpu_count() or 1
        busy = (later.busy - self.busy) / max(1, later.total - self.total) * cores
        return {
            "gateway_cpu_s": delta(self.gateway, later.gateway),
            "mock_cpu_s": delta(self.mock, later.mock),
            "wrk_cpu_s": later.children - self.children,
            "machine_idle_cores": round(cores - busy, 3) if wall > 0 else None,
        }
