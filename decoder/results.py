"""What a decode gives back: results, run figures, and the helpers that make vLLM prompts and read its outputs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from splitvlm.decoder.cache import RESULT_FIELDS
from splitvlm.decoder.jobs import Job
from splitvlm.store import Entry

OUTPUT_FIELDS = ("text", "token_ids", "finish_reason", "sha256", "prompt_tokens")  # null on a failed job


@dataclass
class Result:
    """One job's outcome: a line of decode's --out (docs/jobs.md, "Output")."""

    id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    sha256: str = ""
    prompt_tokens: int = 0
    keys: list[str] = field(default_factory=list)
    error: str | None = None
    cached: bool | None = None  # with --cache: answered from the result cache
    spot_checked: bool | None = None  # with --spot-check: also run end to end
    spot_check_identical: bool | None = None
    spot_check_error: str | None = None  # the end-to-end run of a spot check failed

    def to_json(self) -> dict:
        """Every field, always, in output order; a failed job's output fields are null."""
        line = asdict(self)
        if self.error is not None:
            line.update({name: None for name in OUTPUT_FIELDS})
        return line

    def cache_fields(self) -> dict:
        return {name: getattr(self, name) for name in RESULT_FIELDS}

    def to_openai(self, model: str) -> dict:
        """The line of an OpenAI batch output file (custom_id = the job's id); splitvlm's own
        fields (token ids, keys, cache and spot-check flags) ride along under body["splitvlm"]."""
        request_id = "splitvlm-" + hashlib.sha256(self.id.encode("utf-8")).hexdigest()[:24]
        if self.error is not None:
            return {"id": request_id, "custom_id": self.id, "response": None,
                    "error": {"code": "splitvlm_job_failed", "message": self.error}}
        own = {k: v for k, v in self.to_json().items() if k not in ("id", "text", "finish_reason", "error")}
        body = {"id": "chatcmpl-" + request_id.removeprefix("splitvlm-"), "object": "chat.completion",
                "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                                             "finish_reason": self.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids),
                          "total_tokens": self.prompt_tokens + len(self.token_ids)},
                "splitvlm": own}
        return {"id": request_id, "custom_id": self.id,
                "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


@dataclass
class DecodeStats:
    """The figures of one decode run."""

    jobs: int = 0
    failed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    cached: int | None = None  # None: no cache in use

    def to_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.jobs / self.seconds if self.seconds else 0.0}

    def summary(self) -> str:
        rate = self.jobs / self.seconds if self.seconds else 0.0
        tps = self.output_tokens / self.seconds if self.seconds else 0.0
        cached = "" if self.cached is None else f", {self.cached} from the cache"
        return (f"decoded {self.jobs - self.failed}/{self.jobs} jobs{cached}, {self.failed} failed; "
                f"{self.seconds:.1f} s, {rate:.2f} requests/s, {tps:.1f} output tokens/s")


def result_from_output(job: Job, output, keys: list[str]) -> Result:
    """A job's Result from vLLM's output for its prompt."""
    completion = output.outputs[0]
    return Result(
        id=job.id,
        text=completion.text,
        token_ids=list(completion.token_ids),
        finish_reason=completion.finish_reason,
        sha256=hashlib.sha256(completion.text.encode("utf-8")).hexdigest(),
        prompt_tokens=len(output.prompt_token_ids or []),
        keys=keys,
    )


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def vllm_prompt(text: str, images: dict | list | None) -> dict:
    """A vLLM prompt dict; text-only jobs carry no multi_modal_data."""
    return {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}


def embeds_input(entries: Sequence[Entry]) -> dict | None:
    """The image data of a prompt's stored entries, as vLLM takes embeddings (None without images)."""
    if not entries:
        return None
    return {
        "image_embeds": torch.cat([e.image_embeds for e in entries]),
        "image_grid_thw": torch.cat([e.image_grid_thw.reshape(1, 3) for e in entries]),
    }
