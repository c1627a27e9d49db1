"""Verifier: run end-to-end (raw images) and split (stored embeddings) on the same jobs, compare bytes."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from splitvlm.core.batching import chunks
from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.sources import load_image, read_bytes
from splitvlm.decoder import (
    Decoder,
    Encoded,
    Job,
    Result,
    build_prompt,
    first_difference,
    names_a_key,
    result_from_output,
    vllm_prompt,
)
from splitvlm.store import EmbeddingStore


@dataclass
class JobComparison:
    id: str
    identical: bool
    first_diff: int | None  # first differing token index, None when identical
    sha256_split: str
    sha256_e2e: str
    tokens_sha256: str = ""  # of the split path's token ids, so outputs can be told apart without text
    text_split: str | None = None
    text_e2e: str | None = None
    error: str | None = None


@dataclass
class Report:
    total: int = 0
    identical: int = 0
    profile: str = ""
    environment: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # the engine's settings as vLLM reported them
    embeddings_checked: int = 0
    embeddings_identical: int = 0
    embedding_mismatches: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # split, end_to_end, embedding_check
    jobs: list[JobComparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.total > 0 and self.identical == self.total
                and self.embeddings_identical == self.embeddings_checked)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def write(self, path: str) -> None:
        """The report as JSON, to path."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")

    def table(self) -> str:
        lines = [f"{'job':<24} {'identical':<9} {'first diff':<10} sha256 (split)"]
        for j in self.jobs:
            diff = "-" if j.first_diff is None else str(j.first_diff)
            mark = "yes" if j.identical else ("ERROR" if j.error else "NO")
            lines.append(f"{j.id[:24]:<24} {mark:<9} {diff:<10} {j.sha256_split[:16]}")
            if j.error:
                lines.append(f"    {j.error}")
        for m in self.embedding_mismatches:
            lines.append(f"embedding {m['key'][:16]}… ({m['source']}, jobs {', '.join(m['jobs'])}): {m['error']}")
        lines.append(f"embeddings identical {self.embeddings_identical}/{self.embeddings_checked}")
        lines.append(f"identical {self.identical}/{self.total}")
        return "\n".join(lines)


def compare(split: Result, e2e: Result) -> JobComparison:
    error = split.error or e2e.error
    diff = None if error else first_difference(split.token_ids, e2e.token_ids)
    identical = error is None and diff is None and split.text.encode() == e2e.text.encode()
    return JobComparison(
        id=split.id, identical=identical, first_diff=diff,
        sha256_split=split.sha256, sha256_e2e=e2e.sha256,
        tokens_sha256=hashlib.sha256(json.dumps(split.token_ids).encode()).hexdigest(),
        text_split=None if identical else split.text, text_e2e=None if identical else e2e.text,
        error=error,
    )


