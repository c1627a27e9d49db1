"""The one exception a user sees as a one-line message (a traceback only with --debug)."""


class SplitVLMError(Exception):
    """An error the user caused and can fix; its message is one line."""


class EngineStartError(SplitVLMError):
    """vLLM could not start: the run stops here, once, whatever is left to do."""


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, or its type name: how splitvlm quotes other libraries' errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def whole_line(exc: BaseException, limit: int = 500) -> str:
    """All of an exception's message on one line, cut at limit (for errors whose reason is not on line one)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__
