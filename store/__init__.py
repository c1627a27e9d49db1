"""The embedding store: image embeddings in LMDB as safetensors blobs, content-addressed and checked."""

from splitvlm.store.compact import compact_store
from splitvlm.store.entry import Entry, Expect
from splitvlm.store.errors import StoreError
from splitvlm.store.export import export_store, to_numpy
from splitvlm.store.key import make_key
from splitvlm.store.merge import merge_stores
from splitvlm.store.store import EmbeddingStore

__all__ = ["EmbeddingStore", "Entry", "Expect", "StoreError", "compact_store", "export_store", "make_key", "merge_stores",
           "to_numpy"]
