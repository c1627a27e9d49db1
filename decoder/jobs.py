"""Jobs: read the JSONL job format and build prompts with the model's own chat template."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from splitvlm.core.errors import SplitVLMError

KEY_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Job:
    id: str
    images: list[str]  # paths or store keys, in prompt order
    messages: list[dict]  # chat messages with {"type": "image"} parts in place of the images


def _image_ref(part: dict, where: str) -> str:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise SplitVLMError(f"{where}: image_url part without a url")
        return url.removeprefix("file://")
    ref = part.get("image") or part.get("path") or part.get("key")
    if not isinstance(ref, str):
        raise SplitVLMError(f"{where}: image part without a path or key")
    return ref


def _normalise_messages(messages: list, where: str) -> tuple[list[dict], list[str]]:
    images: list[str] = []
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise SplitVLMError(f"{where}: each message needs a role and content")
        content = message.get("content", "")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            if part.get("type") in ("image", "image_url"):
                images.append(_image_ref(part, where))
                parts.append({"type": "image"})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise SplitVLMError(f"{where}: unsupported content part type {part.get('type')!r}")
        out.append({"role": message["role"], "content": parts})
    return out, images


def parse_job(obj: dict, where: str) -> Job:
    if not isinstance(obj, dict) or "id" not in obj:
        raise SplitVLMError(f"{where}: a job is a JSON object with an \"id\"")
    if "messages" in obj:
        messages, images = _normalise_messages(obj["messages"], where)
    elif "prompt" in obj:
        images = obj.get("images") or ([obj["image"]] if "image" in obj else [])
        if not all(isinstance(i, str) for i in images):
            raise SplitVLMError(f"{where}: \"images\" must be a list of paths or keys")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": str(obj["prompt"])}]
        messages = [{"role": "user", "content": content}]
    else:
        raise SplitVLMError(f"{where}: a job needs \"prompt\" (with \"images\") or \"messages\"")
    return Job(str(obj["id"]), list(images), messages)


def read_jobs(path: str) -> list[Job]:
    """Jobs of a JSONL file; relative image paths are taken from the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise SplitVLMError(f"{path}: no such jobs file")
    jobs, ids = [], set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            job = parse_job(json.loads(line), where)
        except json.JSONDecodeError as exc:
            raise SplitVLMError(f"{where}: not JSON ({exc.msg})") from None
        if job.id in ids:
            raise SplitVLMError(f"{where}: duplicate job id {job.id!r}")
        ids.add(job.id)
        job.images = [ref if is_key(ref) or Path(ref).is_absolute() else str(p.parent / ref) for ref in job.images]
        jobs.append(job)
    return jobs


def is_key(ref: str) -> bool:
    return bool(KEY_RE.match(ref)) and not Path(ref).exists()


def build_prompt(tokenizer, job: Job) -> str:
    """The prompt text exactly as the chat template renders it, one image placeholder per image."""
    return tokenizer.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
