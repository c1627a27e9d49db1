"""Decoder stage: greedy generation in vLLM from stored embeddings."""

from splitvlm.decoder.jobs import Job, build_prompt, names_a_key, read_jobs
from splitvlm.decoder.pipeline import Decoder, Encoded
from splitvlm.decoder.results import Result, first_difference, result_from_output, vllm_prompt

__all__ = ["Decoder", "Encoded", "Job", "Result", "build_prompt", "first_difference", "names_a_key", "read_jobs",
           "result_from_output", "vllm_prompt"]
