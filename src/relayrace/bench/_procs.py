"""The processes of a bench run: the mock provider and the workers, each its own interpreter."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from ._common import MARK, BenchError
from ._progress import Progress

_MOCK_CODE = (
    "import sys\n"
    "from relayrace.bench._common import raise_fd_limit\n"
    "raise_fd_limit()\n"
    "from relayrace.testing._mock_provider import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
_WORKER_CODE = "from relayrace.bench._worker import main; main()"


@contextlib.contextmanager
def mock_process(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """Run the mock provider as its own process on a free port; yield ``(url, pid)``."""
    with tempfile.TemporaryFile(mode="w+") as errors:
        server = subprocess.Popen(
            [sys.executable, "-c", _MOCK_CODE, "--host", host, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            if not url.startswith("http"):
                server.wait(timeout=10)
                errors.seek(0)
                raise BenchError(f"the mock provider did not start: {errors.read()[-2000:]}")
            yield url, server.pid
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if server.stdout is not None:
                server.stdout.close()


def run_worker(
    url: str,
    runtime: str,
    jobs: list[dict[str, Any]],
    on_result: Callable[[int, dict[str, Any]], None],
) -> list[dict[str, Any] | None]:
    """Run ``jobs`` in one worker process (``runtime``: ``trio`` or ``litellm``).

    ``on_result(index, message)`` is called as each job ends (for the progress bar).

    Returns:
        one entry per job: its result, or ``{"error": ...}``; ``None`` for jobs the worker never
        reached (it died: the error is in the last entry that has one).
    """
    spec = json.dumps({"url": url, "runtime": runtime, "jobs": jobs})
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    with tempfile.TemporaryFile(mode="w+") as errors:
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(spec)
            worker.stdin.close()
            for line in worker.stdout:
                if not line.startswith(MARK):
                    continue  # a peer's own chatter
                message = json.loads(line[len(MARK) :])
                if "job" not in message:
                    continue
                index = message["job"]
                results[index] = (
                    message["result"]
                    if "result" in message
                    else {"error": message["error"], "traceback": message.get("traceback")}
                )
                on_result(index, message)
            code = worker.wait()
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()
        if code != 0 or any(r is None for r in results):
            errors.seek(0)
            tail = errors.read()[-3000:]
            for i, r in enumerate(results):
                if r is None:
                    results[i] = {"error": f"the worker exited with {code}", "stderr": tail}
                    on_result(i, {"job": i, "error": "worker died"})
    return results


class Runner:
    """Runs a workload's jobs in worker processes against the mock at ``url``, advancing the
    progress bar and recording the jobs that failed in ``errors``. Each workload (``_main``,
    ``_gateway``) builds its jobs and summaries on top of it."""

    def __init__(
        self, url: str, params: dict[str, Any], progress: Progress, errors: list[dict[str, Any]]
    ):
        self.url = url
        self.params = params
        self.progress = progress
        self.errors = errors
        self._tag = 0

    def tag(self, prefix: str) -> str:
        self._tag += 1
        return f"{prefix}{self._tag}"

    def run(
        self,
        runtime: str,
        jobs: list[dict[str, Any]],
        weights: list[float],
        labels: list[str],
    ) -> list[dict[str, Any] | None]:
        self.progress.start(labels[0])

        def on_result(index: int, message: dict[str, Any]) -> None:
            following = labels[index + 1] if index + 1 < len(labels) else labels[index]
            self.progress.advance(weights[index], following)

        results = run_worker(self.url, runtime, jobs, on_result)
        for job, result in zip(jobs, results, strict=True):
            if result is None or "error" in result:
                self.errors.append({"job": job, "error": result})
        return results
