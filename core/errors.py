"""The one exception a user sees as a one-line message (a traceback only with --debug)."""


class SplitVLMError(Exception):
    """An error the user caused and can fix; its message is one line."""
