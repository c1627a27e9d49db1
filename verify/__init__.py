"""Verifier: prove that decoding from the store gives exactly the end-to-end bytes."""

from splitvlm.verify.verifier import Report, Verifier, verify

__all__ = ["Report", "Verifier", "verify"]
