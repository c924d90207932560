"""A bench worker process: reads ``{"url", "runtime", "jobs"}`` as JSON on stdin, runs the jobs
one after another (each in a fresh event loop), and writes one result line per job on stdout.

Each peer runs in its own worker process, so that its CPU time (``time.process_time``) is its
own and the event loops (trio, asyncio) never share a process.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from ._common import MARK


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from ._common import raise_fd_limit

    raise_fd_limit()
    url, runtime, jobs = spec["url"], spec["runtime"], spec["jobs"]
    litellm: Any = None
    if runtime == "litellm":
        from ._litellm_load import import_litellm

        litellm = import_litellm()
    emit({"ready": True})
    for index, job in enumerate(jobs):
        try:
            if runtime == "litellm":
                from ._litellm_load import run_job as run_asyncio

                result = run_asyncio(url, job, litellm)
            elif job["kind"] == "gateway":
                from ._gateway import run_job as run_gateway

                result = run_gateway(url, job)
            else:
                from ._trio_load import run_job as run_trio

                result = run_trio(url, job)
        except Exception as exc:
            emit(
                {
                    "job": index,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=8),
                }
            )
            continue
        emit({"job": index, "result": result})


if __name__ == "__main__":
    main()
