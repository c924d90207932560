"""Helpers of the reliability suite (``tests/test_reliability_*.py``): a chaos configuration of
real HTTP provider clients against the fault-injecting mock, the check that replies and the mock's
log tell the same story, and counters of live tasks and open sockets."""

from __future__ import annotations

import collections
import os
import random
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
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


# --- a gateway process and the resources it holds --------------------------------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout's root


@attrs.frozen
class GatewayProcess:
    """``relayrace serve`` as a user runs it: a child process, its endpoints' URLs."""

    process: trio.Process
    ws_url: str
    http_url: str

    @property
    def pid(self) -> int:
        return self.process.pid


@asynccontextmanager
async def run_gateway_process(config_path: str) -> AsyncIterator[GatewayProcess]:
    """Start ``relayrace serve --config config_path`` (a TOML file), wait for both endpoints'
    URLs on its stdout, and stop it with SIGINT (then wait for it) when the block ends."""
    code = "from relayrace._cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", code, "serve", "--config", config_path],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        assert process.stdout is not None
        urls: dict[str, str] = {}
        buffer = b""
        with trio.fail_after(60):
            while len(urls) < 2:
                data = await process.stdout.receive_some()
                assert data, "the gateway exited before it listened"
                buffer += data
                for line in buffer.decode().splitlines():
                    for name in ("websocket", "http"):
                        if line.startswith(f"relayrace: {name} on "):
                            urls[name] = line.removeprefix(f"relayrace: {name} on ")
        try:
            yield GatewayProcess(process, urls["websocket"], urls["http"])
        finally:
            process.send_signal(signal.SIGINT)
            with trio.move_on_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()


def process_fds(pid: int) -> int:
    """Descriptors the process ``pid`` holds open (``/proc/PID/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_memory(pid: int) -> tuple[int, int]:
    """The process's resident set now and its peak (``VmRSS``, ``VmHWM``), in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@asynccontextmanager
async def idle_connections(
    port: int, count: int, *, settle: float = 5.0
) -> AsyncIterator[list[int]]:
    """Open ``count`` TCP connections to ``127.0.0.1:port`` that never send a byte, from child
    processes (each with its own open-file limit, raised to its hard limit: the connections do
    not take this process's descriptors), and hold them for the body of the block; then close
    them all (the children exit).

    Connects still pending ``settle`` seconds after they began (the listener's accept queue
    full) are abandoned. Yields how many each child got established.
    """
    per_child = max(1, raise_open_file_limit() - 256)
    code = "from tests.reliability import hold_idle_connections; hold_idle_connections()"
    counts: list[int] = []
    async with trio.open_nursery() as nursery:
        children: list[trio.Process] = []
        left = count
        while left > 0:
            n = min(left, per_child)
            left -= n
            child: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-c", code, str(port), str(n), str(settle)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    check=False,
                    cwd=_ROOT,
                )
            )
            children.append(child)
        for child in children:
            assert child.stdout is not None
            line = b""
            with trio.fail_after(settle + 60):
                while not line.endswith(b"\n"):
                    data = await child.stdout.receive_some()
                    assert data, "an idle-connection child exited early"
                    line += data
            counts.append(int(line.split()[1]))
        try:
            yield counts
        finally:
            for child in children:
                assert child.stdin is not None
                await child.stdin.aclose()
            with trio.move_on_after(30):
                for child in children:
                    await child.wait()


def hold_idle_connections() -> None:
    """The child of ``idle_connections``: ``argv`` = port, count, settle seconds. Prints
    ``held N`` once its connects are done or abandoned, holds them until stdin closes."""
    port, count, settle = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    raise_open_file_limit()
    # An attacker runs on its own machine: here it shares the cores, so it yields them first.
    os.nice(10)
    held: list[socket.socket] = []

    async def connect_one() -> None:
        sock = trio.socket.socket()
        try:
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        held.append(socket.socket(fileno=sock.detach()))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + settle
            for _ in range(count):
                nursery.start_soon(_ignore_os_errors, connect_one)
                await trio.lowlevel.checkpoint()

    trio.run(main)
    print(f"held {len(held)}", flush=True)
    sys.stdin.read()
    for sock in held:
        sock.close()


async def _ignore_os_errors(fn: Any) -> None:
    try:
        await fn()
    except OSError:
        pass  # refused or reset: not held


@asynccontextmanager
async def hostile_upstream_process(*, alarm: int) -> AsyncIterator[str]:
    """The hostile upstream (``tests/hostile_upstream.py``) in a child process, so that its work
    (gigabytes produced) does not slow this process's callers; yields its OpenAI base URL."""
    code = "from tests.reliability import serve_hostile_upstream; serve_hostile_upstream()"
    async with trio.open_nursery() as nursery:
        child: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", code, str(alarm)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                check=False,
                cwd=_ROOT,
            )
        )
        assert child.stdout is not None and child.stdin is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                data = await child.stdout.receive_some()
                assert data, "the hostile upstream exited early"
                line += data
        try:
            yield line.decode().strip()
        finally:
            await child.stdin.aclose()
            with trio.move_on_after(30):
                await child.wait()
            nursery.cancel_scope.cancel()


def serve_hostile_upstream() -> None:
    """The child of ``hostile_upstream_process``: ``argv`` = alarm. Prints its base URL, serves
    until stdin closes."""
    from .hostile_upstream import HostileUpstream

    server = HostileUpstream(alarm=int(sys.argv[1]))
    os.nice(10)  # as ``hold_idle_connections``: the attacker yields the shared cores first

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print(server.base_url, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(main)
