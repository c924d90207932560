"""``relayrace serve --workers N``: one port, N processes, each with its own supervisor; the
parent's SIGTERM reaches them all, a dead worker is replaced, and a reload (SIGHUP to the parent,
or the admin API of one worker) reaches every worker. Real processes, real clock."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from relayrace.testing import serve_mock_provider

BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
ADMIN_TOKEN = "workers-admin-token"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is gone, waiting to be reaped


def _start(config: Path, n: int, log: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "relayrace._cli", "serve", "-c", str(config)]
    with log.open("w") as stderr:
        return subprocess.Popen(
            [*command, "--workers", str(n), "--log-level", "INFO"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=os.environ | {"RELAYRACE_TEST_KEY": "k", "RELAYRACE_TEST_ADMIN": ADMIN_TOKEN},
        )


def route(model: str) -> str:
    return f'\n[[routes]]\nmodel = "{model}"\nchain = ["mock"]\n'


@asynccontextmanager
async def workers(
    tmp_path: Path, n: int, server: str = ""
) -> AsyncIterator[tuple[subprocess.Popen[str], str]]:
    async with serve_mock_provider() as mock:
        config = tmp_path / "relayrace.toml"
        config.write_text(
            f"""
[server]
http_port = 0
ws_port = 0
shutdown_grace = 2.0
workers = 1
admin_tokens_env = ["RELAYRACE_TEST_ADMIN"]
{server}

