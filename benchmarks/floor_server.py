"""A loopback chat server that answers every request at once: what bench_serve's client costs by itself.

    python -m uvicorn benchmarks.floor_server:app --port PORT

It reads each chat request's body, parses it, and streams back max_tokens content events the way
vLLM's server does (a role event first, [DONE] last), with no model behind it. bench_serve sends it
the same requests as the real servers, so its figures are the floor that the client, the loopback
and the HTTP stack put under any server's requests/s and time to first token on that machine.
"""

from __future__ import annotations

import json

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def event(delta: dict, n: int) -> bytes:
    chunk = {"id": "chatcmpl-floor", "object": "chat.completion.chunk", "model": "floor",
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], "n": n}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    if scope["method"] != "POST":  # /health, /metrics: empty answers
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b""})
        return
    tokens = int(json.loads(body).get("max_tokens") or 1)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": event({"role": "assistant", "content": ""}, 0), "more_body": True})
    for n in range(tokens):
        await send({"type": "http.response.body", "body": event({"content": " x"}, n + 1), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
