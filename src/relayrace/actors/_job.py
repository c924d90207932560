"""One attempt as the actor runs it: the ``Job`` (what the supervisor asks, and its result) and
the ``JobSink`` through which the client's answer reaches the caller while the attempt's deadline
moves with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from .._client import ClientCall, Completion
from .._failure import Category, Failure
from .._values import Attempt, Outcome, ToolCallDelta, Usage

Emit = Callable[[str], Awaitable[None]]
#: Send a piece of the answer if that needs no waiting: True if it was taken (or swallowed),
#: False if nothing happened and ``Emit`` must be awaited.
EmitNowait = Callable[[str], bool]
#: Send tool-call fragments towards the caller (may wait, like ``Emit``).
EmitTools = Callable[[tuple[ToolCallDelta, ...]], Awaitable[None]]


def _never_now(text: str) -> bool:
    return False


@attrs.define(eq=False)
class Job:
    """One attempt, from the supervisor to an actor, and its result.

    ``emit`` sends a piece of the answer towards the caller (it may wait: backpressure).
    ``run_job`` fills in the result; ``cancel`` stops the attempt (the caller went away).
    """

    call: ClientCall
    emit: Emit
    emit_nowait: EmitNowait = _never_now
    #: where tool-call fragments go (``None``: a caller that takes none; they are dropped).
    emit_tools: EmitTools | None = None
    request_id: int = 0
    outcome: Outcome | None = None
    completion: Completion | None = None
    failure: Failure | None = None
    probe: bool = False
    #: routed here whatever the actor's health (a terminus, or every actor benched): run it even
    #: if the actor is benched when the job starts.
    forced: bool = False
    started_at: float | None = None
    first_delta_at: float | None = None
    ended_at: float | None = None
    deltas: int = 0
    #: the usage the provider reported before the attempt failed or was cancelled (a
    #: completion's own usage is ``completion.usage``).
    usage: Usage | None = None
    #: the provider started answering (its response headers arrived, or a delta).
    progressed: bool = False
    cancel_requested: bool = False
    #: why the actor stopped the attempt (it crashed, or was stopped), if it did.
    interrupted: str | None = None
    _scope: trio.CancelScope | None = None
    #: set when a queued job is given a slot, or ended while it waited.
    _wake: trio.Event | None = None
    _granted: bool = False

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def cancel(self) -> None:
        """Stop the attempt at once (the caller went away)."""
        self.cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()

    def interrupt(self, reason: str) -> None:
        """Stop the attempt at once: its actor crashed or stopped."""
        if self.interrupted is None:
            self.interrupted = reason
        if self._scope is not None:
            self._scope.cancel()

    def finish(
        self,
        outcome: Outcome,
        *,
        completion: Completion | None = None,
        failure: Failure | None = None,
    ) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.completion = completion
        self.failure = failure
        self.ended_at = trio.current_time()
        if self._wake is not None:
            self._wake.set()

    def record(
        self, actor: str, number: int, started: float, outcome: Outcome, *, continuation: bool
    ) -> Attempt:
        """The attempt's record: ``number`` counts the tries on ``actor`` in the request;
        ``started`` stands in for a start the job never reached (it waited, then ended)."""
        return Attempt(
            actor=actor,
            number=number,
            outcome=outcome,
            failure=self.failure,
            started_at=self.started_at if self.started_at is not None else started,
            ended_at=self.ended_at if self.ended_at is not None else trio.current_time(),
            first_delta_at=self.first_delta_at,
            deltas=self.deltas,
            probe=self.probe,
            continuation=continuation,
            usage=self.completion.usage if self.completion is not None else self.usage,
        )

    def finish_interrupted(self, actor: str, reason: str) -> None:
        """End a job that the actor could not finish itself (it crashed or was stopped)."""
        if self.cancel_requested:
            self.finish(Outcome.CANCELLED)
        else:
            self.finish(Outcome.FAILED, failure=refusal(actor, Category.UNKNOWN, reason))


def refusal(actor: str, category: Category, code: str, message: str | None = None) -> Failure:
    return Failure(
        category=category,
        code=code,
        message=message or f"actor {actor}: {code.replace('_', ' ')}",
        provider=actor,
    )


class JobSink:
    """The client's sink for one job: forwards deltas and moves the attempt's deadline.

    One cancel scope holds every time budget of an attempt: its deadline is the earlier of the
    attempt's end and the first-token (then idle) deadline. The idle deadline is never early
    (at least ``idle`` after the last delta) and at most ``slack`` late: moving a deadline costs
    a heap operation in trio's run loop, so a delta moves it only when it must, not every time.
    """

    __slots__ = ("_job", "_scope", "_idle", "_end", "_slack", "_deadline", "_now")

    def __init__(self, job: Job, scope: trio.CancelScope, idle: float, end: float):
        self._now = trio.lowlevel.current_clock().current_time
        self._job = job
        self._scope = scope
        self._idle = idle
        self._end = end
        self._slack = idle / 16
        self._deadline = scope.deadline

    async def delta(self, text: str) -> None:
        if not text:
            return
        job = self._job
        exact = False
        try:
            # The fast path: the caller can take it now. The provider's read is the checkpoint.
            if not job.emit_nowait(text):
                # Waiting on a slow caller is not the provider's fault: no idle deadline meanwhile.
                self._scope.deadline = self._end
                exact = True
                await job.emit(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The caller is gone. Cancel rather than raise, so that the client's error mapping
            # never mistakes this for a provider failure.
            job.cancel()
            await trio.lowlevel.checkpoint()
        now = self._now()
        if job.deltas == 0:
            job.first_delta_at = now
            exact = True
        job.deltas += 1
        due = now + self._idle
        if exact:
            self._deadline = self._scope.deadline = min(self._end, due)
        elif due > self._deadline:
            self._deadline = self._scope.deadline = min(self._end, due + self._slack)

    async def tool_calls(self, fragments: Sequence[ToolCallDelta]) -> None:
        # Output like a delta: the first one ends the first-token budget. Rare, so no fast path.
        job = self._job
        if not fragments or job.emit_tools is None:
            return
        self._scope.deadline = self._end
        try:
            await job.emit_tools(tuple(fragments))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            job.cancel()
            await trio.lowlevel.checkpoint()
        now = self._now()
        if job.deltas == 0:
            job.first_delta_at = now
        job.deltas += 1
        self._deadline = self._scope.deadline = min(self._end, now + self._idle)

    def usage(self, usage: Usage) -> None:
        """What the provider reported before the attempt failed or was cancelled."""
        self._job.usage = usage

    def progress(self) -> None:
        self._job.progressed = True
        self._deadline = self._scope.deadline = min(self._end, self._now() + self._idle)
