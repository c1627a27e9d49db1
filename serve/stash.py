"""Stored embeddings handed to vLLM's chat parser inside the API server process by reference, not as JSON.

An `image_embeds` part normally carries `torch.save` bytes in base64: for a stored embedding that is
several MB per image (a 1024 px image: 1,337 rows × 1,536 × 2 bytes), written into the request's
JSON by the middleware and parsed, decoded and unpickled again by vLLM, all on the API server's one
event loop. On the H200 that route answered 32 requests/s against plain `vllm serve`'s 52. So the
middleware leaves the checked tensor here under a one-use random token, the part carries
`splitvlm-stash:<token>`, and vLLM's `ImageEmbeddingMediaIO.load_base64` (the one function its chat
parser calls for every image_embeds value, in 0.26 and 0.32) returns the tensor for such a string.
Anything else goes to vLLM's own function unchanged. Clients cannot use the route: the middleware
refuses their image_embeds parts, and a token is 128 random bits, taken once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

PREFIX = "splitvlm-stash:"
LIMIT = 8192  # tensors waiting at most: the oldest go first (a request vLLM refused before parsing)
TTL_S = 600.0


class Stash:
    """Tensors by one-use token, for this process's vLLM chat parser."""

    def __init__(self, limit: int = LIMIT, ttl_s: float = TTL_S):
        self.limit, self.ttl_s = limit, ttl_s
        self._items: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, tensor) -> str:
        token = PREFIX + secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            self._items[token] = (now, tensor)
            while self._items and (len(self._items) > self.limit or next(iter(self._items.values()))[0] < now - self.ttl_s):
                self._items.popitem(last=False)
        return token

    def take(self, token: str):
        with self._lock:
            item = self._items.pop(token, None)
        return None if item is None else item[1]

    def __len__(self) -> int:
        return len(self._items)


def install(stash: Stash) -> bool:
    """Make vLLM's embedding loader in this process resolve stash tokens; False where it has no such
    loader (then the middleware sends the bytes in base64, vLLM's documented form)."""
    try:
        from vllm.multimodal.media.image import ImageEmbeddingMediaIO
    except ImportError:
        return False
    original = ImageEmbeddingMediaIO.load_base64
    if getattr(original, "splitvlm_stash", None) is not None:
        original = original.splitvlm_original

    def load_base64(self, media_type: str, data: str):
        if isinstance(data, str) and data.startswith(PREFIX):
            tensor = stash.take(data)
            if tensor is None:
                raise ValueError("splitvlm serve: a stored embedding's reference expired; send the request again")
            return tensor
        return original(self, media_type, data)

    load_base64.splitvlm_stash = stash
    load_base64.splitvlm_original = original
    ImageEmbeddingMediaIO.load_base64 = load_base64
    return True
