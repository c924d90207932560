"""``RedisState``: the state shared through Redis/Valkey, with coredis (which runs on trio
through anyio).

Routing never waits on Redis: every call answers from the ``LocalState`` inside (its mirror)
at once, and the change is queued for a background writer. A reader applies what other
instances publish; a syncer reads everything every ``sync_interval`` (the backstop) and
re-publishes local benches and pins that Redis lacks (after a restart or a ``FLUSHALL``).
When Redis is away the backend says ``state_degraded``, answers from local state alone,
reconnects with backoff, and says ``state_restored`` once a full read has succeeded.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from coredis.retry import NoRetryPolicy

from .._policy import RetryBudgetPolicy
from . import _scripts as scripts
from ._backend import DEFAULT_RETRY_BUDGET, EventHook, LocalState, WallClock
from ._batch import Op, send_ops
from ._client import Client, redis_client
from ._codec import (
    exception_name,
    limits_to_json,
)
from ._config import StateConfig
from ._inbound import Inbound
from ._mirror import Mirror, RetryWindow
from ._model import (
    BenchRecord,
    Deployment,
    LearnedLimits,
    Pin,
    ProbeLease,
    StateEvent,
    StateEventKind,
    StateStatistics,
    minute_of,
)
from ._unsent import Unsent

#: A queued write: builds its operations when the writer takes it (counts are read then).
Write = Callable[[], list[Op]]

#: Retry tokens each instance holds ready, granted by the shared bucket in advance (so that a
#: retry never waits on Redis); they count as spent when granted.
RETRY_RESERVE = 2
#: Requests alone (the reserve full) are reported to the shared retry window at most this often
#: (seconds): each script costs the gateway ~0.5 ms of CPU (coredis on anyio), so one per
#: writer turn cost ~10 % per request, and one per 0.1 s per process still ~2-3 % (relayrace
#: bench --only state). Unreported requests only make the fleet's budget stricter meanwhile
#: (by 0.25 s of requests in the default 10 s window).
REQUEST_REPORT_INTERVAL = 0.25
#: Consecutive-failure counts (and their resets) are sent at most this often (seconds), all
#: deployments' in one script: a script per failure cost ~25 % of a gateway's CPU per request
#: when every request failed over (relayrace bench --only state). The first change after a
#: quiet spell goes at once; the fleet's count lags by at most this much more. 0.1 s, not
#: 0.05: a provider flapping (its count reset and reaching the threshold ~25 times a second)
#: cost +3 to +6 % CPU per request at 0.05 s, each change a round trip and a message to every
#: instance; benches themselves are written at once.
FAILURE_REPORT_INTERVAL = 0.1
#: Failures that found the fleet's count at its threshold already (the deployment is benched,
#: or exempt, or may not be benched) decide nothing anywhere: they are sent at most this often
#: (seconds), or sooner riding along with another write, and not announced (``FAILS``). An
#: exempt provider failing every request cost ~5 % of the gateway's CPU per request when each
#: went within FAILURE_REPORT_INTERVAL and was announced (relayrace bench --only state).
SETTLED_REPORT_INTERVAL = 1.0
#: The most operations one writer turn sends in one ``BATCH`` script (one round trip: each
#: round trip costs the gateway ~0.5 ms of CPU whatever it carries).
MAX_BATCH = 64


class RedisState:
    """The ``StateBackend`` shared through Redis; made by ``open_redis_state``."""

    def __init__(
        self,
        config: StateConfig,
        *,
        retry_budget: RetryBudgetPolicy,
        on_event: EventHook | None,
        wall_clock: WallClock,
    ):
        self.instance = uuid.uuid4().hex[:12]
        self._config = config
        self._keys = scripts.Keys(config.prefix)
        self._local = LocalState(
            retry_budget=retry_budget, wall_clock=wall_clock, instance=self.instance
        )
        self._budget = retry_budget
        self._on_event = on_event
        self._send, self._receive = trio.open_memory_channel[Write](config.queue_size)
        self._client: Client | None = None
        self._scripts: dict[str, Any] = {}
        self._connected = trio.Event()
        self._degraded = False
        self._reserve = 0
        self._unsent_requests = 0
        self._unsent_retries = 0
        self._tick_queued = False
        self._reported_at = 0.0
        self._unsent = Unsent()
        self._inbound = Inbound(
            self._local.mirror, self._unsent, self.instance, self._emit, self._local.now
        )
        self._usage_queued = False
        self._fails_queued = False
        self._fails_sent_at = -math.inf
        self._dropped = 0
        self._reconnects = 0
        self._republished = 0

    # -- the request path: answer from the mirror, queue the change ----------------------------

    @property
    def mirror(self) -> Mirror:
        return self._local.mirror

    def now(self) -> float:
        return self._local.now()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def bench(
        self, deployment: Deployment, *, until: float, reason: str, manual: bool = False
    ) -> BenchRecord:
        merged = self._local.bench(deployment, until=until, reason=reason, manual=manual)
        self._queue(
            self._write_bench,
            deployment.field,
            BenchRecord(until=round(until, 3), reason=reason, manual=manual),
        )
        return merged

    def unbench(self, deployment: Deployment, *, manual: bool = False) -> bool:
        lifted = self._local.unbench(deployment, manual=manual)
        self._queue(
            self._run, "unbench", [self._keys.bench], [deployment.field, "1" if manual else "0"]
        )
        return lifted

    def record_failure(self, deployment: Deployment, *, threshold: int | None = None) -> int:
        count = self._local.record_failure(deployment)
        # A failure that found the count at the threshold already decides nothing: it waits.
        urgent = threshold is None or count <= threshold
        self._unsent.failure(deployment.field, threshold or 0, urgent=urgent)
        self._queue_fails()
        return count

    def record_success(self, deployment: Deployment) -> None:
        self._local.record_success(deployment)
        self._unsent.success(deployment.field)
        self._queue_fails()

    async def acquire_probe(self, deployment: Deployment, *, ttl: float) -> bool:
        """Take the lease in Redis (within ``operation_timeout``); while Redis is away, or too
        slow, the lease is decided locally."""
        lease = self.mirror.probe(deployment, self.now())
        if lease is not None and lease.holder != self.instance:
            await trio.lowlevel.checkpoint()
            return False
        client = self._client
        if client is not None:
            now = self.now()
            args = [
                self.instance,
                str(max(1, int(ttl * 1000))),
                deployment.field,
                self._keys.channel,
                repr(now),
            ]
            with trio.move_on_after(self._config.operation_timeout):
                try:
                    granted = await self._scripts["probe"](
                        keys=[self._keys.probe(deployment.field)], args=args
                    )
                except Exception:  # Redis trouble: decided locally below
                    pass
                else:
                    if granted:
                        self.mirror.probes[deployment.field] = ProbeLease(
                            holder=self.instance, until=now + ttl
                        )
                    return bool(granted)
        return self._local.take_probe(deployment, ttl)

    def release_probe(self, deployment: Deployment) -> None:
        self._local.release_probe(deployment)
        args = [self.instance, deployment.field]
        self._queue(self._run, "unprobe", [self._keys.probe(deployment.field)], args)

    def record_request(self) -> None:
        self._local.record_request()
        self._unsent_requests += 1
        if (
            self._reserve < RETRY_RESERVE
            or self.now() - self._reported_at >= REQUEST_REPORT_INTERVAL
        ):
            self._queue_tick()

    def try_retry(self) -> bool:
        if self._client is None:
            # Away from Redis: the local window decides, with this instance's part of the floor;
            # what it spends is told to Redis later.
            if self._local.try_retry(self.mirror.instances):
                self._unsent_retries += 1
                return True
            return False
        if self._reserve > 0:
            self._reserve -= 1
            self._queue_tick()
            return True
        self._queue_tick()
        return False

    def admit(
        self, deployment: Deployment, *, tokens: int, rpm: int | None = None, tpm: int | None = None
    ) -> bool:
        if not self._local.admit(deployment, tokens=tokens, rpm=rpm, tpm=tpm):
            return False
        self._count_usage(deployment.field, 1, tokens)
        return True

    def count(self, deployment: Deployment, *, requests: int, tokens: int) -> None:
        self._local.count(deployment, requests=requests, tokens=tokens)
        self._count_usage(deployment.field, requests, tokens)

    def reconcile(self, deployment: Deployment, *, estimated: int, actual: int) -> None:
        self._local.reconcile(deployment, estimated=estimated, actual=actual)
        self._count_usage(deployment.field, 0, actual - estimated)

    def learn_limits(self, deployment: Deployment, limits: LearnedLimits) -> None:
        self._local.learn_limits(deployment, limits)
        value = json.dumps(limits_to_json(limits))
        self._queue(self._run, "limits", [self._keys.limits], [deployment.field, value])

    def pin(self, key: str, deployment: Deployment, *, ttl: float) -> None:
        self._local.pin(key, deployment, ttl=ttl)
        pin = self.mirror.pins[key]
        self._queue(self._write_pin, key, pin)

    def statistics(self) -> StateStatistics:
        return StateStatistics(
            backend="redis",
            connected=self._client is not None,
            degraded=self._degraded,
            queued=self._send.statistics().current_buffer_used,
            dropped=self._dropped,
            reconnects=self._reconnects,
            republished=self._republished,
            ignored=self._inbound.ignored,
            instances=self.mirror.instances,
        )

    async def wait_connected(self) -> None:
        """Wait until Redis has been reached and read once (for start-up checks and tests)."""
        await self._connected.wait()

    def _queue(self, write: Callable[..., list[Op]], *args: Any) -> bool:
        try:
            self._send.send_nowait(lambda: write(*args))
        except trio.WouldBlock:
            # The mirror has the change; the next full read re-publishes benches and pins.
            self._dropped += 1
            return False
        return True

    def _queue_tick(self) -> None:
        if not self._tick_queued and self._client is not None:
            self._tick_queued = self._queue(self._write_retry_tick)

    def _queue_fails(self, *, due: bool = False) -> None:
        # Sent at once after a quiet spell, else by the flusher within FAILURE_REPORT_INTERVAL;
        # failures past their threshold alone within SETTLED_REPORT_INTERVAL (or sooner, riding
        # along with another write).
        if self._fails_queued or not self._unsent.fails:
            return
        since = trio.current_time() - self._fails_sent_at
        if self._unsent.urgent:
            send = due or since >= FAILURE_REPORT_INTERVAL
        else:
            send = since >= SETTLED_REPORT_INTERVAL
        if send:
            self._fails_queued = self._queue(self._write_fails)

    def _count_usage(self, field: str, requests: int, tokens: int) -> None:
        # Counted per request, sent per writer turn: one script per deployment and minute
        # however many requests were admitted meanwhile.
        self._unsent.count(field, minute_of(self.now()), requests, tokens)
        if not self._usage_queued:
            self._usage_queued = self._queue(self._write_usage)

    # -- the writes, run by the writer task ----------------------------------------------------

    def _run(self, name: str, keys: list[str], args: list[str]) -> list[Op]:
        return [(name, keys, [*args, self._keys.channel], None)]

    def _write_bench(self, field: str, record: BenchRecord) -> list[Op]:
        value = json.dumps(
            {"until": record.until, "reason": record.reason, "manual": record.manual}
        )
        args = [field, value, repr(self.now()), self._keys.channel, self.instance]
        return [("bench", [self._keys.bench], args, None)]

    def _write_fails(self) -> list[Op]:
        self._fails_queued = False
        self._fails_sent_at = trio.current_time()
        args = self._unsent.take_fails()
        if not args:
            return []
        return [("fails", [self._keys.fails], [self._keys.channel, *args], None)]

    def _write_usage(self) -> list[Op]:
        self._usage_queued = False
        pending = self._unsent.take_usage()
        return [
            (
                "usage",
                list(self._keys.usage(minute)),
                [field, str(requests), str(tokens), self._keys.channel, str(minute), "120000"],
                None,
            )
            for (field, minute), (requests, tokens) in pending.items()
        ]

    def _write_pin(self, key: str, pin: Pin) -> list[Op]:
        value = json.dumps({"f": pin.deployment.field, "until": pin.until})
        return self._run("pin", [self._keys.pins], [key, value])

    def _write_retry_tick(self) -> list[Op]:
        self._tick_queued = False
        self._reported_at = self.now()
        requests, retries = self._unsent_requests, self._unsent_retries
        want = max(0, RETRY_RESERVE - self._reserve)
        if not (requests or retries or want):
            return []
        width = self._budget.window / RetryWindow.BUCKETS
        index = int(self.now() // width)
        keys = [self._keys.retry(i) for i in range(index - RetryWindow.BUCKETS + 1, index + 1)]
        ttl = str(int(self._budget.window * 2000) + 1000)
        args = [
            str(requests),
            str(retries),
            str(want),
            repr(self._budget.ratio),
            str(self._budget.floor),
            ttl,
        ]

        def granted(tokens: Any) -> None:
            self._unsent_requests -= requests
            self._unsent_retries -= retries
            self._reserve += int(tokens)

        return [("retry", keys, args, granted)]

    # -- the background: connect, read, write, sync; degrade and come back ---------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a session with Redis going until cancelled; started at once (the backend answers
        from local state until Redis is reached)."""
        task_status.started()
        backoff = self._config.backoff_min
        while True:
            reason = "closed"
            try:
                await self._session()
            except* Exception as group:
                # Every Redis trouble, whatever its shape (coredis's own cleanup may add a
                # ClosedResourceError to a cancellation, which passes on as it should).
                reason = exception_name(group)
            self._lost(reason)
            await trio.sleep(backoff * (0.5 + _jitter()))
            backoff = min(backoff * 2, self._config.backoff_max)
            self._reconnects += 1

    async def _session(self) -> None:
        config = self._config
        assert config.url is not None
        with trio.CancelScope(deadline=trio.current_time() + config.connect_timeout) as connecting:
            async with redis_client(config) as client:
                self._scripts = {
                    name: client.register_script(getattr(scripts, name.upper()))
                    for name in (*scripts.BATCHED, "probe", "snapshot", "batch")
                }
                pubsub = client.pubsub(
                    channels=[self._keys.channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                    subscription_timeout=config.connect_timeout,
                    max_idle_seconds=max(1.0, config.sync_interval),
                )
                async with pubsub:
                    await self._sync(client)
                    connecting.deadline = math.inf
                    self._client = client
                    self._backoff_reset()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reader, pubsub)
                        nursery.start_soon(self._writer, client)
                        nursery.start_soon(self._syncer, client)
                        nursery.start_soon(self._flusher)
        if connecting.cancelled_caught:
            raise TimeoutError("connect")

    def _backoff_reset(self) -> None:
        self.mirror.away = False
        if self._degraded:
            self._degraded = False
            self._emit(StateEventKind.RESTORED, "reconnected")
        self._connected.set()
        self._queue_tick()

    def _lost(self, reason: str) -> None:
        self._client = None
        self.mirror.away = True
        self._reserve = 0
        self._tick_queued = False
        if not self._degraded:
            self._degraded = True
            self._emit(StateEventKind.DEGRADED, reason)

    def _emit(self, kind: StateEventKind, reason: str, field: str | None = None) -> None:
        if self._on_event is not None:
            self._on_event(StateEvent(kind=kind, reason=reason, at=self.now(), field=field))

    async def _writer(self, client: Client) -> None:
        """Send what is queued, one round trip per turn: everything queued meanwhile (up to
        ``MAX_BATCH`` operations) in one ``BATCH`` script, with the failure counts and the
        requests not yet reported riding along (they would have needed a round trip of
        their own soon)."""
        async for write in self._receive:
            ops = write()
            while len(ops) < MAX_BATCH:
                try:
                    ops += self._receive.receive_nowait()()
                except trio.WouldBlock:
                    break
            if self._unsent.fails:
                ops += self._write_fails()
            if ops and self._rides_along() and not any(op[0] == "retry" for op in ops):
                ops += self._write_retry_tick()
            if ops:
                with trio.fail_after(self._config.operation_timeout):
                    await send_ops(self._scripts, client, ops)

    def _rides_along(self) -> bool:
        """Whether the retry window's report joins a round trip made anyway: when tokens are
        wanted, or half its interval has passed (not on every turn: its script reads ten
        slices, work for Redis)."""
        return (
            self._reserve < RETRY_RESERVE
            or self._unsent_retries > 0
            or self.now() - self._reported_at >= REQUEST_REPORT_INTERVAL / 2
        )

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(FAILURE_REPORT_INTERVAL)
            self._queue_fails(due=True)

    async def _syncer(self, client: Client) -> None:
        while True:
            await trio.sleep(self._config.sync_interval)
            await self._sync(client)

    async def _sync(self, client: Client) -> None:
        """Read everything, merge it into the mirror, re-publish what Redis lacks."""
        now = self.now()
        keys = self._keys
        names = [
            keys.bench,
            keys.fails,
            keys.limits,
            keys.pins,
            *keys.usage(minute_of(now)),
            keys.instances,
        ]
        # This instance is counted as live until three full reads from now.
        args = [repr(now), self.instance, repr(now + 3 * self._config.sync_interval)]
        with trio.fail_after(self._config.operation_timeout):
            result = await self._scripts["snapshot"](keys=names, args=args, client=client)
        # Writes still queued will reach Redis anyway: re-publish only when none are.
        republish = self._send.statistics().current_buffer_used == 0
        lacking = self._inbound.snapshot(result, now, republish=republish)
        for field, record in lacking.benches:
            self._queue(self._write_bench, field, record)
        for key, pin in lacking.pins:
            self._queue(self._write_pin, key, pin)
        self._republished += len(lacking.benches) + len(lacking.pins)

    async def _reader(self, pubsub: Any) -> None:
        async for message in pubsub:
            if message["type"] == "message":
                self._inbound.message(message["data"])


@asynccontextmanager
async def open_redis_state(
    config: StateConfig,
    *,
    retry_budget: RetryBudgetPolicy = DEFAULT_RETRY_BUDGET,
    on_event: EventHook | None = None,
    wall_clock: WallClock = time.time,
) -> AsyncIterator[RedisState]:
    """Open a ``RedisState`` whose background session runs until the block ends.

    Returns at once: until Redis is reached (``wait_connected``) it answers from local state.
    """
    state = RedisState(config, retry_budget=retry_budget, on_event=on_event, wall_clock=wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        try:
            yield state
        finally:
            nursery.cancel_scope.cancel()


def _jitter() -> float:
    return random.random()
