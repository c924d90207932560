"""The quick start's demo runs and shows failover, a restarted stream and a bad request."""

from __future__ import annotations

from relayrace._cli import main
from relayrace._demo import run_demo, run_gateway_demo


async def test_the_demo_shows_failover_restart_and_bad_request(autojump_clock) -> None:
    lines: list[str] = []
    await run_demo(lines.append)
    text = "\n".join(lines)
    assert "served by backup (model chat)" in text
    assert "attempt on silent: failed — timeout" in text
    assert "default:failover.actions.overloaded=next" in text
    assert "deltas received, none twice" in text
    assert "BadRequest, before any provider was called" in text
    assert "primary: benched" in text


def test_the_cli_requires_a_command(capsys) -> None:
    try:
        main([])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("no command must be an error")
    assert "demo" in capsys.readouterr().err


async def test_the_gateway_demo_runs_to_completion(autojump_clock) -> None:
    lines: list[str] = []
    summary = await run_gateway_demo(lines.append, requests=40)
    text = "\n".join(lines)
    # Every request was served, and the flapping primary was benched, probed and came back.
    assert sum(c["served"] for c in summary.values()) == 40
    assert summary["flapping"]["benched"] >= 1 and summary["flapping"]["served"] >= 1
    assert summary["limited"]["served"] == 0 and summary["healthy"]["served"] >= 1
    assert "flapping recovered" in text
    assert "FAILED" not in text
    assert text.splitlines()[-4].split() == ["provider", "served", "failed", "benched", "state", "now"]
