"""Jobs: read the JSONL job format and build prompts with the model's own chat template."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.sources import rebase
from splitvlm.store.key import is_key

UPPER_KEY_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass
class Job:
    """One line of a jobs file. A line that breaks the schema is still a Job, with error set:
    it fails on its own, and the other jobs run."""

    id: str
    images: list[str]  # references (paths, URLs, container members: core.sources) or store keys, in prompt order
    messages: list[dict]  # chat messages with {"type": "image"} parts in place of the images
    error: str | None = None
    max_tokens: int | None = None  # the job's own, else the run's --max-tokens
    stop: list[str] | None = None  # the job's own, else the run's --stop
    openai: bool = False  # the line was an OpenAI batch request (custom_id, method, url, body)

    def sampling(self, max_tokens: int, stop: list[str]) -> tuple[int, list[str]]:
        """(max_tokens, stop) for this job: its own fields where given, else the run's."""
        return (self.max_tokens or max_tokens, list(self.stop if self.stop is not None else stop))


class JobError(SplitVLMError):
    """A job that breaks the schema (docs/jobs.md); the message names file:line."""


def _image_ref(part: dict, where: str) -> str:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise JobError(f"{where}: image_url part without a url string")
        return _checked_ref(url.removeprefix("file://"), where)
    ref = part.get("image") or part.get("path") or part.get("key")
    if not isinstance(ref, str) or not ref:
        raise JobError(f"{where}: image part without a path or key string")
    return _checked_ref(ref, where)


def _checked_ref(ref: str, where: str) -> str:
    if ref[:5].lower() == "data:":  # the image inside the line: no reference that encode or verify can re-read
        raise JobError(f"{where}: a data: URL image: jobs name images by path, URL, container member or store "
                       "key (save the image, or encode it and give its key)")
    if UPPER_KEY_RE.match(ref) and not is_key(ref) and not Path(ref).exists():
        raise JobError(f"{where}: {ref[:16]}… looks like a store key, but keys are lowercase hex")
    return ref


def _normalise_messages(messages: object, where: str) -> tuple[list[dict], list[str]]:
    if not isinstance(messages, list) or not messages:
        raise JobError(f"{where}: \"messages\" must be a non-empty list")
    images: list[str] = []
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise JobError(f"{where}: each message is an object with a \"role\" string and content")
        content = message.get("content", "")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise JobError(f"{where}: a message's content is a string or a list of parts")
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise JobError(f"{where}: a content part is an object with a \"type\", got {type(part).__name__}")
            if part.get("type") in ("image", "image_url"):
                images.append(_image_ref(part, where))
                parts.append({"type": "image"})
            elif part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise JobError(f"{where}: a text part needs a \"text\" string")
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise JobError(f"{where}: unsupported content part type {part.get('type')!r}")
        out.append({"role": message["role"], "content": parts})
    return out, images


def _job_id(obj: dict, where: str) -> str:
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise JobError(f"{where}: \"id\" must be a non-empty string or an integer, got {json.dumps(value)}")
    return str(value)


# Sampling fields a job may carry. splitvlm decodes greedily; fields that would change a greedy
# output are accepted only at the values that leave it unchanged, and refused otherwise.
_NEUTRAL = {"temperature": (0, 0.0), "top_p": (1, 1.0), "n": (1,), "top_k": (0, -1),
            "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0)}
_REFUSED = ("logprobs", "top_logprobs", "stream", "tools", "tool_choice", "response_format", "logit_bias",
            "best_of", "min_tokens", "guided_json", "structured_outputs")


def _sampling(obj: dict, where: str) -> tuple[int | None, list[str] | None]:
    """A job's own max_tokens and stop, after refusing what greedy decoding cannot honour."""
    for name, neutral in _NEUTRAL.items():
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or value not in neutral):
            raise JobError(f"{where}: {name} {json.dumps(value)} refused: splitvlm decodes greedily "
                           f"(leave it out or use {neutral[0]})")
    for name in _REFUSED:
        if obj.get(name) not in (None, False, 0, [], {}):
            raise JobError(f"{where}: {name} is not supported by splitvlm decode")
    max_tokens = obj.get("max_completion_tokens", obj.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise JobError(f"{where}: max_tokens must be a positive integer, got {json.dumps(max_tokens)}")
    stop = obj.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop)):
        raise JobError(f"{where}: stop must be a string or a list of non-empty strings")
    return max_tokens, stop


