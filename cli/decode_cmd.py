"""`splitvlm decode`: greedy generation from stored embeddings."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

import click

from splitvlm.cli.options import (
    check_writable,
    default,
    engine_options,
    make_config,
    missing_encoder,
)
from splitvlm.core.errors import SplitVLMError


def end_to_end_runner(decoder):
    """The verifier's end-to-end path and embedding check in the decoder's engine, as spot_check takes them."""
    from splitvlm.store import EmbeddingStore
    from splitvlm.verify.verifier import Report, Verifier

    verifiers: list[Verifier] = []  # made once, on the first call (it reads the model's fingerprint)

    def run(jobs, keys):
        if not verifiers:
            verifiers.append(Verifier(decoder.cfg, engine=decoder.engine, encode_missing=decoder.encode_missing))
        verifier, report = verifiers[0], Report()
        with EmbeddingStore(decoder.cfg.store, readonly=True) as store:
            results = verifier.end_to_end(jobs, keys, [None] * len(jobs), store)
            ran = [n for n, r in enumerate(results) if r.error is None]
            verifier.check_embeddings([jobs[n] for n in ran], [keys[n] for n in ran], store, report)
        return results, {m["key"]: m["error"] for m in report.embedding_mismatches}

    return run


def finished_lines(path: str) -> tuple[set[str], int]:
    """Ids and failures of the complete result lines of an earlier --out; a torn last line is cut off the file."""
    if not os.path.exists(path):
        return set(), 0
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # after it: the line a killed run was writing
    ids, failed = set(), 0
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            result = json.loads(line)
            if "custom_id" in result:  # --output-format openai
                ids.add(result["custom_id"])
            else:
                ids.add(result["id"])
                if "text" not in result:  # a job line, say: not a result
                    raise KeyError("text")
        except (ValueError, TypeError, KeyError):
            raise click.ClickException(f"{path}:{n}: not a decode result line; cannot --resume into it") from None
        failed += result.get("error") is not None
    if end < len(data):
        os.truncate(path, end)
    return ids, failed



class ImageLimit(click.ParamType):
    """A positive number of images, or vLLM's --limit-mm-per-prompt JSON with an "image" entry."""

    name = "N"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.startswith("{"):
            try:
                limits = json.loads(text)
            except ValueError:
                self.fail(f"{text!r} is not JSON", param, ctx)
            if not isinstance(limits, dict) or set(limits) - {"image", "video"} or not isinstance(limits.get("image"), int):
                self.fail(f'{text!r}: give {{"image": N}} (splitvlm decodes images only)', param, ctx)
            text = str(limits["image"])
        try:
            number = int(text)
        except ValueError:
            self.fail(f"{value!r} is not a number of images", param, ctx)
        if number < 1:
            self.fail(f"{number} is not in the range x>=1", param, ctx)
        return number

@click.command("decode")
@engine_options
@click.option("--jobs", "jobs_path", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"id", "images": [path, URL, CONTAINER::MEMBER or key], "prompt"} or {"id", "messages": [...]} per line, with '
                   'optional "max_tokens" and "stop"; or OpenAI batch request lines (custom_id, body.messages).')
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSONL results, one line per job, in job order, appended batch by batch ('-': standard output). "
                   "Checked before any work.")
@click.option("--resume", is_flag=True,
              help="Keep the complete lines already in --out, skip their job ids and append the other jobs.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=default("max_tokens"), show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--limit-images", "--limit-mm-per-prompt", "limit_images", type=ImageLimit(), default=default("max_images_per_prompt"),
              show_default=True, help="Most images in one job: a number, or vLLM's spelling '{\"image\": N}'.")
@click.option("--on-missing", type=click.Choice(["error", "encode", "skip"]), default=default("on_missing"), show_default=True,
              help="Images not in the store: stop before generating, encode them first, or skip those jobs.")
@click.option("--batch-jobs", type=click.IntRange(min=1), default=default("batch_jobs"), show_default=True,
              help="Jobs handed to vLLM at once; their lines are written when the batch is done.")
@click.option("--cache", is_flag=True,
              help="Answer jobs decoded before (same embeddings, prompt, settings and versions) from the store's "
                   "result cache, and cache new results; exact profile only.")
