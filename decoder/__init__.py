"""Decoder stage: greedy generation in vLLM from stored embeddings."""

from splitvlm.decoder.jobs import Job, read_jobs
from splitvlm.decoder.pipeline import Decoder, Result

__all__ = ["Decoder", "Job", "Result", "read_jobs"]
