"""The quick start's demo runs and shows failover, a restarted stream and a bad request."""

from __future__ import annotations

from relayrace._cli import main
from relayrace._demo import run_demo


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
