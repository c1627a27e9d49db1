"""What every serve process shares: the settings, the signed image keys a request carries, the counters."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS_VARIABLE = "SPLITVLM_SERVE"  # the settings as JSON, for the API server's middleware
SECRET_VARIABLE = "SPLITVLM_SERVE_SECRET"  # signs the image keys the middleware gives a request
XARG = "splitvlm_images"  # the request's vllm_xargs entry (sampling_params.extra_args in the engine)
COUNTERS = {  # name: help, as /metrics shows them (with _total)
    "store_hits": "Images whose embedding came from the store: vision tower calls avoided",
    "store_embeds": "Of those, images handed to vLLM as their stored embedding: no image processing either",
    "store_misses": "Images with a store key whose entry was absent or unusable (the tower ran)",
    "tower_images": "Images the vision tower encoded in this server",
    "stored_new": "Tower outputs written to the store (--store-new)",
}


@dataclass
class ServeSettings:
    """The options of one `splitvlm serve`, as its API server, engine core and workers read them."""

    model: str
    store: str
    profile: str = "exact"
    store_new: bool = False
    lock: str | None = None
    allow_mismatch: bool = False
    run_dir: str = ""  # where each process writes its counters
    provenance: dict = field(default_factory=dict)  # core.provenance.Provenance's fields
    allowed_media_path: str = ""
    allowed_media_domains: list[str] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ServeSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SETTINGS_VARIABLE)
        if not raw:
            raise RuntimeError(f"{SETTINGS_VARIABLE} is not set: start the server with `splitvlm serve`")
        return cls.from_dict(json.loads(raw))


def secret() -> bytes | None:
    value = os.environ.get(SECRET_VARIABLE, "")
    return bytes.fromhex(value) if value else None


EMBEDDED = "embeds;"  # a token's prefix: the middleware put the request's images in as stored embeddings


@dataclass
class Signed:
    """A request's images as the middleware signed them: (store key, image blake3 hex) each, in order,
    and whether they reach vLLM as stored embeddings (else as images, for the tower or the connector)."""

    refs: list[tuple[str, str]]
    embedded: bool = False


def sign(key: bytes, refs: list[tuple[str, str]], embedded: bool = False) -> str:
    """The token for a request's images, with an HMAC over all of it."""
    body = (EMBEDDED if embedded else "") + ",".join(f"{k}.{d}" for k, d in refs)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest() + ":" + body


def verify(key: bytes | None, token: object) -> Signed | None:
    """What a token the middleware signed says; None for anything else."""
    if key is None or not isinstance(token, str) or ":" not in token:
        return None
    mac, _, body = token.partition(":")
    if not hmac.compare_digest(mac, hmac.new(key, body.encode(), hashlib.sha256).hexdigest()):
        return None
    embedded = body.startswith(EMBEDDED)
    body = body.removeprefix(EMBEDDED)
    pairs = [item.partition(".") for item in body.split(",")] if body else []
    return Signed([(k, d) for k, _, d in pairs], embedded)


class Counts:
    """One process's counters, written to run_dir/counts-<name>-<pid>.json whenever they change.

    Thread-safe: the middleware counts from worker threads, and a += on a dict item or two writers
    of one temporary file can lose a count (the H200 serve run at f8f6060 showed 255 hits for 256)."""

    def __init__(self, run_dir: str, name: str):
        self.values = dict.fromkeys(COUNTERS, 0)
        self.path = Path(run_dir) / f"counts-{name}-{os.getpid()}.json" if run_dir else None
        self.dirty = False
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.values[name] += n
                self.dirty = True

    def flush(self) -> None:
        with self._lock:
            if not self.dirty or self.path is None:
                return
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(self.values), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:  # the run folder is gone: the server is shutting down
                return
            self.dirty = False


def read_counts(run_dir: str) -> dict[str, int]:
    """The counters of every process of this server, summed."""
    totals = dict.fromkeys(COUNTERS, 0)
    for path in Path(run_dir).glob("counts-*.json"):
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for name in totals:
            totals[name] += int(values.get(name, 0))
    return totals
