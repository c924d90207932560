"""The command line: ``check``, ``serve`` (as a real process, with a graceful SIGINT), and the
shipped example config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from relayrace._cli import main
from relayrace.testing import SCRIPTED_ANSWER, serve_mock_provider

EXAMPLE = Path(__file__).parent.parent / "examples" / "relayrace.toml"
EXAMPLE_ENV = {
    "OPENAI_API_KEY": "sk-example-secret-1",
    "ANTHROPIC_API_KEY": "sk-ant-example-2",
    "GEMINI_API_KEY": "AIza-example-3",
    "RELAYRACE_TOKEN": "token-example-4",
}


def test_check_accepts_the_shipped_example_without_showing_secrets(monkeypatch, capsys) -> None:
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "chat → openai > anthropic > gemini" in out
    for secret in EXAMPLE_ENV.values():
        assert secret not in out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('kind = "gemini"', 'kind = "gemeni"'), "providers[2].kind: expected one of"),
        (lambda t: t.replace("priority = 1\n", "priority = 1\ncolour = 1\n"), "providers[1].colour: expected no such key"),
        (lambda t: t.replace('"anthropic", "gemini"]', '"anthropic", "ghost"]'), "routes[0].chain[2]"),
        (lambda t: t.replace("failure_threshold = 3", "failure_threshold = 0"), "policies.health.failure_threshold"),
        (lambda t: t.replace("http_port = 8000", 'http_port = "8000"'), "server.http_port: expected an integer"),
        (lambda t: t.replace("shutdown_grace", "shutdown_grase"), "server.shutdown_grase: expected no such key"),
        (lambda t: t.replace('"OPENAI_API_KEY"', '"NOT_SET_ANYWHERE"'), "NOT_SET_ANYWHERE to be set"),
        (lambda t: t.replace("[server]", "[server"), "expected valid TOML"),
    ],
)
def test_check_names_the_key_and_exits_non_zero(edit, message, tmp_path, monkeypatch, capsys) -> None:
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "relayrace.toml"
    path.write_text(edit(EXAMPLE.read_text()))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    for secret in EXAMPLE_ENV.values():
        assert secret not in err


def test_serve_refuses_a_bad_config_without_starting(tmp_path, capsys) -> None:
    path = tmp_path / "relayrace.toml"
    path.write_text('[[providers]]\nname = "a"\n')
    assert main(["serve", "--config", str(path)]) == 2
    assert "providers[0].kind: expected a value" in capsys.readouterr().err


GATEWAY = """
[server]
http_port = 0
ws_port = 0
tokens_env = ["RR_TEST_TOKEN"]
shutdown_grace = 5

[[providers]]
name = "broken"
kind = "mock"
base_url = "{base}/v1"
model = "unavailable"

[[providers]]
name = "good"
kind = "mock"
base_url = "{base}/v1"
model = "ok,chunks=4"

[[routes]]
model = "chat"
chain = ["broken", "good"]

[policies.retry]
max_attempts = 1
"""


async def test_serve_runs_the_gateway_and_stops_gracefully_on_sigint(tmp_path) -> None:
    async with serve_mock_provider() as mock:
        path = tmp_path / "gateway.toml"
        path.write_text(GATEWAY.format(base=mock.base_url))
        env = {**os.environ, "RR_TEST_TOKEN": "secret-token-5"}
        code = "from relayrace._cli import main; import sys; sys.exit(main(sys.argv[1:]))"
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-c", code, "serve", "--config", str(path)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            http_url = None
            buffer = b""
            with trio.fail_after(30):
                while http_url is None:
                    buffer += await process.stdout.receive_some()
                    for line in buffer.decode().splitlines():
                        if line.startswith("relayrace: http on "):
                            http_url = line.removeprefix("relayrace: http on ")
            async with httpx.AsyncClient(base_url=http_url, timeout=30) as client:
                body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
                refused = await client.post("/v1/chat/completions", json=body)
                assert refused.status_code == 401
                reply = await client.post(
                    "/v1/chat/completions",
                    json=body,
                    headers={"authorization": "Bearer secret-token-5"},
                )
            assert reply.status_code == 200, reply.text
            data = reply.json()
            assert data["choices"][0]["message"]["content"] == SCRIPTED_ANSWER
            assert reply.headers["x-relayrace-provider"] == "good"
            assert [a["actor"] for a in data["relayrace"]["attempts"]] == ["broken", "good"]
            process.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                await process.wait()
            stderr = await process.stderr.receive_some(1 << 20)
        assert process.returncode == 0, stderr
        assert b"secret-token-5" not in stderr and b"secret-token-5" not in buffer
        assert mock.open_connections == 0
        json.dumps(data)  # the reply is plain JSON