def _openai_request(obj: dict, where: str) -> dict:
    """The chat body of an OpenAI batch line, with custom_id as the job's id."""
    if obj.get("method", "POST") != "POST" or obj.get("url") != "/v1/chat/completions":
        raise JobError(f"{where}: an OpenAI batch line must be POST /v1/chat/completions, "
                       f"got {obj.get('method')} {obj.get('url')}")
    body = obj.get("body")
    if not isinstance(body, dict) or "messages" not in body:
        raise JobError(f"{where}: an OpenAI batch line needs a \"body\" object with \"messages\"")
    return {**body, "id": obj["custom_id"]}


def parse_job(obj: object, where: str) -> Job:
    """A Job from one decoded JSON line; JobError naming where on any schema break."""
    if not isinstance(obj, dict):
        raise JobError(f"{where}: a job is a JSON object")
    openai = "custom_id" in obj
    if openai:
        obj = _openai_request(obj, where)
    job_id = _job_id(obj, where)
    if "messages" in obj:
        messages, images = _normalise_messages(obj["messages"], where)
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise JobError(f"{where}: \"prompt\" must be a string, got {json.dumps(obj['prompt'])[:40]}")
        images = obj["images"] if "images" in obj else ([obj["image"]] if "image" in obj else [])
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise JobError(f"{where}: \"images\" must be a list of paths or keys (strings)")
        images = [_checked_ref(i, where) for i in images]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": obj["prompt"]}]
        messages = [{"role": "user", "content": content}]
    else:
        raise JobError(f"{where}: a job needs \"prompt\" (with \"images\") or \"messages\"")
    max_tokens, stop = _sampling(obj, where)
    return Job(job_id, list(images), messages, max_tokens=max_tokens, stop=stop, openai=openai)


def read_jobs(path: str) -> list[Job]:
    """Jobs of a UTF-8 JSONL file, one per non-empty line; relative image paths (and containers of
    member references) are taken from the file's folder. A line that breaks the schema becomes a Job with error set (its id is the job's
    "id" where readable, else "line N")."""
    p = Path(path)
    if not p.is_file():
        raise SplitVLMError(f"{path}: no such jobs file")
    try:
        raw_lines = p.read_bytes().splitlines()
    except OSError as exc:
        raise SplitVLMError(f"{path}: cannot read ({exc.strerror or exc})") from None
    jobs, ids = [], set()
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        obj = None
        try:
            obj = json.loads(raw.decode("utf-8"))
            job = parse_job(obj, where)
            if job.id in ids:
                raise JobError(f"{where}: duplicate job id {job.id!r}")
        except UnicodeDecodeError as exc:
            job = _failed(obj, n, f"{where}: not UTF-8 (byte {exc.start})")
        except json.JSONDecodeError as exc:
            job = _failed(obj, n, f"{where}: not JSON ({exc.msg})")
        except JobError as exc:
            job = _failed(obj, n, str(exc))
        if job.id in ids:  # the failed line of a duplicate, or a failed line whose id repeats
            job.id = f"line {n}"
        ids.add(job.id)
        job.images = [ref if names_a_key(ref) else rebase(ref, p.parent) for ref in job.images]
        jobs.append(job)
    return jobs


def _failed(obj: object, n: int, error: str) -> Job:
    openai = isinstance(obj, dict) and "custom_id" in obj
    job_id = (obj.get("custom_id") if openai else obj.get("id")) if isinstance(obj, dict) else None
    ok = isinstance(job_id, (str, int)) and not isinstance(job_id, bool) and job_id != ""
    return Job(str(job_id) if ok else f"line {n}", [], [], error=error, openai=openai)


def names_a_key(ref: str) -> bool:
    """A job's image reference that is a store key (store.key.is_key) and not an existing file of that name."""
    return is_key(ref) and not Path(ref).exists()


def build_prompt(tokenizer, job: Job) -> str:
    """The prompt text exactly as the chat template renders it, one image placeholder per image."""
    return tokenizer.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
