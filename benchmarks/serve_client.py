"""bench_serve's client: streamed chat requests sent all at once, from one process or several, timed on one clock.

One Python process with one event loop tops out at a few hundred streamed requests a second (the
H200 host's floor at f4f89f5: 240 requests/s, first event p50 0.88 s for 256 requests), which is
then part of every server's figures. With procs > 1 the requests are dealt out to that many
processes; each opens its own client, all wait at one barrier, and every time is read from
time.monotonic(), which Linux keeps system-wide, so the processes' times share the parent's t0.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time

try:
    import httpx
except ImportError:  # the GPU machine's vLLM bundle carries it as httpx2
    import httpx2 as httpx

CHAT_PATH = "/v1/chat/completions"
HEADERS = {"content-type": "application/json"}


def body_of(request: dict) -> bytes:
    """A request's JSON body, serialized before the clock starts."""
    return json.dumps(request).encode()


async def one(client: httpx.AsyncClient, body: bytes) -> tuple[float, float]:
    """(first streamed token, last byte) of one request on time.monotonic(); reads the whole stream."""
    first = None
    async with client.stream("POST", CHAT_PATH, content=body, headers=HEADERS) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if "content" in (choices[0].get("delta") or {}):
                    first = time.monotonic()
    end = time.monotonic()
    return (end if first is None else first), end


async def _send(url: str, bodies: list[bytes], barrier=None) -> list[tuple[float, float]]:
    limits = httpx.Limits(max_connections=len(bodies) + 1, max_keepalive_connections=len(bodies) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        if barrier is not None:
            barrier.wait()  # every sender is ready: the clock starts
        return list(await asyncio.gather(*(one(client, body) for body in bodies)))


def _sender(url: str, bodies: list[bytes], barrier, results) -> None:
    try:
        results.put(("ok", asyncio.run(_send(url, bodies, barrier))))
    except BaseException as exc:  # the parent raises it; a silent child would hang the run
        barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def fire(url: str, bodies: list[bytes], procs: int = 1) -> tuple[list[float], float]:
    """Send all bodies at once; (each request's time to first token, the wall time to the last byte)."""
    procs = max(1, min(procs, len(bodies)))
    if procs == 1:
        t0 = time.monotonic()
        times = asyncio.run(_send(url, bodies))
    else:
        ctx = mp.get_context("spawn")  # no inherited event loop or client state
        barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
        senders = [ctx.Process(target=_sender, args=(url, bodies[i::procs], barrier, results), daemon=True)
                   for i in range(procs)]
        for sender in senders:
            sender.start()
        try:
            barrier.wait(timeout=300)
        except Exception:
            pass  # a sender failed before the start: its error is in results
        t0 = time.monotonic()
        times = []
        for _ in senders:
            status, value = results.get(timeout=3600)
            if status != "ok":
                raise RuntimeError(f"a client process failed: {value}")
            times.extend(value)
        for sender in senders:
            sender.join(60)
    return [first - t0 for first, _ in times], max(end for _, end in times) - t0