@click.option("--spot-check", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of the jobs to also run end to end (raw images) and compare byte for byte, batch by batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which jobs the spot check picks.")
@click.option("--stats-json", type=click.Path(dir_okay=False),
              help="Write the run's figures (and the engine's settings as vLLM reported them) as JSON.")
@click.option("--vllm-arg", "vllm_args", multiple=True, metavar="NAME=VALUE",
              help="Another vLLM engine argument, by vLLM's name (repeatable; VALUE is JSON where it parses), e.g. "
                   "max_num_batched_tokens=8192. Checked before the engine starts; what the exact profile pins is refused.")
@click.option("--output-format", type=click.Choice(["splitvlm", "openai"]), default="splitvlm", show_default=True,
              help="Lines of --out: splitvlm's result fields (docs/jobs.md), or the OpenAI batch output format "
                   "(custom_id, response.body as a chat.completion; splitvlm's fields under body.splitvlm).")
@click.option("--engine-process", type=click.Choice(["auto", "inprocess", "separate"]), default=default("engine_process"),
              show_default=True,
              help="Where vLLM's engine core runs: in its own process as vLLM's default does (separate), or in this one. "
                   "auto: separate on a GPU. A spot check or --on-missing encode reaches into the model and keeps it here.")
def command(jobs_path, out, resume, max_tokens, stop, limit_images, on_missing, batch_jobs, cache, spot_check, seed,
            stats_json, vllm_args, output_format, engine_process, **kw) -> None:
    """Decode jobs from stored embeddings with greedy sampling in vLLM.

    Every output line holds every field (docs/jobs.md, "Output"): id, text, token_ids,
    finish_reason, sha256 of the text, prompt_tokens, keys, error, cached, spot_checked,
    spot_check_identical, spot_check_error; null where one does not apply. Lines are appended
    and flushed as each batch finishes, so a killed run loses at most the batch in flight, and
    --resume carries on where it stopped. A spot check runs on each batch before its lines are
    written. Exit status 0 when every job is decoded, 3 when some failed, 4 when a spot check
    found a mismatch.
    """
    from splitvlm.decoder import Decoder, read_jobs
    from splitvlm.decoder.spot_check import SpotCheckReport
    from splitvlm.decoder.spot_check import spot_check as run_spot_check

    cfg = make_config(**kw)
    cfg = cfg.replace(max_tokens=max_tokens, stop=list(stop), max_images_per_prompt=limit_images,
                      on_missing=on_missing, batch_jobs=batch_jobs, cache=cache, engine_process=engine_process,
                      show_progress=cfg.show_progress and sys.stderr.isatty())  # no bars in logs
    if vllm_args:
        from splitvlm.core.engine import on_gpu
        from splitvlm.core.vllm_args import parse_vllm_args

        try:
            cfg = cfg.replace(vllm_args=parse_vllm_args(vllm_args, cfg.profile, on_gpu()))
        except SplitVLMError as exc:
            raise click.BadParameter(str(exc), param_hint="--vllm-arg") from None
    if resume and out == "-":
        raise click.BadParameter("--resume needs a file, not standard output", param_hint="--out")
    check_writable(out, "--out")
    if stats_json:
        check_writable(stats_json, "--stats-json")
    decoder = Decoder(cfg, encode_missing=missing_encoder(cfg, lambda: decoder.engine),
                      model_access=True if spot_check > 0 else None)  # None: as on_missing needs
    jobs = read_jobs(jobs_path)
    done, failed_before = finished_lines(out) if resume else (set(), 0)
    todo = [job for job in jobs if job.id not in done]
    if resume:
        click.echo(f"resuming: {len(jobs) - len(todo)} jobs already in {out} ({failed_before} failed), "
                   f"{len(todo)} to decode", err=True)
    report = SpotCheckReport(spot_check, seed) if spot_check > 0 else None
    runner = end_to_end_runner(decoder) if report is not None else None
    f: TextIO | None = sys.stdout if out == "-" else None
    mode = "a" if resume else "w"
    try:
        position = 0
        for results in decoder.generate_iter(todo) if todo else ():
            if report is not None:
                part = run_spot_check(todo[position:position + len(results)], results, spot_check, seed, runner)
                report.checked += part.checked
                report.mismatches.update(part.mismatches)
                report.errors.update(part.errors)
                for r in results:
                    if r.error is None and r.spot_checked is None:
                        r.spot_checked = False
            position += len(results)
            if f is None:  # opened at the first batch: a run refused before any result leaves --out as it was
                f = open(out, mode, encoding="utf-8")
            lines = (r.to_openai(cfg.model) if output_format == "openai" else r.to_json() for r in results)
            f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            f.flush()
        if f is None:
            f = open(out, mode, encoding="utf-8")
    finally:
        if f is not None and f is not sys.stdout:
            f.close()
    click.echo(decoder.stats.summary(), err=out == "-")
    if report is not None:
        click.echo(report.summary(), err=out == "-")
    if out != "-":
        click.echo(f"wrote {out}")
    if stats_json:
        figures = {**decoder.stats.to_dict(), "engine": decoder.engine_settings()}
        if resume:
            figures["resumed"] = {"jobs": len(jobs) - len(todo), "failed": failed_before}
        if report is not None:
            figures["spot_check"] = report.to_json()
        with open(stats_json, "w", encoding="utf-8") as fj:
            json.dump(figures, fj, indent=2)
    if report is not None and report.mismatches:
        sys.exit(4)  # a mismatch found
    if decoder.stats.failed or failed_before or (report is not None and report.errors):
        sys.exit(3)  # some jobs failed, the rest done