class Verifier:
    """Both paths in one engine with the same settings and the same batches."""

    def __init__(self, cfg: Config, engine=None, encode_missing: Callable[[list[str]], Encoded] | None = None):
        """encode_missing: as Decoder takes it, for on_missing="encode"."""
        self.cfg = cfg
        # the embedding check runs the tower in this engine: its model must be here, whatever --on-missing
        # says (on the GPU at 15e1d86 and 8630383, `verify --on-missing error` put the engine core in its
        # own process and every embedding came back as an error: 0/256)
        self.decoder = Decoder(cfg, engine=engine, encode_missing=encode_missing, model_access=True)

    @property
    def engine(self):
        return self.decoder.engine

    def _source(self, ref: str, key: str, store: EmbeddingStore, entry=None) -> str:
        """The image behind a job's image: its reference (path, URL, container member), or a stored
        entry's recorded source when that still gives the same key."""
        if not names_a_key(ref):
            return ref
        source = (entry or store.get(key)).meta.get("source", "")
        try:
            if source and self.decoder.keys(read_bytes(source)) == key:
                return source
        except SplitVLMError:
            pass
        raise SplitVLMError(f"{key}: no source image to run end to end (its recorded source is {source!r})")

    def end_to_end(self, jobs: list[Job], keys: list[list[str]], errors: list[str | None],
                   store: EmbeddingStore) -> list[Result]:
        tokenizer = self.engine.tokenizer()
        results: list[Result] = []
        bar = tqdm(total=len(jobs), unit="job", desc="end-to-end", disable=None if self.cfg.show_progress else True, file=sys.stderr)
        for chunk in chunks(len(jobs), self.cfg.batch_jobs):
            prompts, slots = [], []
            for i in chunk:
                if errors[i] is not None:
                    continue
                try:
                    images = [load_image(self._source(r, k, store), self.cfg.image_loader)[1] for r, k in zip(jobs[i].images, keys[i])]
                except SplitVLMError as exc:
                    errors[i] = f"job {jobs[i].id}: {exc}"
                    continue
                prompts.append(vllm_prompt(build_prompt(tokenizer, jobs[i]), images))
                slots.append(i)
            params = [self.engine.sampling_params(*jobs[i].sampling(self.cfg.max_tokens, self.cfg.stop))
                      for i in slots]  # as the decoder's, job by job
            outputs = dict(zip(slots, self.engine.generate(prompts, params))) if prompts else {}
            for i in chunk:
                if i in outputs:
                    results.append(result_from_output(jobs[i], outputs[i], keys[i]))
                else:
                    results.append(Result(id=jobs[i].id, keys=keys[i], error=errors[i]))
            bar.update(len(chunk))
        bar.close()
        return results

    def check_embeddings(self, jobs: list[Job], keys: list[list[str]], store: EmbeddingStore, report: Report) -> None:
        """Recompute every stored embedding used in the engine's vision tower and compare bit for bit."""
        seen: dict[str, str] = {}
        users: dict[str, list[str]] = {}
        for job, job_keys in zip(jobs, keys):
            for ref, key in zip(job.images, job_keys):
                seen.setdefault(key, ref)
                users.setdefault(key, []).append(job.id)
        for key, ref in tqdm(seen.items(), unit="img", desc="embeddings", disable=None if self.cfg.show_progress else True, file=sys.stderr):
            report.embeddings_checked += 1
            try:
                stored = store.get(key)
                source = self._source(ref, key, store, stored)
                pixel_values, grid = self.engine.preprocess(load_image(source, self.cfg.image_loader)[1])
                (fresh,) = self.engine.run_tower(pixel_values, grid)  # as the encoder's batch of one
            except SplitVLMError as exc:
                report.embedding_mismatches.append({"key": key, "source": ref, "jobs": users[key], "error": str(exc)})
                continue
            if stored.image_embeds.dtype == fresh.dtype and torch.equal(stored.image_embeds, fresh):
                report.embeddings_identical += 1
            else:
                diff = (stored.image_embeds.float() - fresh.float()).abs()
                report.embedding_mismatches.append({
                    "key": key, "source": ref, "jobs": users[key],
                    "error": f"stored embedding differs from a fresh encode in {int((diff > 0).sum())} "
                             f"elements (max abs diff {diff.max().item():.3g})"})

    def run(self, jobs: list[Job]) -> Report:
        report = Report(profile=self.cfg.profile, environment=self.engine.environment(),
                        engine=self.engine.reported())
        t0 = time.perf_counter()
        split = self.decoder.generate(jobs)
        t1 = time.perf_counter()
        with EmbeddingStore(self.cfg.store, readonly=True) as store:
            keys = [r.keys for r in split]
            errors = [r.error for r in split]
            e2e = self.end_to_end(jobs, keys, errors, store)
            t2 = time.perf_counter()
            self.check_embeddings([j for j, e in zip(jobs, errors) if e is None],
                                  [k for k, e in zip(keys, errors) if e is None], store, report)
        report.seconds = {"split": t1 - t0, "end_to_end": t2 - t1, "embedding_check": time.perf_counter() - t2}
        report.jobs = [compare(s, e) for s, e in zip(split, e2e)]
        report.total = len(jobs)
        report.identical = sum(j.identical for j in report.jobs)
        return report


def verify(cfg: Config, jobs: list[Job], report_path: str | None = None, engine=None,
           encode_missing: Callable[[list[str]], Encoded] | None = None) -> Report:
    """Prove split == end-to-end for these jobs; writes the JSON report when a path is given."""
    report = Verifier(cfg, engine=engine, encode_missing=encode_missing).run(jobs)
    if report_path:
        report.write(report_path)
    return report
