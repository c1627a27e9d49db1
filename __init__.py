"""splitvlm: pre-encode images once, decode many times in vLLM, byte-identical to end-to-end."""

from typing import Any

from splitvlm.core import __version__

__all__ = ["Config", "Encoder", "Decoder", "EmbeddingStore", "verify", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import splitvlm` stays cheap and never imports vLLM.
    if name == "Config":
        from splitvlm.core.config import Config
        return Config
    if name == "EmbeddingStore":
        from splitvlm.store import EmbeddingStore
        return EmbeddingStore
    if name == "Encoder":
        from splitvlm.encoder import Encoder
        return Encoder
    if name == "Decoder":
        from splitvlm.decoder import Decoder
        return Decoder
    if name == "verify":
        from splitvlm.verify import verify
        return verify
    raise AttributeError(name)
