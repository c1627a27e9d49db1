"""splitvlm's vLLM encoder-cache connector: stored embeddings go into vLLM's encoder cache, so the
vision tower does not run for them (ec_connector_module_path="splitvlm.serve.connector").

vLLM keys its encoder cache by an identifier that depends on its version and settings (under the
exact profile, a per-request id). So the connector never reads it as a store key: the request
carries its images' store keys, signed by splitvlm's middleware (settings.XARG in vllm_xargs),
and the scheduler side pairs them, in order, with the request's image items.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)

from splitvlm.serve.lookup import StoreAccess, expect_of
from splitvlm.serve.settings import XARG, Counts, ServeSettings, secret, verify

log = logging.getLogger("splitvlm.serve")


@dataclass
class NewItem:
    """An image the tower encodes that --store-new keeps: its key, image digest and grid."""

    key: str
    digest: str
    grid: list[int]


@dataclass
class StoreMetadata(ECConnectorMetadata):
    """One step's work for the workers: embeddings to put into the encoder cache, images to store."""

    loads: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    new: dict[str, NewItem] = field(default_factory=dict)
    embedded: list[str] = field(default_factory=list)  # stored embeddings passing through, not tower work


@dataclass
class Pending:
    """A request's images: their reads from the store, and what --store-new needs for the others."""

    future: Future | None = None
    identifiers: list[str] = field(default_factory=list)
    new: dict[str, NewItem] = field(default_factory=dict)


def _sync_allowed():
    """vLLM 0.32's guard against hidden GPU syncs allows this copy; 0.26 has none."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:
        return contextlib.nullcontext()
    return gpu_sync_allowed()


def _grid(feature: Any) -> list[int] | None:
    try:
        elem = feature.data["image_grid_thw"]
        return [int(v) for v in torch.as_tensor(getattr(elem, "data", elem)).reshape(-1).tolist()]
    except Exception:  # no data in this process (a processor cache hit): nothing to store
        return None


class StoreConnector(ECConnectorBase):
    """Scheduler side: reads a request's stored embeddings (in a thread) before it is scheduled, and
    reports them as cached; worker side: puts them into the encoder cache, counts tower outputs."""

    def __init__(self, vllm_config, role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        extra = vllm_config.ec_transfer_config.ec_connector_extra_config
        self.settings = ServeSettings.from_dict(extra)
        self.scheduler = role == ECConnectorRole.SCHEDULER
        self.counts = Counts(self.settings.run_dir, "scheduler" if self.scheduler else "worker")
        model_config = vllm_config.model_config
        self.access = StoreAccess(self.settings, expect_of(model_config.hf_config.to_dict(), model_config.dtype))
        self.secret = secret()
        self._pending: dict[str, Pending] = {}
        self._ready: dict[str, torch.Tensor] = {}  # identifier -> checked embedding, until scheduled
        self._loads: list[tuple[str, torch.Tensor]] = []
        self._new: dict[str, NewItem] = {}
        self._embedded: list[str] = []  # scheduler: to announce; worker: a set of those announced
        self._passing: set[str] = set()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="splitvlm-store") if self.scheduler else None
        self._lead = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.secret is None:
            log.warning("splitvlm serve: %s is not set; every image runs through the tower", "the signing secret")

    # -- scheduler side --
    def ensure_cache_available(self, request, num_computed_tokens: int = 0) -> bool:
        """Start reading a new request's stored embeddings; False (try again next step) until read."""
        pending = self._pending.get(request.request_id)
        if pending is None:
            pending = self._pending[request.request_id] = self._begin(request)
        if pending.future is not None:
            if not pending.future.done():
                return False
            for identifier, embeds in zip(pending.identifiers, pending.future.result()):
                if embeds is not None:
                    self._ready[identifier] = embeds
                    pending.new.pop(identifier, None)
                else:
                    self.counts.add("store_misses")
            pending.future = None
        return True

    def _begin(self, request) -> Pending:
        images = [f for f in request.mm_features if f.modality == "image"]
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        signed = verify(self.secret, extra.get(XARG)) if XARG in extra else None
        if not images or signed is None:
            return Pending()
        refs = signed.refs
        if signed.embedded:  # the middleware put stored embeddings in: vLLM passes them through its encoder step
            self._embedded += [f.identifier for f in images]
            return Pending()
        if len(refs) != len(images):
            log.warning("splitvlm serve: request %s has %d images but %d keys; the tower runs for all",
                        request.request_id, len(images), len(refs))
            return Pending()
        jobs = [(f.identifier, key, f.mm_position.get_num_embeds()) for f, (key, _) in zip(images, refs)]
        new = {}
        if self.settings.store_new:
            for f, (key, digest) in zip(images, refs):
                if (grid := _grid(f)) is not None:
                    new[f.identifier] = NewItem(key, digest, grid)
        future = self._pool.submit(lambda: [self.access.read(key, n) for _, key, n in jobs])
        return Pending(future, [identifier for identifier, _, _ in jobs], new)

    def has_cache_item(self, identifier: str) -> bool:
        return identifier in self._ready

    def update_state_after_alloc(self, request, index: int) -> None:
        identifier = request.mm_features[index].identifier
        if identifier in self._ready:
            self._loads.append((identifier, self._ready.pop(identifier)))
            self.counts.add("store_hits")
            return
        pending = self._pending.get(request.request_id)
        if pending is not None and identifier in pending.new:
            self._new[identifier] = pending.new.pop(identifier)

    def build_connector_meta(self, scheduler_output) -> StoreMetadata:
        meta = StoreMetadata(self._loads, self._new, self._embedded)
        self._loads, self._new, self._embedded = [], {}, []
        self.counts.flush()
        return meta

    def request_finished(self, request) -> tuple[bool, dict[str, Any] | None]:
        pending = self._pending.pop(request.request_id, None)
        if pending is not None:
            if pending.future is not None:
                pending.future.cancel()
            for identifier in pending.identifiers:
                self._ready.pop(identifier, None)
        return False, None

    # -- worker side --
    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, StoreMetadata):
            return
        if len(self._new) > 65536:  # images of requests that ended before the tower ran
            self._new.clear()
        if len(self._passing) > 65536:  # embeddings already in vLLM's encoder cache never pass again
            self._passing.clear()
        self._new.update(meta.new)
        self._passing.update(meta.embedded)
        device = self._device()
        with _sync_allowed():
            for identifier, embeds in meta.loads:
                if identifier not in encoder_cache:
                    encoder_cache[identifier] = embeds.to(device)

    def save_caches(self, encoder_cache, mm_hash: str, **kwargs) -> None:
        """Called for every encoder output: a tower output is counted, and stored under --store-new;
        a stored embedding the middleware put in the request only passed through."""
        if not self._lead:
            return
        if mm_hash in self._passing:
            self._passing.discard(mm_hash)
            return
        self.counts.add("tower_images")
        item = self._new.pop(mm_hash, None)
        if item is not None and mm_hash in encoder_cache:
            if self.access.write(item.key, item.digest, encoder_cache[mm_hash], item.grid):
                self.counts.add("stored_new")
        self.counts.flush()

    @staticmethod
    def _device() -> str:
        from vllm.platforms import current_platform

        device = current_platform.device_type
        if current_platform.is_cuda_alike():
            device = f"{device}:{torch.cuda.current_device()}"
        return device

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.counts.flush()
