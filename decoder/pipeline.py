"""Decoder: jobs -> store keys -> checked embeddings -> greedy generation in vLLM -> results in job order."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.images import read_image_bytes
from splitvlm.decoder.jobs import Job, build_prompt, is_key
from splitvlm.encoder.keys import KeyMaker
from splitvlm.store import EmbeddingStore, Entry, Expect, StoreError

MISSING_POLICIES = ("error", "encode", "skip")


@dataclass
class Result:
    id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    sha256: str = ""
    prompt_tokens: int = 0
    keys: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class DecodeStats:
    jobs: int = 0
    failed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.jobs / self.seconds if self.seconds else 0.0
        tps = self.output_tokens / self.seconds if self.seconds else 0.0
        return (f"decoded {self.jobs - self.failed}/{self.jobs} jobs, {self.failed} failed; "
                f"{self.seconds:.1f} s, {rate:.2f} requests/s, {tps:.1f} output tokens/s")


def result_from_output(job: Job, output, keys: list[str]) -> Result:
    completion = output.outputs[0]
    return Result(
        id=job.id,
        text=completion.text,
        token_ids=list(completion.token_ids),
        finish_reason=completion.finish_reason,
        sha256=hashlib.sha256(completion.text.encode("utf-8")).hexdigest(),
        prompt_tokens=len(output.prompt_token_ids or []),
        keys=keys,
    )


def vllm_prompt(text: str, images: dict | list | None) -> dict:
    """A vLLM prompt dict; text-only jobs carry no multi_modal_data."""
    return {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}


def embeds_input(entries: Sequence[Entry]) -> dict | None:
    """The image data of a prompt's stored entries, as vLLM takes embeddings (None without images)."""
    if not entries:
        return None
    return {
        "image_embeds": torch.cat([e.image_embeds for e in entries]),
        "image_grid_thw": torch.cat([e.image_grid_thw.reshape(1, 3) for e in entries]),
    }


class Decoder:
    """Greedy generation in vLLM from stored embeddings; no vision tower in the loop."""

    def __init__(self, cfg: Config, engine=None):
        if not cfg.store:
            raise SplitVLMError("no store given (--store PATH)")
        if cfg.on_missing not in MISSING_POLICIES:
            raise SplitVLMError(f"--on-missing must be one of {', '.join(MISSING_POLICIES)}")
        self.cfg = cfg
        self.keys = KeyMaker(cfg)
        self._engine = engine
        self.stats = DecodeStats()

    @property
    def engine(self):
        if self._engine is None:
            from splitvlm.core.engine import Engine

            self._engine = Engine(self.cfg)
        return self._engine

    def job_keys(self, job: Job) -> tuple[list[str], str | None]:
        keys = []
        for ref in job.images:
            if is_key(ref):
                keys.append(ref)
                continue
            try:
                keys.append(self.keys(read_image_bytes(ref)))
            except SplitVLMError as exc:
                return [], f"job {job.id}: {exc}"
        return keys, None

    def _handle_missing(self, jobs: list[Job], keys: list[list[str]], errors: list[str | None],
                        store: EmbeddingStore) -> None:
        missing = {}
        for job, job_keys, error in zip(jobs, keys, errors):
            if error is None:
                for ref, key in zip(job.images, job_keys):
                    if key not in store:
                        missing.setdefault(key, (job.id, ref))
        if not missing:
            return
        if self.cfg.on_missing == "error":
            listed = "; ".join(f"job {j}: {ref}" for j, ref in missing.values())
            raise SplitVLMError(f"{len(missing)} image(s) not in the store: {listed} "
                                "(encode them first, or use --on-missing encode|skip)")
        if self.cfg.on_missing == "encode":
            unencodable = [ref for _, ref in missing.values() if is_key(ref)]
            if unencodable:
                raise SplitVLMError(f"cannot encode keys that are not in the store: {', '.join(unencodable)}")
            from splitvlm.encoder import Encoder

            stats = Encoder(self.cfg, engine=self.engine).encode([ref for _, ref in missing.values()])
            for failure in stats.failures:
                print(f"could not encode {failure['path']}: {failure['error']}", file=sys.stderr)
        for i, (job, job_keys) in enumerate(zip(jobs, keys)):
            absent = [ref for ref, k in zip(job.images, job_keys) if k not in store]
            if errors[i] is None and absent:
                errors[i] = f"job {job.id}: not in the store: {', '.join(absent)}"

    def _check_environment(self, entries: Sequence[Entry]) -> None:
        if self.cfg.allow_mismatch:
            return
        env = self.engine.environment()
        for entry in entries:
            made = (entry.meta.get("vllm_version"), entry.meta.get("device"))
            if made != (env["vllm"], env["device"]):
                raise SplitVLMError(
                    f"{entry.key}: encoded with vLLM {made[0]} on {made[1]}, decoding with vLLM "
                    f"{env['vllm']} on {env['device']}; outputs would not be exact "
                    "(re-encode, or pass --allow-mismatch)")

    def prepare(self, jobs: list[Job], store: EmbeddingStore) -> tuple[list[list[str]], list[str | None]]:
        resolved = [self.job_keys(job) for job in jobs]
        keys = [k for k, _ in resolved]
        errors = [e for _, e in resolved]
        self._handle_missing(jobs, keys, errors, store)
        return keys, errors

    def generate(self, jobs: list[Job]) -> list[Result]:
        t0 = time.perf_counter()
        results: list[Result] = []
        with EmbeddingStore(self.cfg.store) as store:
            keys, errors = self.prepare(jobs, store)
            expect = Expect(self.engine.hidden_size, self.engine.dtype, self.engine.merge_size)
            tokenizer = self.engine.tokenizer()
            params = self.engine.sampling_params()
            bar = tqdm(total=len(jobs), unit="job", desc="decode", disable=not self.cfg.show_progress, file=sys.stderr)
            for start in range(0, len(jobs), self.cfg.batch_jobs):
                chunk = range(start, min(start + self.cfg.batch_jobs, len(jobs)))
                prompts, slots = [], []
                for i in chunk:
                    if errors[i] is None:
                        try:
                            entries = store.get_many(keys[i], expect=expect)
                            self._check_environment(entries)
                        except StoreError as exc:
                            errors[i] = f"job {jobs[i].id}: {exc}"
                            continue
                        prompts.append(vllm_prompt(build_prompt(tokenizer, jobs[i]), embeds_input(entries)))
                        slots.append(i)
                outputs = dict(zip(slots, self.engine.generate(prompts, params))) if prompts else {}
                for i in chunk:
                    if i in outputs:
                        results.append(result_from_output(jobs[i], outputs[i], keys[i]))
                    else:
                        print(f"error: {errors[i]}", file=sys.stderr)
                        results.append(Result(id=jobs[i].id, keys=keys[i], error=errors[i]))
                bar.update(len(chunk))
            bar.close()
        self.stats = DecodeStats(
            jobs=len(jobs),
            failed=sum(r.error is not None for r in results),
            output_tokens=sum(len(r.token_ids) for r in results),
            seconds=time.perf_counter() - t0,
        )
        return results
