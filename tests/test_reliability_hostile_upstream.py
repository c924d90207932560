"""A hostile upstream and a hostile caller (issue #11), through ``open_supervisor`` with the real
``OpenAIClient`` against ``tests/hostile_upstream.py`` on loopback.

What must hold, whatever the upstream sends: the request ends with exactly one reply or one
classified failure; a hostile body is a ``stream_error`` of its own code (``response_too_large``
for a whole body or its inflated gzip, ``sse_line_too_long`` for a line that never ends,
``malformed_text`` for text that cannot be encoded) and the request fails over; memory stays
bounded (``tracemalloc`` peak while the hostile response is read); no provider is benched by a
caller's input; a provider-sent wait is capped; no secret reaches the caller or the logs.

A test that fails today is marked ``xfail(strict=True)`` naming the row and what is wrong: the
marker must go when the fix lands. A test whose fix would read gigabytes today is stopped by the
hostile server's safety valve (``alarm`` bytes, then ``overrun``), so the xfail is fast.

The limits asserted assume defaults of the fix still to come: a whole body limit of at most
16 MiB, an SSE line limit of at most 4 MiB, and a wait for an actor slot of at most 30 s.
"""

from __future__ import annotations

import base64
import errno
import logging
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from relayrace import (
    BadRequest,
    Category,
    HealthPolicy,
    Policies,
    ProviderConfig,
    Reply,
    Request,
    RequestFailed,
    RetryPolicy,
    open_supervisor,
)
from relayrace.actors import OpenAIClient, State
from relayrace.testing import Answer, Crash, ScriptedClient

from .hostile_upstream import BIG_DELTAS, HostileUpstream, MiB, open_hostile_upstream
from .support import config

KEY = "sk-hostile-0123456789abcdefXYZ"
KEY_B64 = base64.b64encode(KEY.encode()).decode()
MESSAGES = [{"role": "user", "content": "hi"}]

#: A hostile response may not cost the reader more than this (the limit itself, 16 MiB at most,
#: plus what a read in progress holds), measured with tracemalloc.
MEMORY_BOUND = 40 * MiB


def provider(
    server: HostileUpstream, name: str, model: str, **kwargs: Any
) -> ProviderConfig:
    client = OpenAIClient(base_url=server.base_url, api_key=KEY, max_connections=8)
    return ProviderConfig(name=name, client=client, model=model, **kwargs)


def request() -> Request:
    return Request("m", MESSAGES)


def encodable(text: str | None) -> bool:
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def unless_overrun(
    server: HostileUpstream, run: Callable[[], Awaitable[Reply]]
) -> tuple[Reply | None, RequestFailed | None, int]:
    """Run ``run`` until it ends or the server's safety valve trips (the client read past
    ``alarm`` bytes); return the reply or the failure, and the tracemalloc peak meanwhile."""
    outcome: list[Any] = [None, None]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await server.overrun.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                outcome[0] = await run()
            except RequestFailed as exc:
                outcome[1] = exc
            nursery.cancel_scope.cancel()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not server.overrun.is_set(), (
        f"the client read past {server.alarm // MiB} MiB of a hostile response"
    )
    return outcome[0], outcome[1], peak


def failed_over(reply: Reply | None, code: str) -> None:
    """The reply came from ``b`` after one attempt on ``a`` that failed with ``code``."""
    assert reply is not None
    assert reply.provider == "b"
    first = reply.attempts[0]
    assert first.actor == "a" and first.failure is not None
    assert first.failure.category is Category.STREAM_ERROR, first.failure
    assert first.failure.code == code, first.failure


# --- row 2: a caller's text never benches a provider --------------------------------------------


