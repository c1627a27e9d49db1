"""The store as the connector sees it: checked reads for the scheduler, new entries for the worker."""

from __future__ import annotations

import logging
import threading

import torch

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.lock import EntryCheck
from splitvlm.core.profiles import tower_kernels
from splitvlm.core.provenance import Provenance
from splitvlm.serve.settings import ServeSettings
from splitvlm.store import EmbeddingStore, Entry, Expect

log = logging.getLogger("splitvlm.serve")


def expect_of(config: dict, dtype) -> Expect:
    """What an entry must be for a checkpoint's config: embedding width, dtype, merge size, family.
    The engine core passes vLLM's hf_config; the API server, which has no model config, config.json."""
    from splitvlm.core.families import family_of_config

    family = family_of_config(config)
    layout = family.layout(config)
    return Expect(layout.width, dtype, layout.merge_size, family.name, layout.deepstack)


class StoreAccess:
    """One store handle per process (LMDB allows one environment per process), opened on first use."""

    _lock = threading.Lock()
    _store: EmbeddingStore | None = None

    def __init__(self, settings: ServeSettings, expect: Expect | None = None):
        self.settings = settings
        self.expect = expect
        self.provenance = Provenance(**settings.provenance)
        self.tower = tower_kernels(self.provenance.profile, torch.cuda.is_available())
        self.check_entry = EntryCheck(settings.lock, settings.allow_mismatch, self.tower)
        self._environment: dict[str, str] | None = None

    def store(self) -> EmbeddingStore:
        with StoreAccess._lock:
            if StoreAccess._store is None:
                StoreAccess._store = EmbeddingStore(self.settings.store, readonly=not self.settings.store_new)
            return StoreAccess._store

    def entry(self, key: str, tokens: int | None = None) -> Entry | None:
        """The checked entry under key (fitting `tokens` placeholders when given); None when it is
        absent, and None with a warning when it is damaged, foreign or of another layout."""
        try:
            store = self.store()
            if key not in store:
                return None
            entry = store.get(key, self.expect)
            self.check_entry(key, entry.meta)
            made = entry.meta.get("model_fingerprint")
            if made and made != self.provenance.model_fingerprint:
                raise SplitVLMError(f"{key}: encoded by another model (vision weights {made[:12]}…)")
            if tokens is not None and entry.n_tokens != tokens:
                raise SplitVLMError(f"{key}: {entry.n_tokens} embedding rows, the request has {tokens} placeholders")
        except SplitVLMError as exc:  # StoreError too: a damaged or foreign entry is a miss, never an error
            log.warning("splitvlm serve: not using a stored entry: %s", exc)
            return None
        return entry

    def read(self, key: str, tokens: int) -> torch.Tensor | None:
        """The checked embedding under key when it is there and fits `tokens` placeholders; None otherwise."""
        entry = self.entry(key, tokens)
        return None if entry is None else entry.image_embeds

    def write(self, key: str, digest: str, embeds: torch.Tensor, grid: list[int]) -> bool:
        """Store one tower output as `splitvlm encode` would (--store-new); False when it was there."""
        from splitvlm.core.identity import environment

        if self._environment is None:
            self._environment = environment()
        env = self._environment
        meta = {"vllm_version": env["vllm"], "torch_version": env["torch"], "device": env["device"],
                "profile": self.provenance.profile, "tower_kernels": self.tower,
                **self.provenance.meta(bytes.fromhex(digest)),
                "source": "splitvlm serve"}
        grid_thw = torch.tensor([grid], dtype=torch.int64)
        entry = Entry(key, embeds.detach().to("cpu", copy=True).contiguous(), grid_thw, meta)
        try:
            return self.store().put(entry)
        except SplitVLMError as exc:
            log.warning("splitvlm serve: could not store %s: %s", key, exc)
            return False
