"""The one exception a user sees as a one-line message (a traceback only with --debug)."""


class SplitVLMError(Exception):
    """An error the user caused and can fix; its message is one line."""


class EngineStartError(SplitVLMError):
    """vLLM could not start: the run stops here, once, whatever is left to do."""
