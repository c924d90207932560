"""An actor's inbox: the jobs waiting for a slot, by priority (higher first), first in first
out within a priority.

A request's priority is ``Request.metadata["priority"]`` (an int; anything else is 0). Most
requests carry none, so the common case is one FIFO queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from ._job import Job


def job_priority(job: Job) -> int:
    """The priority of ``job``'s request (0 when it has none, or not an int)."""
    value = job.call.request.metadata.get("priority", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Inbox:
    """Jobs waiting for a slot: ``append``, ``popleft`` (the first of the highest priority),
    ``remove``; its length is the number waiting."""

    __slots__ = ("_queues", "_size")

    def __init__(self) -> None:
        #: priority → its jobs in arrival order; kept sorted, highest priority first
        self._queues: dict[int, deque[Job]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __contains__(self, job: object) -> bool:
        return any(job in queue for queue in self._queues.values())

    def __iter__(self) -> Iterator[Job]:
        for queue in self._queues.values():
            yield from queue

    def append(self, job: Job) -> None:
        priority = job_priority(job)
        queue = self._queues.get(priority)
        if queue is None:
            queue = deque()
            self._queues[priority] = queue
            if len(self._queues) > 1:
                self._queues = dict(sorted(self._queues.items(), key=lambda kv: -kv[0]))
        queue.append(job)
        self._size += 1

    def popleft(self) -> Job:
        for priority, queue in self._queues.items():
            if queue:
                self._size -= 1
                job = queue.popleft()
                if not queue:
                    del self._queues[priority]
                return job
        raise IndexError("pop from an empty inbox")

    def remove(self, job: Job) -> None:
        for priority, queue in self._queues.items():
            if job in queue:
                queue.remove(job)
                self._size -= 1
                if not queue:
                    del self._queues[priority]
                return
        raise ValueError("the job is not in the inbox")
