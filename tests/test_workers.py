"""``relayrace serve --workers N``: one port, N processes, each with its own supervisor; the
parent's SIGTERM reaches them all, and a dead worker is replaced. Real processes, real clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from relayrace.testing import serve_mock_provider

BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is gone, waiting to be reaped


def _start(config: Path, n: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "relayrace._cli", "serve", "-c", str(config)]
    return subprocess.Popen(
        [*command, "--workers", str(n), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"RELAYRACE_TEST_KEY": "k"},
    )


@asynccontextmanager
async def workers(tmp_path: Path, n: int) -> AsyncIterator[tuple[subprocess.Popen[str], str]]:
    async with serve_mock_provider() as mock:
        config = tmp_path / "relayrace.toml"
        config.write_text(
            f"""
[server]
http_port = 0
ws_port = 0
shutdown_grace = 2.0
workers = 1

[[providers]]
name = "mock"
kind = "openai"
model = "ok,chunks=3"
base_url = {json.dumps(mock.base_url + "/v1")}
api_key_env = "RELAYRACE_TEST_KEY"
"""
        )
        process = _start(config, n)
        try:
            assert process.stdout is not None
            urls = {}
            with trio.fail_after(60):
                while len(urls) < 2:
                    line = await trio.to_thread.run_sync(process.stdout.readline)
                    assert line, "serve --workers exited before listening"
                    kind, _, rest = line.removeprefix("relayrace: ").partition(" on ")
                    urls[kind] = rest.split()[0]
            yield process, urls["http"]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()


async def pids_answering(url: str, wanted: int, tries: int = 200) -> set[str]:
    """The worker PIDs seen answering fresh connections, until ``wanted`` distinct ones."""
    seen: set[str] = set()
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        for _ in range(tries):
            response = await http.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]
            seen.add(response.headers["x-relayrace-worker"])
            if len(seen) >= wanted:
                break
    return seen


async def test_two_workers_answer_on_one_port_and_stop_on_sigterm(tmp_path):
    async with workers(tmp_path, 2) as (process, url):
        pids = await pids_answering(url, 2)
        assert len(pids) == 2
        assert all(_alive(int(pid)) for pid in pids)
        assert str(process.pid) not in pids
        process.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(process.wait, 30)
        assert code == 0
        assert not any(_alive(int(pid)) for pid in pids)


async def test_a_dead_worker_is_replaced(tmp_path):
    async with workers(tmp_path, 2) as (process, url):
        first = await pids_answering(url, 2)
        victim = int(sorted(first)[0])
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(60):
            while True:
                seen = await pids_answering(url, 2, tries=20)
                if len(seen) == 2 and str(victim) not in seen:
                    break
                await trio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(process.wait, 30) == 0
        assert not any(_alive(int(pid)) for pid in seen)