async def test_row2_a_callers_lone_surrogate_is_a_bad_request_and_never_reaches_the_provider() -> None:
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", "ok"), provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:
            for _ in range(5):  # three used to bench a provider
                for bad in (
                    lambda: Request("m\ud800", MESSAGES),
                    lambda: Request("m", [{"role": "user", "content": "x\ud800"}]),
                    lambda: Request("m", MESSAGES, params={"stop": ["\udfff"]}),
                ):
                    with pytest.raises(BadRequest):
                        await sup.complete(bad())
            assert server.log == []
            for name in ("a", "b"):
                snapshot = sup.health()[name]
                assert snapshot.state is State.OK and snapshot.consecutive_failures == 0
            reply = await sup.complete(request())
            assert reply.provider == "a" and reply.text == "Hello from upstream"


# --- row 1 (the upstream half): text from a provider is checked where it enters -----------------


@pytest.mark.parametrize("model", ["surrogate-delta", "surrogate-error", "surrogate-model"])
async def test_row1_a_providers_lone_surrogate_never_reaches_the_caller(model: str) -> None:
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", model), provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:
            for stream in (False, True):
                if stream:
                    async with sup.stream(request()) as s:
                        text = "".join([d.text async for d in s])
                    reply = s.reply
                    assert text == reply.text
                else:
                    reply = await sup.complete(request())
                assert encodable(reply.text) and encodable(reply.model)
                for attempt in reply.attempts:
                    if attempt.failure is not None:
                        assert encodable(attempt.failure.message)
                        if model != "surrogate-error":
                            # Bad text from a 200 is the provider's malformed response.
                            assert attempt.failure.category is Category.STREAM_ERROR
                assert reply.provider == "b"


# --- row 3: an actor survives exhausted file descriptors ----------------------------------------


class FlakyFds(httpx.AsyncBaseTransport):
    """A transport that fails to open its connection with ``EMFILE`` while ``exhausted``."""

    def __init__(self) -> None:
        self.exhausted = True
        self.refused = 0
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.exhausted:
            self.refused += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        await self._real.aclose()


