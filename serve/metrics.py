"""splitvlm's counters on vLLM's /metrics, summed over the server's processes at each scrape.

The middleware appends them to vLLM's own /metrics text, in Prometheus' text format. That works
alike with one API server (vLLM's default registry) and with `--api-server-count N` (vLLM's
multiprocess registry, which a collector registered in this process would never reach).
"""

from __future__ import annotations


def counters_text(run_dir: str) -> str:
    """The counters of every process of one server, as Prometheus text lines."""
    from splitvlm.serve.settings import COUNTERS, read_counts

    totals = read_counts(run_dir)
    lines = []
    for name, help_text in COUNTERS.items():
        lines += [f"# HELP splitvlm_{name}_total {help_text}", f"# TYPE splitvlm_{name}_total counter",
                  f"splitvlm_{name}_total {float(totals[name])}"]
    return "\n".join(lines) + "\n"


async def with_counters(app, scope, receive, send, run_dir: str) -> None:
    """Run vLLM's /metrics with the request uncompressed, and append splitvlm's counters to its text."""
    scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"])
    start: dict | None = None
    chunks: list[bytes] = []

    async def capture(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        if start["status"] == 200:
            body += counters_text(run_dir).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    await app(scope, receive, capture)
