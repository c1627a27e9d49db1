"""Decoder: jobs -> store keys -> checked embeddings -> greedy generation in vLLM -> results in job order."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from tqdm import tqdm

from splitvlm.core.batching import chunks
from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError, whole_line
from splitvlm.core.lock import EntryCheck
from splitvlm.core.profiles import tower_kernels
from splitvlm.core.provenance import KeyMaker, explain_misses
from splitvlm.core.sources import read_bytes
from splitvlm.decoder.cache import (
    ResultCache,
    check_cacheable,
    prompt_token_ids,
    standalone_tokenizer,
)
from splitvlm.decoder.jobs import Job, build_prompt, names_a_key
from splitvlm.decoder.results import (
    OUTPUT_FIELDS,
    DecodeStats,
    Result,
    embeds_input,
    first_difference,
    result_from_output,
    vllm_prompt,
)
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.entry import check_tensors
from splitvlm.store.key import image_digest

__all__ = ["OUTPUT_FIELDS", "DecodeStats", "Decoder", "Encoded", "Result", "embeds_input", "first_difference",
           "result_from_output", "vllm_prompt"]
MISSING_POLICIES = ("error", "encode", "skip")


class Encoded(Protocol):
    """What an encode_missing callable returns (the encoder's Stats): the images it could not encode."""

    failures: list[dict]  # {"path", "error"} per image


class Decoder:
    """Greedy generation in vLLM from stored embeddings; no vision tower in the loop."""

    def __init__(self, cfg: Config, engine=None, encode_missing: Callable[[list[str]], Encoded] | None = None,
                 model_access: bool | None = None):
        """encode_missing(paths) encodes images into the store for on_missing="encode" (an Encoder in this engine).

        model_access: whether a caller will reach into the engine's model (encode, a spot check's
        embedding check); None: only for on_missing="encode". Without it the engine core may run
        in its own process (Config.engine_process)."""
        if not cfg.store:
            raise SplitVLMError("no store given (--store PATH)")
        if cfg.on_missing not in MISSING_POLICIES:
            raise SplitVLMError(f"--on-missing must be one of {', '.join(MISSING_POLICIES)}")
        if cfg.on_missing == "encode" and encode_missing is None:
            raise SplitVLMError('on_missing="encode" needs encode_missing, a callable that encodes image paths '
                                "into the store (Decoder(cfg, encode_missing=...))")
        if cfg.cache:
            check_cacheable(cfg)
        self.check_entry = EntryCheck(cfg.lock, cfg.allow_mismatch,  # checks the lock itself first
                                      tower_kernels(cfg.profile, torch.cuda.is_available()))
        self.cfg = cfg
        self.keys = KeyMaker(cfg)
        self._engine = engine
        self.encode_missing = encode_missing
        self.model_access = cfg.on_missing == "encode" if model_access is None else model_access
        self._tokenizer = None
        self._path_keys: dict[str, str] = {}
        self.stats = DecodeStats()

    @property
    def engine(self):
        if self._engine is None:
            from splitvlm.core.engine import Engine

            self._engine = Engine(self.cfg, model_access=self.model_access)
        return self._engine

    def engine_settings(self) -> dict:
        """The engine's settings as vLLM reported them; empty when no engine was started."""
        return self._engine.reported() if self._engine is not None else {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._engine is None and self.cfg.cache:  # a decode answered from the cache starts no engine
                self._tokenizer = standalone_tokenizer(self.cfg)
            else:
                self._tokenizer = self.engine.tokenizer()
        return self._tokenizer

    def job_keys(self, job: Job) -> tuple[list[str], str | None]:
        if job.error is not None:
            return [], job.error
        if len(job.images) > self.cfg.max_images_per_prompt:
            return [], (f"job {job.id}: {len(job.images)} images, more than the limit of "
                        f"{self.cfg.max_images_per_prompt} (--limit-images)")
        keys = []
        for ref in job.images:
            if names_a_key(ref):
                keys.append(ref)
                continue
            try:
                if ref not in self._path_keys:  # an image shared by many jobs is read and hashed once
                    self._path_keys[ref] = self.keys(read_bytes(ref))
                keys.append(self._path_keys[ref])
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
            why = self._why_missing([ref for _, ref in missing.values()], store)
            listed = "; ".join(f"job {j}: {ref}" + (f" ({why[ref]})" if ref in why else "")
                               for j, ref in missing.values())
            raise SplitVLMError(f"{len(missing)} image(s) not in the store: {listed} "
                                "(encode them first, or use --on-missing encode|skip)")
        if self.cfg.on_missing == "encode":
            unencodable = [ref for _, ref in missing.values() if names_a_key(ref)]
            if unencodable:
                raise SplitVLMError(f"cannot encode keys that are not in the store: {', '.join(unencodable)}")
            assert self.encode_missing is not None  # refused in __init__ otherwise
            for failure in self.encode_missing([ref for _, ref in missing.values()]).failures:
                print(f"could not encode {failure['path']}: {failure['error']}", file=sys.stderr)
        absent = {i: [ref for ref, k in zip(job.images, job_keys) if k not in store]
                  for i, (job, job_keys) in enumerate(zip(jobs, keys)) if errors[i] is None}
        why = self._why_missing(sorted({ref for refs in absent.values() for ref in refs}), store)
        for i, refs in absent.items():
            if refs:
                errors[i] = f"job {jobs[i].id}: not in the store: " + ", ".join(
                    ref + (f" ({why[ref]})" if ref in why else "") for ref in refs)

    def _why_missing(self, refs: list[str], store: EmbeddingStore) -> dict[str, str]:
        """For images (paths, URLs, container members) not in the store: the same image stored under which other settings (one header pass)."""
        wanted = {}
        for ref in refs:
            if not names_a_key(ref):
                with contextlib.suppress(SplitVLMError):
                    wanted[ref] = image_digest(read_bytes(ref))
        return explain_misses(self.keys.provenance, wanted, store.metas()) if wanted else {}

    def _check_model(self, entry: Entry) -> None:
        """An entry of another family, layout or vision weights than --model's (reachable by key) is refused."""
        other = self.keys.provenance.layout_difference(entry.meta)
        if other:
            raise SplitVLMError(f"{entry.key}: {other}")
        made = entry.meta.get("model_fingerprint")
        if made and made != self.keys.fingerprint:
            raise SplitVLMError(
                f"{entry.key}: encoded by another model (vision weights {made[:12]}…, "
                f"--model {self.cfg.model} has {self.keys.fingerprint[:12]}…); re-encode it with this model")

    def _check_length(self, text: str, entries: Sequence[Entry]) -> None:
        """The prompt with its images expanded must fit the model's context, or vLLM refuses the batch."""
        limit = self.engine.model_config.max_model_len
        n = len(prompt_token_ids(self.tokenizer, text)) + sum(e.n_tokens - 1 for e in entries)
        if n > limit:
            raise SplitVLMError(f"prompt of {n} tokens (images included) is longer than the context "
                                f"of {limit} (--max-model-len)")

    def _check_fit(self, entries: Sequence[Entry]) -> None:
        """The entries' shapes and dtype against the engine's model (StoreError naming the key)."""
        expect = self.engine.expect()
        for e in entries:
            check_tensors(e.key, e.image_embeds, e.image_grid_thw, e.meta, expect)

    def prepare(self, jobs: list[Job], store: EmbeddingStore) -> tuple[list[list[str]], list[str | None]]:
        self._path_keys = {}  # files are read afresh on each run
        resolved = [self.job_keys(job) for job in jobs]
        keys = [k for k, _ in resolved]
        errors = [e for _, e in resolved]
        self._handle_missing(jobs, keys, errors, store)
        return keys, errors

    def generate(self, jobs: list[Job]) -> list[Result]:
        """One Result per job, in job order."""
        return [r for chunk in self.generate_iter(jobs) for r in chunk]

    def generate_iter(self, jobs: list[Job]) -> Iterator[list[Result]]:
        """The results of each --batch-jobs chunk as it finishes, in job order; self.stats counts what was yielded."""
        t0 = time.perf_counter()
        self.stats = DecodeStats(cached=0 if self.cfg.cache else None)
        writes = self.cfg.cache or self.cfg.on_missing == "encode"  # else a read-only store will do
        with EmbeddingStore(self.cfg.store, readonly=not writes) as store:
            keys, errors = self.prepare(jobs, store)
            cache = ResultCache(store, self.cfg) if self.cfg.cache else None
            with tqdm(total=len(jobs), unit="job", desc="decode", file=sys.stderr,
                      disable=None if self.cfg.show_progress else True) as bar:  # None: off unless a terminal
                for chunk in chunks(len(jobs), self.cfg.batch_jobs):
                    results = self._decode_chunk(jobs, keys, errors, chunk, store, cache)
                    bar.update(len(chunk))
                    self._count(results, time.perf_counter() - t0)
                    yield results
                    t0 = time.perf_counter()  # the caller's time between chunks is not decode time
        self._count([], time.perf_counter() - t0)

    def _count(self, results: list[Result], seconds: float) -> None:
        """Add a chunk's results and the seconds spent on it to self.stats."""
        s = self.stats
        s.jobs += len(results)
        s.failed += sum(r.error is not None for r in results)
        s.output_tokens += sum(len(r.token_ids) for r in results)
        s.seconds += seconds
        if s.cached is not None:
            s.cached += sum(bool(r.cached) for r in results)

    def _decode_chunk(self, jobs: list[Job], keys: list[list[str]], errors: list[str | None], chunk: range,
                      store: EmbeddingStore, cache: ResultCache | None) -> list[Result]:
        """One vLLM call for the jobs of chunk that the cache does not answer; results in job order."""
        pending: dict[int, tuple[str, list[Entry]]] = {}  # job index -> prompt text, entries
        for i in chunk:
            if errors[i] is None:
                try:
                    entries = store.get_many(keys[i])
                    for entry in entries:
                        self.check_entry(entry.key, entry.meta)
                        self._check_model(entry)
                except SplitVLMError as exc:  # StoreError, or an entry of another model or environment
                    errors[i] = f"job {jobs[i].id}: {exc}"
                    continue
                pending[i] = (build_prompt(self.tokenizer, jobs[i]), entries)
        done: dict[int, Result] = {}
        lookups = self._from_cache(cache, jobs, pending, done) if cache is not None else {}
        prompts, slots = [], []
        for i, (text, entries) in pending.items():
            try:
                self._check_fit(entries)
                self._check_length(text, entries)
            except SplitVLMError as exc:
                errors[i] = f"job {jobs[i].id}: {exc}"
                continue
            prompts.append(vllm_prompt(text, embeds_input(entries)))
            slots.append(i)
        if prompts:
            params = [self.engine.sampling_params(*jobs[i].sampling(self.cfg.max_tokens, self.cfg.stop)) for i in slots]
            try:
                outputs = self.engine.generate(prompts, params)
            except Exception as exc:  # vLLM refused the batch: its jobs fail, the other batches run
                for i in slots:
                    errors[i] = f"job {jobs[i].id}: vLLM refused its batch ({type(exc).__name__}: {whole_line(exc, 300)})"
                slots, outputs = [], []
            for i, output in zip(slots, outputs, strict=True):
                done[i] = result_from_output(jobs[i], output, keys[i])
                done[i].cached = None if cache is None else False
            if cache is not None and slots:
                cache.put_many([(lookups[i], done[i].cache_fields()) for i in slots])
        for i in chunk:
            if i not in done:
                print(f"error: {errors[i]}", file=sys.stderr)
        return [done.get(i) or Result(id=jobs[i].id, keys=keys[i], error=errors[i]) for i in chunk]

    def _from_cache(self, cache: ResultCache, jobs: list[Job], pending: dict[int, tuple[str, list[Entry]]],
                    done: dict[int, Result]) -> dict[int, str]:
        """Move the jobs the cache answers from pending to done; the cache keys of the others."""
        lookups = {i: cache.key(entries, prompt_token_ids(self.tokenizer, text),
                                jobs[i].sampling(self.cfg.max_tokens, self.cfg.stop))
                   for i, (text, entries) in pending.items()}
        for i, fields in zip(list(lookups), cache.get_many(list(lookups.values())), strict=True):
            if fields is not None:
                done[i] = Result(id=jobs[i].id, **fields, cached=True)
                del pending[i], lookups[i]
        return lookups
