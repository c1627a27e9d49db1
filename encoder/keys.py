"""The store key of an image under a config: image bytes + model + preprocessing + profile."""

from __future__ import annotations

from splitvlm.core.config import Config
from splitvlm.core.identity import model_fingerprint, model_id, preprocess_identity
from splitvlm.store import make_key


class KeyMaker:
    """Computes keys for one config; the model fingerprint and preprocessing are read once."""

    def __init__(self, cfg: Config):
        self.model_id = model_id(cfg.model)
        self.fingerprint = model_fingerprint(cfg.model)
        self.preprocess = preprocess_identity(cfg.model, cfg.mm_processor_kwargs)
        self.profile = cfg.profile

    def __call__(self, image_bytes: bytes) -> str:
        return make_key(
            image_bytes,
            model_id=self.model_id,
            model_fingerprint=self.fingerprint,
            preprocess=self.preprocess,
            profile=self.profile,
        )
