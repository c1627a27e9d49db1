"""The store's one exception: a one-line message that names the key and what is wrong."""

from splitvlm.core.errors import SplitVLMError


class StoreError(SplitVLMError):
    """A missing, damaged or unsuitable store entry, or a store that cannot be opened or written."""
