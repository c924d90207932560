"""The peer: LiteLLM's ``Router`` on asyncio, driven exactly as the trio side drives relayrace.

Same two deployments (``p0`` then ``p1``, both the mock), same request, same count, same
concurrency, same warm-up. ``litellm`` is imported here only (the ``compare`` extra).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ._common import API_KEY, MESSAGES, summarise_ms
from ._trio_load import models_for

OneRequest = Callable[[], Awaitable[float | None]]


def import_litellm() -> Any:
    """Import LiteLLM without its network calls (the model cost map is read locally)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    litellm: Any = importlib.import_module("litellm")
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def make_router(litellm: Any, url: str, models: list[str], *, failover: bool) -> Any:
    """``p0`` falls back to ``p1``; no retries. ``failover``: no cooldowns either, so that the
    failing primary is tried on every request (as relayrace is configured for that run)."""
    model_list = [
        {
            "model_name": f"p{i}",
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": f"{url}/v1",
                "api_key": API_KEY,
            },
        }
        for i, model in enumerate(models)
    ]
    return litellm.Router(
        model_list=model_list,
        fallbacks=[{"p0": ["p1"]}],
        num_retries=0,
        disable_cooldowns=failover,
    )


def litellm_request(router: Any, stream: bool) -> OneRequest:
    async def one() -> float | None:
        if not stream:
            response = await router.acompletion(model="p0", messages=MESSAGES)
            if not response.choices[0].message.content:
                raise RuntimeError("empty answer")
            return None
        first: float | None = None
        parts: list[str] = []
        response = await router.acompletion(
            model="p0", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in response:
            if chunk.choices:
                text = chunk.choices[0].delta.content
                if text:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(text)
        if not parts:
            raise RuntimeError("empty answer")
        return first

    return one


async def drive(one: OneRequest, requests: int, concurrency: int) -> dict[str, Any]:
    """The asyncio twin of ``_trio_load.drive``."""
    latencies: list[float] = []
    first_deltas: list[float] = []
    errors: dict[str, int] = {}
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            started = time.perf_counter()
            try:
                first = await one()
            except Exception as exc:  # counted, as on the trio side
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            if first is not None:
                first_deltas.append(first - started)

    gc.collect()
    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": len(latencies),
        "failed": requests - len(latencies),
        "errors": errors,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_us_per_request": cpu / requests * 1e6,
        "wall_us_per_request": wall / requests * 1e6,
        "throughput_rps": requests / wall if wall > 0 else None,
        "latency_ms": summarise_ms(latencies),
        "first_delta_ms": summarise_ms(first_deltas),
    }


async def upstream_count(url: str, model: str) -> int | None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        response = await client.post(
            f"{url}/v1/chat/completions", json={"model": model, "messages": MESSAGES}
        )
        value = response.headers.get("x-mock-attempt")
    return int(value) - 1 if value else None


async def load_job(url: str, job: dict[str, Any], litellm: Any) -> dict[str, Any]:
    mode = job["mode"]
    requests, concurrency, chunks = job["requests"], job["concurrency"], job["chunks"]
    primary, secondary = models_for(mode, chunks, job["tag"])
    warmup = job.get("warmup", min(50, max(5, requests // 5)))
    router = make_router(litellm, url, [primary, secondary], failover=mode == "failover")
    one = litellm_request(router, mode == "stream")
    await drive(one, warmup, concurrency)
    result = await drive(one, requests, concurrency)
    # LiteLLM may finish logging callbacks after the answer; let them run outside the window.
    await asyncio.sleep(0.2)
    result["upstream"] = {
        "primary": await upstream_count(url, primary),
        "secondary": await upstream_count(url, secondary),
        "warmup": warmup,
    }
    return result


def run_job(url: str, job: dict[str, Any], litellm: Any) -> dict[str, Any]:
    """Run one job in a fresh asyncio loop."""
    if job["kind"] != "load":
        raise ValueError(f"LiteLLM runs only load jobs, not {job['kind']!r}")
    return asyncio.run(load_job(url, job, litellm))