async def test_row3_emfile_at_connect_fails_over_without_penalty_and_the_actor_lives(
    autojump_clock: trio.abc.Clock,
) -> None:
    fds = FlakyFds()
    async with open_hostile_upstream() as server:
        a = ProviderConfig(
            name="a",
            client=OpenAIClient(base_url=server.base_url, api_key=KEY, transport=fds),
            model="ok",
        )
        cfg = config(a, provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:
            for _ in range(8):  # more than the restart limit (5 in 60 s)
                reply = await sup.complete(request())
                assert reply.provider == "b"
                failure = reply.attempts[0].failure
                assert failure is not None
                assert failure.category in (Category.LOCAL_CAPACITY, Category.NETWORK)
                assert KEY not in (failure.message or "")
            assert fds.refused >= 8
            assert sup.statistics().restarts == 0
            # Our own exhaustion is no fault of the provider's: never benched for it.
            assert sup.health()["a"].state is State.OK
            fds.exhausted = False
            reply = await sup.complete(request())
            assert reply.provider == "a"


async def test_row3_an_actor_that_gave_up_is_visible_and_retried_after_a_cool_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    crashing = ScriptedClient([Crash()] * 6 + [Answer()])
    cfg = config(
        ProviderConfig(name="a", client=crashing), ProviderConfig(name="b", client=ScriptedClient([]))
    )
    async with open_supervisor(cfg) as sup:
        gave_up = False
        async with sup.subscribe() as events:
            # Six crashes within the restart window (60 s); requests meanwhile are served by b.
            for _ in range(20):
                reply = await sup.complete(request())
                assert reply.provider == "b"
                await trio.sleep(2)  # longer than each restart backoff but the last
                while True:
                    try:
                        event = events.receive_nowait()
                    except trio.WouldBlock:
                        break
                    gave_up = gave_up or event.kind.value == "actor_gave_up"
                if gave_up:
                    break
        assert gave_up
        assert len(crashing.calls) == 6
        assert sup.health()["a"].state is not State.OK
        await trio.sleep(600)  # a cool-off, however long it is configured, is shorter
        reply = await sup.complete(request())
        assert reply.provider == "a"


# --- row 4: a hostile upstream cannot take the memory --------------------------------------------


async def test_row4_a_2_gib_body_stops_at_the_limit_and_fails_over() -> None:
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", "huge-body"), provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:
            reply, failure, peak = await unless_overrun(server, lambda: sup.complete(request()))
        assert failure is None
        failed_over(reply, "response_too_large")
        assert server.log[0].client_gone and server.log[0].sent <= 32 * MiB
        assert peak < MEMORY_BOUND


async def test_row4_a_gzip_bomb_stops_at_the_limit_and_fails_over() -> None:
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", "gzip-bomb"), provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:
            reply, failure, peak = await unless_overrun(server, lambda: sup.complete(request()))
        assert failure is None
        failed_over(reply, "response_too_large")
        assert server.log[0].client_gone
        assert peak < MEMORY_BOUND


async def test_row4_a_stream_of_1_mib_deltas_is_passed_on_not_kept() -> None:
    async with open_hostile_upstream(alarm=(BIG_DELTAS + 1) * 2 * MiB) as server:
        cfg = config(provider(server, "a", "big-deltas"), provider(server, "b", "ok"))
        received = 0
        async with open_supervisor(cfg) as sup:

            async def read() -> Reply:
                nonlocal received
                async with sup.stream(request()) as s:
                    async for delta in s:
                        received += len(delta.text)
                return s.reply

            reply, failure, peak = await unless_overrun(server, read)
        assert failure is None and reply is not None and reply.provider == "a"
        assert received == BIG_DELTAS * MiB
        assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB held for a 64 MiB stream"


# --- row 5: a provider-sent wait is capped -------------------------------------------------------


@pytest.mark.parametrize("model", ["retry-after-huge", "retry-after-9999"])
async def test_row5_a_providers_endless_wait_benches_for_at_most_cooldown_cap_and_is_not_waited(
    autojump_clock: trio.abc.Clock, model: str
) -> None:
    policies = Policies(health=HealthPolicy(cooldown_cap=120.0, failure_threshold=1))
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", model), provider(server, "b", "ok"), policies=policies)
        async with open_supervisor(cfg) as sup:
            start = trio.current_time()
            reply = await sup.complete(request())
            assert reply.provider == "b"
            assert trio.current_time() - start < 1  # nothing was waited for
            assert all(d.wait <= RetryPolicy().max_wait for d in reply.decisions)
            benched = sup.health()["a"]
            assert benched.state is State.BENCHED
            assert benched.benched_until is not None
            assert benched.benched_until - start <= 120.0
            await trio.sleep(121.0)
            assert sup.health()["a"].state is not State.BENCHED


@pytest.mark.parametrize("model", ["retry-after-huge", "retry-after-9999"])
async def test_row5_the_callers_retry_after_is_capped(
    autojump_clock: trio.abc.Clock, model: str
) -> None:
    async with open_hostile_upstream() as server:
        async with open_supervisor(config(provider(server, "a", model))) as sup:
            with pytest.raises(RequestFailed) as caught:
                await sup.complete(request())
    retry_after = caught.value.failure.retry_after
    assert retry_after is not None
    assert retry_after <= HealthPolicy().cooldown_cap


# --- row 6: a slow consumer does not hold a provider from others --------------------------------


async def test_row6_a_request_that_waits_too_long_for_a_slot_fails_over(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_hostile_upstream() as server:
        cfg = config(
            provider(server, "a", "many-deltas", max_concurrency=2, inbox_size=8),
            provider(server, "b", "ok"),
        )
        async with open_supervisor(cfg) as sup, trio.open_nursery() as nursery:

            async def never_read(*, task_status: trio.TaskStatus[None]) -> None:
                async with sup.stream(request()) as s:
                    await anext(aiter(s))  # a's slot is taken and its stream has begun
                    task_status.started()
                    await trio.sleep_forever()

            for _ in range(2):
                await nursery.start(never_read)
            start = trio.current_time()
            with trio.fail_after(60):
                reply = await sup.complete(request())
            assert reply.provider == "b"
            assert trio.current_time() - start <= 30
            first = reply.attempts[0]
            assert first.actor == "a" and first.failure is not None
            assert first.failure.category is Category.LOCAL_CAPACITY
            assert sup.health()["a"].consecutive_failures == 0
            nursery.cancel_scope.cancel()


# --- row 7: no secret reaches the caller or the logs ---------------------------------------------


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert KEY not in str(text) and KEY_B64 not in str(text), text


async def test_row7_a_key_the_provider_echoes_never_reaches_the_caller() -> None:
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", "echo-key"))
        async with open_supervisor(cfg) as sup, sup.subscribe() as events:
            reply = await sup.complete(request())
            await trio.testing.wait_all_tasks_blocked()
            seen = []
            while True:
                try:
                    seen.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
    assert reply.provider == "a" and server.log[0].model == "echo-key"
    assert_no_secret(reply.text, reply.model, reply, *[e.to_dict() for e in seen])


async def test_row7_logs_at_debug_hold_no_key_and_no_httpx_chatter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_hostile_upstream() as server:
        cfg = config(provider(server, "a", "echo-key"), provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:
            await sup.complete(request())
    for record in caplog.records:
        assert_no_secret(record.getMessage())
        if record.name.startswith(("httpx", "httpcore")):
            assert record.levelno >= logging.WARNING, record.getMessage()


# --- row 8: an SSE line that never ends ----------------------------------------------------------


async def test_row8_an_sse_line_that_never_ends_stops_at_the_limit_and_fails_over() -> None:
    # The alarm is low because today's decoder is quadratic: 8 MiB cost ~1 s of CPU, 32 MiB 12 s.
    async with open_hostile_upstream(alarm=8 * MiB) as server:
        cfg = config(provider(server, "a", "endless-line"), provider(server, "b", "ok"))
        async with open_supervisor(cfg) as sup:

            async def read() -> Reply:
                async with sup.stream(request()) as s:
                    async for _ in s:
                        pass
                return s.reply

            cpu = time.process_time()
            reply, failure, peak = await unless_overrun(server, read)
            cpu = time.process_time() - cpu
        assert failure is None
        failed_over(reply, "sse_line_too_long")
        assert server.log[0].client_gone
        assert peak < MEMORY_BOUND
        assert cpu < 2.0, f"{cpu:.1f} s of CPU to refuse one line"


# --- the hostile server itself -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["huge-body", "gzip-bomb", "endless-line"])
async def test_the_hostile_server_sends_what_it_claims_and_stops_when_the_client_goes(
    model: str,
) -> None:
    async with open_hostile_upstream() as server, httpx.AsyncClient() as http:
        url = f"{server.base_url}/chat/completions"
        async with http.stream("POST", url, json={"model": model, "stream": True}) as response:
            assert response.status_code == 200
            read = b""
            chunks = response.aiter_bytes()  # inflated, for the gzip bomb
            async for chunk in chunks:
                read += chunk
                if len(read) >= 4 * MiB:
                    break
            with trio.CancelScope() as unwind:  # unwinds httpx's nested generators now
                unwind.cancel()
                async for _ in chunks:
                    pass
        assert read.count(b"a") > 4 * MiB - 100 and b"\n" not in read
        with trio.fail_after(5):
            await server.log[0].done.wait()
        assert server.log[0].client_gone and not server.overrun.is_set()
        assert server.log[0].sent < server.alarm
        if model == "huge-body":
            assert response.headers["content-length"] == str(2 << 30)
        if model == "gzip-bomb":
            assert response.headers["content-encoding"] == "gzip"
            assert int(response.headers["content-length"]) < 4 * MiB
