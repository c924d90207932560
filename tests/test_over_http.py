"""Every mock scenario driven through a real supervisor whose providers are real HTTP clients.

The providers are ``OpenAIClient`` / ``AnthropicClient`` / ``GeminiClient`` pointed at the
fault-injecting mock provider over loopback; nothing in between is faked. Each test asserts what
a careful user would check: the answer (or the clean error category), the attempts on each
provider as the mock saw them AND as the reply reports them (they must agree), the gaps between
attempts, the bench state afterwards, and that no connection is left open.

Time-heavy scenarios run on the ``autojump_clock``: real loopback I/O still works, the clock only
jumps when every task is blocked, so the times asserted are exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from relayrace import (
    Action,
    Attempt,
    Budgets,
    Category,
    Config,
    Delta,
    HealthPolicy,
    MidStream,
    Outcome,
    Policies,
    ProviderConfig,
    Reply,
    Request,
    RequestFailed,
    Route,
    State,
    StreamPolicy,
    Supervisor,
    open_supervisor,
)
from relayrace.actors import AnthropicClient, GeminiClient, OpenAIClient
from relayrace.testing import SCRIPTED_ANSWER, MockAttempt, MockProvider, serve_mock_provider

C = Category
FORMATS = ("openai", "anthropic", "gemini")
KEY = "sk-mock-0123456789abcdef"
QUESTION = "what does the quick fox do"  # six words: the mock counts them as the prompt tokens
ANSWER_WORDS = len(SCRIPTED_ANSWER.split())

#: Short budgets, so that what they bound is visible in the (mock) clock's exact times.
BUDGETS = Budgets(connect=1.0, first_token=3.0, idle=2.0, attempt=30.0)

#: How every format's healthy answer ends, in the OpenAI vocabulary relayrace speaks.
FINISH = "stop"


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as provider:
        provider.reset()  # the flapping clock starts with the test
        yield provider
        # Every test closes its supervisor first: no connection may be left open, and the mock
        # must not have crashed on anything the clients sent.
        await wait_all_tasks_blocked()
        assert provider.open_connections == 0
        assert provider.errors == []


def client_for(mock: MockProvider, fmt: str, **kwargs: Any) -> Any:
    if fmt == "openai":
        return OpenAIClient(base_url=f"{mock.base_url}/v1", api_key=KEY, **kwargs)
    if fmt == "anthropic":
        return AnthropicClient(base_url=mock.base_url, api_key=KEY, **kwargs)
    assert fmt == "gemini"
    return GeminiClient(base_url=mock.base_url, api_key=KEY, **kwargs)


def provider(
    mock: MockProvider,
    name: str,
    scenario: str,
    fmt: str = "openai",
    *,
    budgets: Budgets = BUDGETS,
    accepts_continuation: bool | None = None,
    **client_kwargs: Any,
) -> ProviderConfig:
    """A provider named ``name`` whose upstream model is the mock ``scenario``.

    The model is tagged with the provider's name, so that each provider has its own line in the
    mock's log and its own ``times`` counter.
    """
    return ProviderConfig(
        name=name,
        client=client_for(mock, fmt, **client_kwargs),
        model=f"{scenario},tag={name}",
        budgets=budgets,
        accepts_continuation=accepts_continuation,
    )


def config(*providers: ProviderConfig, policies: Policies | None = None) -> Config:
    """One route ``m`` over ``providers`` in order."""
    return Config(
        providers=providers,
        routes=[Route(model="m", chain=[p.name for p in providers])],
        policies=policies or Policies(),
        seed=7,
    )


def request() -> Request:
    return Request("m", [{"role": "user", "content": QUESTION}])


def model_of(cfg: Config, name: str) -> str:
    for p in cfg.providers:
        if p.name == name:
            assert p.model is not None
            return p.model
    raise KeyError(name)


def wire(mock: MockProvider, cfg: Config) -> list[tuple[str, MockAttempt]]:
    """What the mock saw, in order, as (provider name, attempt)."""
    names = {p.model: p.name for p in cfg.providers}
    return [(names[a.model], a) for a in mock.log]


def seen(mock: MockProvider, cfg: Config, name: str) -> list[MockAttempt]:
    return [a for n, a in wire(mock, cfg) if n == name]


async def agree(mock: MockProvider, cfg: Config, attempts: Sequence[Attempt]) -> list[str]:
    """Check that the mock's log and the reply's attempts tell the same story, attempt by
    attempt (who was tried, in what order, and which one succeeded); return the providers tried.
    """
    await wait_all_tasks_blocked()  # let the mock notice every close
    on_wire = wire(mock, cfg)
    assert [name for name, _ in on_wire] == [a.actor for a in attempts]
    tries: dict[str, int] = {}
    for (_, theirs), ours in zip(on_wire, attempts, strict=True):
        assert theirs.outcome != "pending"
        assert (theirs.outcome in ("ok", "no-done")) == (ours.outcome is Outcome.OK), (
            theirs,
            ours,
        )
        # The numbering counts the tries on each provider.
        tries[ours.actor] = tries.get(ours.actor, 0) + 1
        assert ours.number == tries[ours.actor]
    return [a.actor for a in attempts]


async def stream(sup: Supervisor, into: list[Delta] | None = None) -> tuple[list[Delta], Reply]:
    """Stream ``request()``; collect the deltas (into ``into`` if given, so that a caller sees
    them even when the stream fails) and return them with the reply."""
    deltas = [] if into is None else into
    async with sup.stream(request()) as s:
        async for delta in s:
            deltas.append(delta)
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    return deltas, s.reply


async def ask(sup: Supervisor, streaming: bool) -> Reply:
    if streaming:
        deltas, reply = await stream(sup)
        assert "".join(d.text for d in deltas) == reply.text
        return reply
    return await sup.complete(request())


async def fails(sup: Supervisor, streaming: bool, into: list[Delta] | None = None) -> RequestFailed:
    with pytest.raises(RequestFailed) as caught:
        if streaming:
            await stream(sup, into)
        else:
            await sup.complete(request())
    return caught.value


def assert_whole_answer(reply: Reply, cfg: Config) -> None:
    assert reply.text == SCRIPTED_ANSWER
    # The model the mock says answered: the one the provider asked for.
    assert reply.model == model_of(cfg, reply.provider)
    assert reply.finish_reason == FINISH
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(QUESTION.split()),
        ANSWER_WORDS,
    )


def assert_healthy(sup: Supervisor, name: str) -> None:
    h = sup.health()[name]
    assert (h.state, h.consecutive_failures, h.benched_until, h.in_flight) == (State.OK, 0, None, 0)


# --- healthy answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_healthy_answer(mock: MockProvider, fmt: str, streaming: bool) -> None:
    cfg = config(provider(mock, "a", "ok,chunks=4", fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await ask(sup, streaming)
        assert_whole_answer(reply, cfg)
        assert reply.provider == "a"
        assert await agree(mock, cfg, reply.attempts) == ["a"]
        [attempt] = reply.attempts
        assert attempt.deltas == (4 if streaming else 1)
        [logged] = mock.log
        assert (logged.format, logged.stream, logged.status) == (fmt, streaming, 200)
        assert logged.chunks == (4 if streaming else 1)
        assert_healthy(sup, "a")
        # The connection went back to the pool: one open, and the next request reuses it.
        assert mock.open_connections == 1
        reply = await ask(sup, streaming)
        assert reply.provider == "a"
        assert mock.accepted == 1
    assert [a.connection for a in mock.log] == [1, 1]


async def test_auth_failures_in_every_format_fail_over_and_never_show_the_key(
    mock: MockProvider,
) -> None:
    cfg = config(
        provider(mock, "a", "unauthorized"),
        provider(mock, "b", "unauthorized", "anthropic"),
        provider(mock, "c", "unauthorized", "gemini"),
    )
    async with open_supervisor(cfg) as sup:
        caught = await fails(sup, streaming=False)
        assert await agree(mock, cfg, caught.attempts) == ["a", "b", "c"]
        assert caught.failure.category is C.AUTH
        for failure in (a.failure for a in caught.attempts):
            assert failure is not None and KEY not in failure.message
        assert KEY not in str(caught)
        assert {h.state for h in sup.health().values()} == {State.BENCHED}


# --- error statuses, in each format ------------------------------------------------------------

#: scenario -> (category, tries on the failing provider, who answers in the end ("a", "b" or
#: None: the request stops), the failing provider's state afterwards, its consecutive failures)
ERRORS: dict[str, tuple[Category, int, str | None, State, int]] = {
    "rate-limit": (C.RATE_LIMIT, 2, "b", State.OK, 2),
    "quota": (C.QUOTA_EXHAUSTED, 1, "b", State.BENCHED, 0),
    "flaky": (C.PROVIDER_5XX, 2, "a", State.OK, 0),
    "unavailable": (C.PROVIDER_5XX, 2, "b", State.OK, 2),
    "overloaded": (C.OVERLOADED, 1, "b", State.BENCHED, 0),
    "unauthorized": (C.AUTH, 1, "b", State.BENCHED, 0),
    "forbidden": (C.AUTH, 1, "b", State.BENCHED, 0),
    "not-found": (C.MODEL_NOT_FOUND, 1, "b", State.OK, 0),
    "context-length": (C.CONTEXT_LENGTH, 1, "b", State.OK, 0),
    "content-policy": (C.CONTENT_POLICY, 1, None, State.OK, 0),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("scenario", list(ERRORS))
@pytest.mark.parametrize("fmt", FORMATS)
async def test_error_statuses_in_each_format(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str, scenario: str, streaming: bool
) -> None:
    category, tries, answers, state, failures = ERRORS[scenario]
    cfg = config(provider(mock, "a", scenario, fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        if answers is None:
            caught = await fails(sup, streaming)
            attempts, decisions = caught.attempts, caught.decisions
            assert caught.failure.category is category
            assert caught.failure.provider == "a"
            # The provider's reason reaches the caller.
            assert caught.failure.message.startswith(f"{fmt}: ")
        else:
            reply = await ask(sup, streaming)
            attempts, decisions = reply.attempts, reply.decisions
            assert_whole_answer(reply, cfg)
            assert reply.provider == answers
        tried = await agree(mock, cfg, attempts)
        assert tried == ["a"] * tries + (["b"] if answers == "b" else [])
        first = attempts[0].failure
        assert first is not None and first.category is category
        if fmt != "gemini" or scenario != "content-policy":
            assert first.status == mock.log[0].status  # the mock's status, as classified
        if tries == 2:
            # The retry waited exactly the jittered backoff the decision chose.
            retry = decisions[0]
            assert retry.action is Action.RETRY
            a1, a2 = seen(mock, cfg, "a")
            assert a1.ended_at is not None
            assert a2.started_at - a1.ended_at == pytest.approx(retry.wait)
            assert 0 <= retry.wait <= 0.2
        h = sup.health()["a"]
        assert (h.state, h.consecutive_failures) == (state, failures)
        if category in (C.AUTH, C.QUOTA_EXHAUSTED):
            assert h.benched_until == attempts[0].ended_at + 600  # bench at once, for long
        elif category is C.OVERLOADED:
            assert h.benched_until == attempts[0].ended_at + 2  # a short bench
        assert_healthy(sup, "b")


@pytest.mark.parametrize(
    ("header", "wait"), [("retry_after=2", 2.0), ("retry_after_ms=1500", 1.5)]
)
@pytest.mark.parametrize("fmt", FORMATS)
async def test_429_with_retry_after_is_retried_on_the_same_provider_after_the_wait(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str, header: str, wait: float
) -> None:
    cfg = config(
        provider(mock, "a", f"rate-limit,{header},times=1", fmt), provider(mock, "b", "ok")
    )
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert_whole_answer(reply, cfg)
        assert reply.provider == "a"
        assert await agree(mock, cfg, reply.attempts) == ["a", "a"]
        first, second = mock.log
        assert (first.status, second.status) == (429, 200)
        assert first.ended_at is not None
        assert second.started_at - first.ended_at == wait  # Retry-After, exactly
        failure = reply.attempts[0].failure
        assert failure is not None and failure.retry_after == wait
        assert reply.decisions[0].action is Action.RETRY and reply.decisions[0].wait == wait
        # The provider was benched for the Retry-After period; the retry was its probe.
        assert reply.attempts[1].probe
        assert_healthy(sup, "b")
        assert_healthy(sup, "a")


@pytest.mark.parametrize(
    ("scenario", "fmt", "bench"),
    [
        ("rate-limit,retry_after=60", "openai", 60.0),  # longer than max_wait: no retry
        ("overloaded,retry_after=7", "anthropic", 7.0),  # overloaded: never retried
    ],
)
async def test_a_retry_after_that_is_not_waited_for_fails_over_at_once_and_sets_the_bench(
    autojump_clock: trio.abc.Clock, mock: MockProvider, scenario: str, fmt: str, bench: float
) -> None:
    cfg = config(provider(mock, "a", scenario, fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert trio.current_time() == 0  # no waiting at all
        assert reply.provider == "b"
        assert await agree(mock, cfg, reply.attempts) == ["a", "b"]
        h = sup.health()["a"]
        assert (h.state, h.benched_until) == (State.BENCHED, bench)
        # Meanwhile, requests go straight to the backup: the benched provider sees nothing.
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert len(seen(mock, cfg, "a")) == 1


async def test_x_should_retry_false_fails_over_without_a_retry(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "unavailable,should_retry=0"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert await agree(mock, cfg, reply.attempts) == ["a", "b"]
        assert "x-should-retry: false" in reply.decisions[0].reason


async def test_a_persistent_503_benches_the_provider_after_the_threshold(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "unavailable"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        first = await sup.complete(request())
        second = await sup.complete(request())
        assert first.provider == second.provider == "b"
        h = sup.health()["a"]
        assert h.state is State.BENCHED  # three failures in a row (the default threshold)
        assert h.consecutive_failures == 4
        before = len(mock.log)
        third = await sup.complete(request())
        assert third.provider == "b"
        assert [n for n, _ in wire(mock, cfg)[before:]] == ["b"]
        assert [d.action for d in third.decisions] == [Action.SKIP]
    assert len(seen(mock, cfg, "a")) == 4


async def test_a_refused_connection_is_a_network_failure(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    # A port nobody listens on: bound, then closed.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = ProviderConfig(
        name="dead",
        client=OpenAIClient(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY),
        model="ok",
        budgets=BUDGETS,
    )
    cfg = config(dead, provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert [(a.actor, a.outcome) for a in reply.attempts] == [
            ("dead", Outcome.FAILED),
            ("dead", Outcome.FAILED),
            ("b", Outcome.OK),
        ]
        failure = reply.attempts[0].failure
        assert failure is not None
        assert (failure.category, failure.code) == (C.NETWORK, "connect_error")
        assert [n for n, _ in wire(mock, cfg)] == ["b"]


# --- the connection fails ----------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
async def test_a_reset_before_the_headers_is_a_network_failure_retried_once_then_failed_over(
    autojump_clock: trio.abc.Clock, mock: MockProvider, streaming: bool
) -> None:
    cfg = config(provider(mock, "a", "reset"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await ask(sup, streaming)
        assert_whole_answer(reply, cfg)
        assert reply.provider == "b"
        assert await agree(mock, cfg, reply.attempts) == ["a", "a", "b"]
        for attempt in reply.attempts[:2]:
            assert attempt.failure is not None
            assert (attempt.failure.category, attempt.failure.code) == (C.NETWORK, "connection_lost")
        assert [a.outcome for a in mock.log[:2]] == ["reset", "reset"]
        h = sup.health()["a"]
        assert (h.state, h.consecutive_failures) == (State.OK, 2)
        await wait_all_tasks_blocked()
        assert mock.open_connections == 1  # only b's, pooled


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
async def test_a_provider_that_never_answers_is_abandoned_at_the_first_token_budget(
    autojump_clock: trio.abc.Clock, mock: MockProvider, streaming: bool
) -> None:
    cfg = config(provider(mock, "a", "hang"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await ask(sup, streaming)
        assert_whole_answer(reply, cfg)
        assert reply.provider == "b"
        # A silent provider is not retried: retrying it would only multiply the wait.
        assert await agree(mock, cfg, reply.attempts) == ["a", "b"]
        failure = reply.attempts[0].failure
        assert failure is not None
        assert (failure.category, failure.code) == (C.TIMEOUT, "first_token_timeout")
        hung, answered = mock.log
        # Abandoned at the budget, to the (mock) second; the connection closed at that moment.
        assert (hung.outcome, hung.status) == ("hang", None)
        assert hung.client_closed_at == hung.started_at + BUDGETS.first_token
        assert answered.started_at == hung.started_at + BUDGETS.first_token
        assert trio.current_time() == BUDGETS.first_token
        assert mock.open_connections == 1  # the hung connection is gone, b's is pooled
        h = sup.health()["a"]
        assert (h.state, h.consecutive_failures) == (State.OK, 1)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
async def test_a_slow_first_token_within_the_budget_is_served(
    autojump_clock: trio.abc.Clock, mock: MockProvider, streaming: bool
) -> None:
    cfg = config(provider(mock, "a", "slow,first_delay=2.5"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await ask(sup, streaming)
        assert_whole_answer(reply, cfg)
        assert reply.provider == "a"
        assert await agree(mock, cfg, reply.attempts) == ["a"]
        assert reply.attempts[0].first_delta_at == 2.5
        assert_healthy(sup, "a")


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
async def test_a_first_token_beyond_the_budget_fails_over(
    autojump_clock: trio.abc.Clock, mock: MockProvider, streaming: bool
) -> None:
    cfg = config(provider(mock, "a", "slow,first_delay=10"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await ask(sup, streaming)
        assert_whole_answer(reply, cfg)
        assert reply.provider == "b"
        assert await agree(mock, cfg, reply.attempts) == ["a", "b"]
        failure = reply.attempts[0].failure
        assert failure is not None and failure.code == "first_token_timeout"
        slow = mock.log[0]
        # A stream's headers came at once: it is the first token that did not.
        assert slow.status == (200 if streaming else None)
        assert (slow.outcome, slow.client_closed_at) == ("cancelled", BUDGETS.first_token)
        assert mock.open_connections == 1


# --- a stream breaks after part of the answer --------------------------------------------------

#: scenario -> (the failure code of the broken attempt, the mock's outcome for it)
BREAKS = {
    "cut,after=2": ("stream_cut", "cut"),
    "cut,after=2,clean=1": ("stream_cut", "cut"),
    "stall,after=2": ("idle_timeout", "cancelled"),
    "malformed,after=2": ("malformed_json", "malformed"),
    "stream-error,after=2": ("server_error", "stream-error"),
}


@pytest.mark.parametrize("scenario", list(BREAKS))
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_stream_that_breaks_midway_is_a_clean_stream_error(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str, scenario: str
) -> None:
    code, outcome = BREAKS[scenario]
    if fmt != "openai" and scenario.startswith("stream-error"):
        code = {"anthropic": "overloaded_error", "gemini": "UNAVAILABLE"}[fmt]
    cfg = config(provider(mock, "a", scenario, fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        deltas: list[Delta] = []
        caught = await fails(sup, streaming=True, into=deltas)
        # Never a truncated answer presented as a success.
        assert caught.failure.category is C.STREAM_ERROR
        assert caught.failure.provider == "a"
        assert len(deltas) == 2
        assert SCRIPTED_ANSWER.startswith("".join(d.text for d in deltas))
        assert await agree(mock, cfg, caught.attempts) == ["a"]  # b never asked
        failure = caught.attempts[0].failure
        assert failure is not None and failure.code == code
        [broken] = mock.log
        assert broken.outcome == outcome
        # The mock goes on after a malformed chunk; the client stopped reading there.
        assert broken.chunks == (5 if scenario.startswith("malformed") else 2)
        if scenario.startswith("stall"):
            # The idle budget, counted from the last chunk (all of them came at once).
            assert broken.client_closed_at == BUDGETS.idle
            assert caught.attempts[0].ended_at == BUDGETS.idle
        if scenario in ("cut,after=2", "stall,after=2"):
            # A response broken midway is never pooled (one whose body ended properly may be).
            assert mock.open_connections == 0
        assert sup.health()["b"].consecutive_failures == 0


@pytest.mark.parametrize("scenario", list(BREAKS))
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_stream_that_breaks_midway_restarts_and_the_caller_gets_the_text_once(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str, scenario: str
) -> None:
    policies = Policies(stream=StreamPolicy(mid_stream=MidStream.RESTART))
    cfg = config(
        provider(mock, "a", scenario, fmt), provider(mock, "b", "ok,chunks=3"), policies=policies
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await stream(sup)
        assert "".join(d.text for d in deltas) == SCRIPTED_ANSWER
        assert reply.text == SCRIPTED_ANSWER
        assert reply.provider == "b"
        assert reply.model == model_of(cfg, "b")
        assert [d.provider for d in deltas[:2]] == ["a", "a"]
        assert {d.provider for d in deltas[2:]} == {"b"}
        assert await agree(mock, cfg, reply.attempts) == ["a", "b"]
        assert [a.outcome for a in mock.log] == [BREAKS[scenario][1], "ok"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_an_error_event_inside_the_stream_in_each_format(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str
) -> None:
    cfg = config(provider(mock, "a", "stream-error,after=2", fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        deltas: list[Delta] = []
        caught = await fails(sup, streaming=True, into=deltas)
        assert caught.failure.category is C.STREAM_ERROR
        assert "overloaded" in caught.failure.message
        assert len(deltas) == 2
        failure = caught.attempts[0].failure
        assert failure is not None and failure.category is C.OVERLOADED
        assert await agree(mock, cfg, caught.attempts) == ["a"]
        h = sup.health()["a"]
        assert (h.state, h.benched_until) == (State.BENCHED, 2.0)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_an_error_event_before_the_first_delta_fails_over_transparently(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str
) -> None:
    cfg = config(provider(mock, "a", "stream-error,after=0", fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await stream(sup)
        assert_whole_answer(reply, cfg)
        assert {d.provider for d in deltas} == {"b"}
        assert await agree(mock, cfg, reply.attempts) == ["a", "b"]
        assert mock.log[0].outcome == "stream-error"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_stream_without_its_terminator_is_a_whole_answer_finalised_at_once(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str
) -> None:
    cfg = config(provider(mock, "a", "no-done", fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await stream(sup)
        assert_whole_answer(reply, cfg)
        assert reply.provider == "a"
        assert trio.current_time() == 0  # no grace period waited for
        assert await agree(mock, cfg, reply.attempts) == ["a"]
        assert mock.log[0].outcome == "no-done"
        assert_healthy(sup, "a")


@pytest.mark.parametrize("scenario", ["cut", "malformed"])
async def test_a_broken_whole_body_fails_over_transparently(
    autojump_clock: trio.abc.Clock, mock: MockProvider, scenario: str
) -> None:
    cfg = config(provider(mock, "a", scenario), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        reply = await sup.complete(request())
        assert_whole_answer(reply, cfg)
        assert reply.provider == "b"
        tried = await agree(mock, cfg, reply.attempts)
        failure = reply.attempts[0].failure
        assert failure is not None
        if scenario == "cut":
            # The connection died under the body: a network failure, retried once.
            assert (failure.category, failure.code) == (C.NETWORK, "incomplete_body")
            assert tried == ["a", "a", "b"]
        else:
            assert (failure.category, failure.code) == (C.STREAM_ERROR, "malformed_json")
            assert tried == ["a", "b"]


# --- continuing a partial answer ---------------------------------------------------------------


async def test_a_prefill_is_never_sent_to_a_provider_that_cannot_continue_and_a_refusal_never_hides_the_break(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    policies = Policies(stream=StreamPolicy(mid_stream=MidStream.CONTINUE))
    cfg = config(
        provider(mock, "a", "cut,after=2"),
        provider(mock, "b", "ok"),  # OpenAI: declares it does not continue
        provider(mock, "c", "no-prefill", "anthropic"),  # declares it does, then refuses
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        deltas: list[Delta] = []
        caught = await fails(sup, streaming=True, into=deltas)
        # The failure the caller sees is the one that broke its stream, not the refusal.
        assert caught.failure.category is C.STREAM_ERROR
        assert caught.failure.provider == "a"
        assert len(deltas) == 2
        assert await agree(mock, cfg, caught.attempts) == ["a", "c"]
        assert seen(mock, cfg, "b") == []
        refused = caught.attempts[1]
        assert refused.continuation
        assert refused.failure is not None and refused.failure.category is C.BAD_REQUEST
        skip = next(d for d in caught.decisions if d.action is Action.SKIP)
        assert skip.actor == "b"
        # What c was sent: the question, then the partial answer to continue.
        [sent] = seen(mock, cfg, "c")
        partial = "".join(d.text for d in deltas)
        assert sent.request["messages"][-1] == {"role": "assistant", "content": partial.rstrip()}
        # A refused continuation is no penalty.
        assert sup.health()["c"].consecutive_failures == 0


async def test_a_provider_that_can_continue_gets_the_partial_answer_as_a_prefill(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    policies = Policies(stream=StreamPolicy(mid_stream=MidStream.CONTINUE))
    cfg = config(
        provider(mock, "a", "cut,after=2"),
        provider(mock, "b", "ok", "gemini"),  # Gemini does not promise to continue
        provider(mock, "c", "ok", accepts_continuation=True),  # configured to continue
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        deltas, reply = await stream(sup)
        partial = "".join(d.text for d in deltas[:2])
        assert reply.provider == "c"
        # The mock answers afresh rather than continuing; what matters is that the caller got
        # the partial answer once, then the continuation, and c was asked to continue.
        assert reply.text == partial + SCRIPTED_ANSWER
        assert await agree(mock, cfg, reply.attempts) == ["a", "c"]
        assert reply.attempts[1].continuation
        [sent] = seen(mock, cfg, "c")
        assert sent.request["messages"][-1] == {"role": "assistant", "content": partial}
        assert seen(mock, cfg, "b") == []


# --- flapping ----------------------------------------------------------------------------------


async def test_a_flapping_primary_fails_over_during_the_outage_is_probed_once_then_serves_again(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    policies = Policies(health=HealthPolicy(failure_threshold=2, cooldown_base=2.0))
    cfg = config(
        # Passive probes (the mock's model list answers while a model is down).
        provider(mock, "a", "flapping,down=1,chunks=3,delay=0.5", probe="off"),
        provider(mock, "b", "ok"),
        policies=policies,
    )
    async with open_supervisor(cfg) as sup:
        # The outage: a fails twice (a retry), is benched, b answers.
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert await agree(mock, cfg, reply.attempts) == ["a", "a", "b"]
        h = sup.health()["a"]
        assert h.state is State.BENCHED
        assert h.benched_until is not None
        # While benched, a sees nothing.
        reply = await sup.complete(request())
        assert reply.provider == "b"
        assert len(seen(mock, cfg, "a")) == 2
        # The bench ends after the outage did: one probe, while another request goes to b.
        await trio.sleep_until(h.benched_until)
        assert sup.health()["a"].state is State.PROBING
        replies: dict[str, Reply] = {}

        async def one(key: str) -> None:
            replies[key] = (await stream(sup))[1]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first")
            await wait_all_tasks_blocked()
            assert sup.health()["a"].probe_in_flight
            nursery.start_soon(one, "second")
        assert replies["first"].provider == "a"
        assert replies["first"].attempts[0].probe
        assert replies["second"].provider == "b"
        assert len(seen(mock, cfg, "a")) == 3  # exactly one probe
        assert_healthy(sup, "a")
        # Back to the primary, no longer probing.
        reply = await sup.complete(request())
        assert reply.provider == "a"
        assert not reply.attempts[0].probe
        assert len(seen(mock, cfg, "a")) == 4
        assert_healthy(sup, "a")


# --- the caller goes away ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_caller_leaving_mid_stream_closes_the_upstream_request_at_once(
    autojump_clock: trio.abc.Clock, mock: MockProvider, fmt: str
) -> None:
    cfg = config(provider(mock, "a", "ok,chunks=10,delay=1", fmt), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        got = []
        async with sup.stream(request()) as s:
            async for delta in s:
                got.append(delta)
                if len(got) == 3:
                    break
        left_at = trio.current_time()
        assert left_at == 2.0
        await wait_all_tasks_blocked()
        [attempt] = mock.log
        assert attempt.outcome == "cancelled"
        assert attempt.client_closed_at == left_at  # at once
        assert attempt.chunks == 3
        assert mock.open_connections == 0  # closed, not pooled half-read
        assert_healthy(sup, "a")
        assert seen(mock, cfg, "b") == []  # no failover for a caller who left
        assert sup.statistics().in_flight == 0
        # The provider is as good as before.
        _, reply = await stream(sup)
        assert reply.provider == "a"


async def test_a_caller_deadline_cancels_a_whole_answer_upstream(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "slow,first_delay=2"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        with trio.move_on_after(1.5) as scope:
            await sup.complete(request())
        assert scope.cancelled_caught
        await wait_all_tasks_blocked()
        [attempt] = mock.log
        assert (attempt.outcome, attempt.client_closed_at) == ("cancelled", 1.5)
        assert mock.open_connections == 0
        assert_healthy(sup, "a")
        assert sup.statistics().in_flight == 0


async def test_closing_the_supervisor_mid_stream_closes_every_upstream_connection(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "ok,chunks=10,delay=1"), provider(mock, "b", "ok"))
    caught: list[RequestFailed] = []
    got: list[Delta] = []

    async def reader(sup: Supervisor) -> None:
        with pytest.raises(RequestFailed) as failed:
            await stream(sup, got)
        caught.append(failed.value)

    async with trio.open_nursery() as nursery:
        async with open_supervisor(cfg) as sup:
            nursery.start_soon(reader, sup)
            await trio.sleep(2.5)
            assert mock.open_connections == 1
    await wait_all_tasks_blocked()
    [failed] = caught
    assert failed.failure.code == "supervisor_closed"
    assert len(got) == 3
    [attempt] = mock.log
    assert (attempt.outcome, attempt.client_closed_at) == ("cancelled", 2.5)
    assert mock.open_connections == 0


async def test_a_caller_giving_up_on_a_silent_provider_is_no_penalty(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "hang"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        with trio.move_on_after(1):
            await stream(sup)
        await wait_all_tasks_blocked()
        [attempt] = mock.log
        assert (attempt.outcome, attempt.client_closed_at) == ("hang", 1.0)
        assert mock.open_connections == 0
        assert_healthy(sup, "a")  # the caller's deadline is not the provider's timeout


async def test_an_exception_inside_the_supervisor_block_still_closes_every_connection(
    mock: MockProvider,
) -> None:
    cfg = config(provider(mock, "a", "ok"), provider(mock, "b", "ok", "anthropic"))
    raised = False
    try:
        async with open_supervisor(cfg) as sup:
            await sup.complete(request())
            assert mock.open_connections == 1
            raise KeyError("the caller's own bug")
    except* KeyError:
        raised = True
    assert raised
    await wait_all_tasks_blocked()
    assert mock.open_connections == 0


async def test_a_slow_reader_slows_the_provider_read_without_an_idle_timeout(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "ok,chunks=4,delay=1"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        got = []
        async with sup.stream(request()) as s:
            async for delta in s:
                got.append(delta)
                await trio.sleep(5)  # longer than the idle budget: waiting on us is no fault
        assert "".join(d.text for d in got) == SCRIPTED_ANSWER
        assert s.reply.provider == "a"
        assert await agree(mock, cfg, s.reply.attempts) == ["a"]
        assert_healthy(sup, "a")


async def test_a_caller_leaving_while_the_actor_waits_to_hand_it_a_delta(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    cfg = config(provider(mock, "a", "ok,chunks=10,delay=1"), provider(mock, "b", "ok"))
    async with open_supervisor(cfg) as sup:
        async with sup.stream(request()) as s:
            async for _ in s:
                # Meanwhile the next delta arrives (at 1 s) and waits for us.
                await trio.sleep(1.5)
                break
        await wait_all_tasks_blocked()
        [attempt] = mock.log
        assert (attempt.outcome, attempt.client_closed_at) == ("cancelled", 1.5)
        assert mock.open_connections == 0
        assert_healthy(sup, "a")
        assert sup.statistics().in_flight == 0
        assert seen(mock, cfg, "b") == []


# --- many requests at once ---------------------------------------------------------------------


async def test_concurrent_streams_share_at_most_max_concurrency_connections(
    autojump_clock: trio.abc.Clock, mock: MockProvider
) -> None:
    a = provider(mock, "a", "ok,chunks=4,delay=0.5")
    cfg = config(
        ProviderConfig(
            name="a", client=a.client, model=a.model, budgets=BUDGETS, max_concurrency=4
        ),
        provider(mock, "b", "ok"),
    )
    replies: list[Reply] = []

    async def one() -> None:
        replies.append((await stream(sup))[1])

    async with open_supervisor(cfg) as sup:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
            await trio.sleep(0.25)
            assert mock.open_connections == 4
        assert [r.provider for r in replies] == ["a"] * 10
        assert all(r.text == SCRIPTED_ANSWER for r in replies)
        assert mock.accepted == 4  # kept alive and reused
        assert mock.open_connections == 4
        # Three rounds of 1.5 s: queued jobs waited in the inbox, not in a connection pool.
        assert trio.current_time() == 4.5
        assert_healthy(sup, "a")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_long_stream_split_across_many_reads_arrives_whole_and_in_order(
    mock: MockProvider, fmt: str
) -> None:
    # Half a megabyte or so of events, read in whatever pieces the socket gives: events (and
    # Gemini's CRLF line ends) are split across reads at arbitrary places.
    cfg = config(provider(mock, "a", "ok,repeat=300,chunks=1500", fmt))
    async with open_supervisor(cfg) as sup:
        deltas, reply = await stream(sup)
        assert reply.text == " ".join([SCRIPTED_ANSWER] * 300)
        assert len(deltas) == 1500
        assert reply.usage is not None and reply.usage.completion_tokens == 300 * ANSWER_WORDS
        assert await agree(mock, cfg, reply.attempts) == ["a"]