[[providers]]
name = "mock"
kind = "openai"
model = "ok,chunks=3"
base_url = {json.dumps(mock.base_url + "/v1")}
api_key_env = "RELAYRACE_TEST_KEY"
"""
            + route("chat")
        )
        process = _start(config, n, tmp_path / "serve.log")
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


async def statuses(url: str, model: str, pids: set[str], tries: int = 200) -> dict[str, int]:
    """Each worker's answer (status) to a request for ``model`` on a fresh connection, until
    every one of ``pids`` answered."""
    seen: dict[str, int] = {}
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        for _ in range(tries):
            response = await http.post("/v1/chat/completions", json={**BODY, "model": model})
            seen[response.headers["x-relayrace-worker"]] = response.status_code
            if pids <= set(seen):
                break
    return seen


async def every_worker_answers(url: str, model: str, pids: set[str], status: int) -> None:
    """Wait until each of ``pids`` answers ``model`` with ``status`` (reloads take a moment)."""
    with trio.fail_after(60):
        while True:
            seen = await statuses(url, model, pids)
            if all(seen.get(pid) == status for pid in pids):
                return
            await trio.sleep(0.1)


def logged(log: Path, pattern: str) -> set[str]:
    """The worker PIDs that logged a line matching ``pattern``."""
    found = re.findall(rf"worker (\d+) \S+: {pattern}", log.read_text())
    return set(found)


async def log_shows(log: Path, pattern: str, pids: set[str]) -> None:
    with trio.fail_after(60):
        while True:
            if pids <= logged(log, pattern):
                return
            await trio.sleep(0.1)


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


async def test_a_reload_reaches_every_worker(tmp_path):
    log = tmp_path / "serve.log"
    config = tmp_path / "relayrace.toml"
    async with workers(tmp_path, 2) as (process, url):
        pids = await pids_answering(url, 2)
        assert (await statuses(url, "fresh", pids)) == dict.fromkeys(pids, 404)
        good = config.read_text() + route("fresh")

        # SIGHUP to the parent: every worker reloads the file, and logs it.
        config.write_text(good)
        process.send_signal(signal.SIGHUP)
        await every_worker_answers(url, "fresh", pids, 200)
        await log_shows(log, "reloaded ", pids)

        # A file with a mistake: every worker refuses it, and nothing changes anywhere.
        config.write_text(good + "\n[[providers]]\nname = 3\n")
        process.send_signal(signal.SIGHUP)
        await log_shows(log, "reload refused", pids)
        assert (await statuses(url, "fresh", pids)) == dict.fromkeys(pids, 200)

        # POST /admin/reload reaches one worker; that one answers with its own outcome, and
        # the parent reloads the others.
        config.write_text(good + route("fresher"))
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            response = await http.post(
                "/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
            )
        assert response.status_code == 200, response.text
        assert response.json()["added"] == [] and response.json()["kept"] == ["mock"]
        answered = response.headers["x-relayrace-worker"]
        assert answered in pids
        await every_worker_answers(url, "fresher", pids, 200)
        await log_shows(log, "SIGHUP: reloading", pids - {answered})

        # A worker restarted after a crash reads the file as it is now (here: not reloaded by
        # the others, which keep what they had).
        config.write_text(good + route("freshest"))
        victim = sorted(pids)[0]
        os.kill(int(victim), signal.SIGKILL)
        with trio.fail_after(60):
            while True:
                now = await pids_answering(url, 2, tries=20)
                if len(now) == 2 and victim not in now:
                    break
                await trio.sleep(0.2)
        (replacement,) = now - pids
        assert (await statuses(url, "freshest", now)) == {
            replacement: 200,
            **{pid: 404 for pid in now - {replacement}},
        }
        process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(process.wait, 30) == 0


def _two_free_ports() -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` are both free (now)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two adjacent free ports")


async def test_each_worker_serves_its_own_metrics_port(tmp_path):
    port = _two_free_ports()
    async with workers(tmp_path, 2, server=f"metrics_port = {port}") as (process, url):
        pids = await pids_answering(url, 2)
        async with httpx.AsyncClient(timeout=30) as http:
            for worker_port in (port, port + 1):
                with trio.fail_after(30):
                    while True:
                        try:
                            response = await http.get(f"http://127.0.0.1:{worker_port}/metrics")
                            break
                        except httpx.ConnectError:
                            await trio.sleep(0.1)
                assert response.status_code == 200
                assert "relayrace_" in response.text
        # Nobody died of a port in use: the same two workers still answer.
        assert await pids_answering(url, 2) == pids
        assert process.poll() is None


async def test_a_dead_worker_waits_for_a_config_file_without_mistakes(tmp_path):
    log = tmp_path / "serve.log"
    config = tmp_path / "relayrace.toml"

    async def waiting(n: int) -> None:
        with trio.fail_after(60):
            while True:
                if log.read_text().count("not restarted while the config file has mistakes") >= n:
                    return
                await trio.sleep(0.1)

    async with workers(tmp_path, 2) as (process, url):
        pids = await pids_answering(url, 2)
        good = config.read_text()
        config.write_text(good + "\n[[providers]]\nname = 3\n")
        victim, survivor = sorted(pids)
        os.kill(int(victim), signal.SIGKILL)
        await waiting(1)
        # Not a crash loop to give up on: the parent waits, the other worker serves on, and
        # every new connection reaches it.
        await trio.sleep(1.5)
        assert process.poll() is None
        with trio.fail_after(30):
            assert await pids_answering(url, 2, tries=10) == {survivor}
        # The other one dies too: both wait.
        os.kill(int(survivor), signal.SIGKILL)
        await waiting(2)
        assert process.poll() is None
        # Fixed: both come back, from the file as it is now.
        config.write_text(good + route("fresh"))
        with trio.fail_after(60):
            while True:
                try:
                    now = await pids_answering(url, 2, tries=20)
                except httpx.TransportError:  # not listening yet
                    now = set()
                if len(now) == 2:
                    break
                await trio.sleep(0.2)
        assert not now & pids
        assert (await statuses(url, "fresh", now)) == dict.fromkeys(now, 200)
        process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(process.wait, 30) == 0


async def test_a_sighup_before_the_workers_serve_reaches_them_once_they_do(tmp_path):
    log = tmp_path / "serve.log"
    config = tmp_path / "relayrace.toml"
    async with workers(tmp_path, 2) as (process, url):
        # The parent announces its URLs before its workers have even imported relayrace.
        config.write_text(config.read_text() + route("fresh"))
        process.send_signal(signal.SIGHUP)
        pids = await pids_answering(url, 2)
        await log_shows(log, "SIGHUP: reloading", pids)
        await every_worker_answers(url, "fresh", pids, 200)
        assert "exited with" not in log.read_text()
