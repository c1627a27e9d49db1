"""Verifier: prove that decoding from the store gives exactly the end-to-end bytes."""

import sys
import types

from splitvlm.verify.verifier import Report, Verifier, verify

__all__ = ["Report", "Verifier", "verify"]


class _CallableModule(types.ModuleType):
    """`from splitvlm import verify; verify(cfg, jobs)` works: the package calls its function."""

    def __call__(self, *args, **kwargs) -> Report:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
