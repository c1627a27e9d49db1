"""The result cache: finished decode outputs in the store's "results" database, keyed by all that made them.

A key is blake3 over, each field length-prefixed: the cache format, the context (a blake3 of
every checkpoint file's bytes, the embeddings' provenance, dtype, sampling parameters, profile and its settings, the versions and the device), the
embeddings used (store key and tensor checksum, so an altered entry misses), and the prompt's
token ids (the prompt text as vLLM tokenizes it, before image placeholders are expanded: the
embeddings fix that expansion). Only exact-profile greedy outputs are cached.
"""

from __future__ import annotations

import functools
import json
import struct
import time
from collections.abc import Sequence

import blake3
import torch

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.identity import environment, resolve_model_dir
from splitvlm.core.profiles import get_profile, process_env
from splitvlm.core.provenance import Provenance
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.store.key import canonical_json
from splitvlm.store.results import (  # one format and one check, for decode and `store check`
    FORMAT,
    RESULT_FIELDS,
    fields_checksum,
)
from splitvlm.store.results import checked as _checked

ENV_FIELDS = ("splitvlm", "vllm", "torch", "transformers", "cuda", "device")


@functools.lru_cache(maxsize=4)
def checkpoint_fingerprint(model: str) -> str:
    """blake3 over every file of the checkpoint (name and bytes): the language model, tokenizer and
    template included, and nothing of where the folder is, so a copied model keeps its cached results."""
    root = resolve_model_dir(model)
    if root is None:
        return f"hub:{model}"
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts):
        name = path.relative_to(root).as_posix().encode()
        h.update(struct.pack("<Q", len(name)) + name + struct.pack("<Q", path.stat().st_size))
        with open(path, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()


def profile_settings(profile_name: str) -> dict[str, str]:
    """The environment a profile gives vLLM in this process (a SPLITVLM_PROFILE set by the user wins)."""
    return process_env(get_profile(profile_name), torch.cuda.is_available())


def sampling(cfg: Config) -> dict:
    """The sampling parameters of a decode (Engine.sampling_params makes the same ones)."""
    return {"max_tokens": cfg.max_tokens, "stop": list(cfg.stop), "temperature": 0.0, "seed": cfg.seed}


def context(cfg: Config) -> dict:
    """Every field of a cache key that is the same for all jobs of one decode."""
    env = environment()
    extra = {"vllm_args": cfg.vllm_args} if cfg.vllm_args else {}  # absent: earlier keys stay valid
    return {
        **extra,
        "format": FORMAT,
        "model": checkpoint_fingerprint(cfg.model),
        "embeddings": Provenance.of(cfg).key_fields(),
        "dtype": cfg.dtype,
        "enforce_eager": cfg.enforce_eager,
        "sampling": sampling(cfg),
        "profile": cfg.profile,
        "profile_settings": profile_settings(cfg.profile),
        "environment": {name: env[name] for name in ENV_FIELDS},
    }


def _field(h: blake3.blake3, name: str, value: bytes) -> None:
    """u64 length of the name, the name, u64 length of the value, the value (lengths little-endian)."""
    h.update(struct.pack("<Q", len(name)) + name.encode() + struct.pack("<Q", len(value)))
    h.update(value)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as vLLM makes them from its text (add_special_tokens on), before images expand."""
    return list(tokenizer.encode(prompt))


class ResultCache:
    """Lookups and writes of finished results in one store; refuses profiles that are not exact."""

    def __init__(self, store: EmbeddingStore, cfg: Config):
        check_cacheable(cfg)
        self.store = store
        self.context = context(cfg)
        self._context = canonical_json(self.context, "cache context")

    def key(self, entries: Sequence[Entry], prompt_ids: Sequence[int],
            sampling: tuple[int, list[str]] | None = None) -> str:
        """sampling: the job's (max_tokens, stop); it enters the key only where it differs from the
        run's (in the context), so the keys of jobs without their own fields stay as they were."""
        h = blake3.blake3()
        _field(h, "context", self._context)
        _field(h, "embeddings", canonical_json([[e.key, e.meta.get("checksum", "")] for e in entries]))
        _field(h, "prompt_token_ids", canonical_json([int(t) for t in prompt_ids]))
        run = self.context["sampling"]
        if sampling is not None and (sampling[0], list(sampling[1])) != (run["max_tokens"], run["stop"]):
            _field(h, "job_sampling", canonical_json({"max_tokens": sampling[0], "stop": list(sampling[1])}))
        return h.hexdigest()

    def get_many(self, keys: Sequence[str]) -> list[dict | None]:
        """The stored result fields under each key; None for a miss or a value that does not check out."""
        db = self.store.results_db()
        if db is None:
            return [None] * len(keys)
        with self.store.read() as txn:
            raw = [txn.get(k.encode(), db=db) for k in keys]
            raw = [None if v is None else bytes(v) for v in raw]
        return [None if v is None else _checked(v) for v in raw]

    def put_many(self, items: Sequence[tuple[str, dict]]) -> int:
        """Store result fields under their keys in one transaction; returns how many."""
        db = self.store.results_db()
        if not items or db is None:
            return 0
        made = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "environment": self.context["environment"], "profile": self.context["profile"]}
        values = []
        for k, r in items:
            fields = {f: r[f] for f in RESULT_FIELDS}
            value = {"format": FORMAT, **fields, "checksum": fields_checksum(fields), **made}
            values.append((k.encode(), json.dumps(value, ensure_ascii=False).encode()))
        size = sum(len(v) + 256 for _, v in values)
        return self.store.write(lambda txn: sum(bool(txn.put(k, v, db=db)) for k, v in values), size_hint=size)


def count_results(store: EmbeddingStore) -> int:
    db = store.results_db()
    if db is None:
        return 0
    with store.read() as txn:
        return txn.stat(db)["entries"]


def check_cacheable(cfg: Config) -> None:
    if not get_profile(cfg.profile).exact:
        raise SplitVLMError(f"--cache: only exact-profile results are cached; profile {cfg.profile!r} "
                            "outputs depend on batching")


def standalone_tokenizer(cfg: Config):
    """vLLM's tokenizer for the model without an engine, so that a decode answered from the cache
    never starts one; the process gets the profile's settings first, as Engine would give them."""
    from splitvlm.core.engine import prepare_process

    prepare_process(cfg.profile)
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(cfg.model)
