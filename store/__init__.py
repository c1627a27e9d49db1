"""The embedding store: image embeddings in LMDB as safetensors blobs, content-addressed and checked."""

from splitvlm.store.entry import Entry, Expect
from splitvlm.store.errors import StoreError
from splitvlm.store.key import make_key
from splitvlm.store.store import EmbeddingStore

__all__ = ["EmbeddingStore", "Entry", "Expect", "StoreError", "make_key"]
