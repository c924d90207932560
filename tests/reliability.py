"""Helpers of the reliability suite (``tests/test_reliability_*.py``): a chaos configuration of
real HTTP provider clients against the fault-injecting mock, the check that replies and the mock's
log tell the same story, and counters of live tasks and open sockets."""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from relayrace import (
    Attempt,
    Budgets,
    Config,
    Policies,
    ProviderConfig,
    Route,
)
from relayrace.actors import AnthropicClient, GeminiClient, OpenAIClient
from relayrace.testing import SCRIPTED_ANSWER, MockProvider, MockScenario

MESSAGES = [{"role": "user", "content": "what does the quick fox do"}]
KEY = "sk-reliability-0123456789abcdefXYZ"
FORMATS = ("openai", "anthropic", "gemini")

#: Attempts that ended on our side before reaching the provider's client.
NEVER_SENT = {
    "inbox_full",
    "actor_gone",
    "probe_in_flight",
    "benched",
    "actor_restarting",
    "actor_gave_up",
    "unserializable_request",
}

#: Budgets short enough that ``hang``, ``slow`` and a long ``stall`` run into them, long enough
#: that the short stall and the delays of the healthy answers do not.
BUDGETS = Budgets(connect=1.0, first_token=2.0, idle=2.0, attempt=20.0)

#: The mock's catalogue of faults, as model names: every scenario, some with parameters.
FAULTS = (
    "ok",
    "ok,chunks=3,delay=0.01",
    "ok,repeat=2,chunks=4,delay=0.005",
    "rate-limit",
    "rate-limit,retry_after=1",
    "quota",
    "server-error",
    "server-error,times=5",
    "flaky",
    "unavailable",
    "overloaded",
    "unauthorized",
    "forbidden",
    "not-found",
    "context-length",
    "content-policy",
    "no-prefill",
    "reset",
    "hang",
    "slow",
    "cut,after=2",
    "cut,after=2,clean=1",
    "stall,after=1,stall=5",
    "stall,after=1,stall=0.5",
    "malformed,after=1",
    "no-done",
    "stream-error,after=1",
    "stream-error,after=0,error=rate_limit",
    "flapping,down=2,up=2",
    "ok,head_delay=0.5",
)

#: Mock outcomes of an attempt that delivered a whole answer.
WHOLE = ("ok", "no-done")


def expected_text(model: str) -> str:
    """The mock's healthy answer for ``model``: ``SCRIPTED_ANSWER`` ``repeat`` times."""
    return " ".join([SCRIPTED_ANSWER] * MockScenario.parse(model).repeat)


def http_client(base_url: str, fmt: str, *, api_key: str = KEY, **kwargs: Any) -> Any:
    """A real HTTP provider client of wire format ``fmt`` for the mock at ``base_url``."""
    if fmt == "openai":
        return OpenAIClient(base_url=f"{base_url}/v1", api_key=api_key, **kwargs)
    if fmt == "anthropic":
        return AnthropicClient(base_url=base_url, api_key=api_key, **kwargs)
    assert fmt == "gemini"
    return GeminiClient(base_url=base_url, api_key=api_key, **kwargs)


def chaos_config(
    mock: MockProvider,
    rng: random.Random,
    *,
    providers: int = 6,
    routes: int = 8,
    max_concurrency: int = 32,
    inbox_size: int = 64,
    policies: Policies | None = None,
) -> Config:
    """Providers with faults drawn from ``FAULTS`` (and a wire format each), plus one healthy
    provider ``z``; routes ``r0``… over random chains of them, most ending with ``z``.

    Each provider's model is its fault tagged with its name, so that each has its own lines in
    the mock's log and its own ``times`` counter. A request picks its faults by picking a route.
    """
    configs = []
    for i in range(providers):
        fault = rng.choice(FAULTS)
        fmt = rng.choice(FORMATS)
        configs.append(
            ProviderConfig(
                name=f"p{i}",
                client=http_client(mock.base_url, fmt, max_connections=max_concurrency),
                model=f"{fault},tag=p{i}",
                budgets=BUDGETS,
                max_concurrency=max_concurrency,
                inbox_size=inbox_size,
            )
        )
    configs.append(
        ProviderConfig(
            name="z",
            client=http_client(
                mock.base_url, rng.choice(FORMATS), max_connections=max_concurrency
            ),
            model="ok,chunks=3,delay=0.01,tag=z",
            budgets=BUDGETS,
            max_concurrency=max_concurrency,
            inbox_size=inbox_size,
        )
    )
    names = [c.name for c in configs[:-1]]
    chains = []
    for _ in range(routes):
        chain = rng.sample(names, rng.randint(1, min(3, len(names))))
        if rng.random() < 0.75:
            chain.append("z")
        chains.append(chain)
    return Config(
        providers=configs,
        routes=[Route(model=f"r{i}", chain=chain) for i, chain in enumerate(chains)],
        policies=policies or Policies(),
        seed=rng.randrange(2**32),
    )


def describe(cfg: Config) -> str:
    """The drawn faults and routes, for a failure message."""
    providers = ", ".join(f"{p.name}={p.model}" for p in cfg.providers)
    routes = ", ".join(f"{r.model}={list(r.chain)}" for r in cfg.routes)
    return f"providers: {providers}; routes: {routes}"


def _fields(attempt: Attempt | Mapping[str, Any]) -> tuple[str, str, str | None]:
    if isinstance(attempt, Attempt):
        code = attempt.failure.code if attempt.failure is not None else None
        return attempt.actor, attempt.outcome.value, code
    failure = attempt["failure"]
    return attempt["actor"], attempt["outcome"], failure["code"] if failure else None


def agree_with_the_mock(
    mock: MockProvider, cfg: Config, attempts: Iterable[Attempt | Mapping[str, Any]]
) -> None:
    """What the replies and errors report about their attempts agrees with the mock's log: the
    same number of attempts reached each provider, and the same number of them delivered a whole
    answer (``attempts`` may be ``Attempt`` values or their ``to_dict()``)."""
    provider_of = {p.model: p.name for p in cfg.providers}
    sent: collections.Counter[str] = collections.Counter()
    whole: collections.Counter[str] = collections.Counter()
    for attempt in attempts:
        actor, outcome, code = _fields(attempt)
        if code in NEVER_SENT:
            continue
        sent[actor] += 1
        whole[actor] += outcome == "ok"
    seen: collections.Counter[str] = collections.Counter()
    seen_whole: collections.Counter[str] = collections.Counter()
    for entry in mock.log:
        assert entry.outcome != "pending", entry
        name = provider_of[entry.model]
        seen[name] += 1
        seen_whole[name] += entry.outcome in WHOLE
    assert sent == seen, describe(cfg)
    assert +whole == +seen_whole, describe(cfg)


# --- leaks ----------------------------------------------------------------------------------------


def live_tasks() -> list[str]:
    """The names of every task under the root task, sorted."""
    names: list[str] = []

    def walk(nursery: trio.Nursery) -> None:
        for task in nursery.child_tasks:
            names.append(task.name)
            for child in task.child_nurseries:
                walk(child)

    for nursery in trio.lowlevel.current_root_task().child_nurseries:
        walk(nursery)
    return sorted(names)


def open_sockets() -> int:
    """Sockets this process holds open (``/proc/self/fd`` entries that are sockets)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # the fd of the listing itself, closed meanwhile
    return count


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
