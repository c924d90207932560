"""The demos: the in-process scenes, and the narrated gateway demo (a snapshot of a seeded run
on loopback servers, under trio's MockClock)."""

from __future__ import annotations

import re

from relayrace._cli import main
from relayrace._demo import run_demo, run_gateway_demo
from relayrace._narration import Narrator, demo_providers
from relayrace._policy import HealthPolicy


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


# Seed 5, 20 requests: the flapping provider is benched and recovers, the rate-limited one is
# benched and ends waiting for a probe that no request reached (the summary says why).
SEED_5 = """\
relayrace demo, seed 5 (--seed 5 plays the same faults again)

3 mock providers behind one route 'chat', tried in this order:
  1. flapping  answers 503 for 1.2 s, then works for 2.0 s, and so on
               → relayrace should fail over to the next; after 2 failures in a row bench it for
                 1 s (doubling while it keeps failing); when the bench ends, ask for its model
                 list (GET /v1/models) on its own timer, then make the next request that reaches
                 it the probe: back in use if it answers
  2. limited   answers 429 (rate limited, Retry-After: 2) to every request
               → relayrace should fail over at once; bench it for its Retry-After, then make the
                 next request that reaches it the probe; after a failed probe, bench it longer
                 and check its model list first, as for flapping
  3. healthy   always answers
               → relayrace should answer whatever the providers before it could not

20 requests go to the gateway over one websocket, 0.15 s apart. The gateway and the mock
providers listen on loopback for the length of the demo and stop with it.
Each line: the request, who answered it and how long it took, then why the providers
before it did not (the supervisor's decisions). Lines starting with ⏸ ▶ ✔ are health
changes as the supervisor reports them.

      ⏸  limited benched for 2.0 s: after rate_limit 429, Retry-After 2 s
r01  answered by healthy N ms   flapping failed (provider_5xx: try the next provider),
        limited failed (rate_limit: try the next provider)
      ⏸  flapping benched for 1.0 s: after provider_5xx 503
r02  answered by healthy N ms   flapping failed (provider_5xx: try the next provider),
        limited skipped (benched)
r03  answered by healthy N ms   flapping skipped (benched), limited skipped (benched)
r04  answered by healthy N ms   flapping skipped (benched), limited skipped (benched)
r05  answered by healthy N ms   flapping skipped (benched), limited skipped (benched)
r06  answered by healthy N ms   flapping skipped (benched), limited skipped (benched)
r07  answered by healthy N ms   flapping skipped (benched), limited skipped (benched)
r08  answered by healthy N ms   flapping skipped (benched), limited skipped (benched)
      ▶  flapping: bench over; after a check of its model list, the next request to reach it is the probe
      ✔  flapping recovered: its probe answered, back in use
r09  answered by flapping N ms   limited skipped (benched)
r10  answered by flapping N ms   limited skipped (benched)
r11  answered by flapping N ms   limited skipped (benched)
r12  answered by flapping N ms   limited skipped (benched)
r13  answered by flapping N ms   limited skipped (benched)
r14  answered by flapping N ms   limited skipped (benched)
      ▶  limited: bench over, the next request that reaches it is the probe
r15  answered by flapping N ms   first choice
r16  answered by flapping N ms   first choice
r17  answered by flapping N ms   first choice
r18  answered by flapping N ms   first choice
r19  answered by flapping N ms   first choice
r20  answered by flapping N ms   first choice

20 of 20 requests answered; 3 attempts failed over invisibly (23 attempts in all)

provider   answered failed skipped benched  at the end
flapping         12      2       6       1  ok
limited           0      1      13       1  waiting for its probe
healthy           8      0       0       0  ok

limited: its bench is over and the next request that reaches it will be its probe. None has yet:
  flapping, ahead of it, answered the requests since.

rules that decided (how often):
  default:failover.actions.provider_5xx=next  ×2
  default:failover.actions.rate_limit=next  ×1
  default:health.state=benched  ×19
"""


def _normalised(lines: list[str]) -> str:
    """The demo's output with its timings replaced (they are MockClock times, but a snapshot
    should not break when the mock's delays are tuned)."""
    text = "\n".join(lines) + "\n"
    text = re.sub(r" *\d+ ms", " N ms", text)
    return re.sub(r"\d+\.\d s more", "N s more", text)


async def test_a_seeded_gateway_demo_narrates_every_request(autojump_clock) -> None:
    lines: list[str] = []
    narrator = await run_gateway_demo(lines.append, requests=20, seed=5)
    assert _normalised(lines) == SEED_5
    assert (narrator.answered, narrator.failed, narrator.invisible) == (20, 0, 3)
    # Nothing in it points at a server that is gone once the demo exits.
    assert not any("http://" in line or "ws://" in line for line in lines)


async def test_the_same_seed_plays_the_same_run_and_another_seed_other_faults(
    autojump_clock,
) -> None:
    first: list[str] = []
    again: list[str] = []
    await run_gateway_demo(first.append, requests=12, seed=2)
    await run_gateway_demo(again.append, requests=12, seed=2)
    assert first == again
    assert demo_providers(2, HealthPolicy()) != demo_providers(5, HealthPolicy())


def test_a_failed_request_is_counted_apart_from_its_failed_attempts() -> None:
    narrator = Narrator(demo_providers(0, HealthPolicy()))
    failure = {"category": "rate_limit"}
    rule = {
        "source": "default",
        "policy": "failover",
        "rule": "actions.rate_limit",
        "value": "next",
    }
    frame = {
        "type": "error",
        "id": "r01",
        "category": "rate_limit",
        "message": "every provider failed",
        "attempts": [
            {"actor": name, "outcome": "failed", "failure": failure}
            for name in ("flapping", "limited")
        ],
        "decisions": [
            {
                "action": "failover",
                "actor": name,
                "reason": "rate_limit: try the next provider",
                "rule": rule,
            }
            for name in ("limited", "flapping")
        ],
    }
    line = narrator.request_line(frame, 12.0)
    assert line.startswith("r01  FAILED (rate_limit)")
    # In the route's order, not the order the decisions came in.
    assert line.index("flapping failed") < line.index("limited failed")
    assert (narrator.answered, narrator.failed, narrator.invisible) == (0, 1, 0)
