"""The API server's side of `splitvlm serve`: an ASGI middleware (vLLM's --middleware) that puts a chat
request's stored images in as their stored embeddings, or else gives its images their store keys, signed,
and hands vLLM bytes that decode to splitvlm's pixels."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
from pathlib import Path
from typing import Any

from vllm.multimodal.media.base import MediaIO

from splitvlm.core.errors import SplitVLMError, first_line
from splitvlm.core.families import read_config
from splitvlm.core.images import image_from_bytes, read_image_bytes
from splitvlm.core.provenance import Provenance
from splitvlm.serve.lookup import StoreAccess, expect_of
from splitvlm.serve.metrics import with_counters
from splitvlm.serve.settings import XARG, Counts, ServeSettings, secret, sign
from splitvlm.serve.stash import Stash, install
from splitvlm.store.key import image_digest

CHAT_PATH = "/v1/chat/completions"
IMAGE_PARTS = ("image_url", "input_image")
REFUSED_PARTS = ("image_embeds", "image_pil")
PASSTHROUGH_FORMATS = ("JPEG", "PNG", "WEBP")  # RGB files that vLLM's loader decodes to splitvlm's pixels


class RequestError(Exception):
    """A request refused with 400 before vLLM sees it; the message names the image."""


class RawBytes(MediaIO[bytes]):
    """vLLM's media fetching (data, file under --allowed-local-media-path, http) returning the bytes."""

    def load_bytes(self, data: bytes) -> bytes:
        return data

    def load_base64(self, media_type: str, data: str) -> bytes:
        return base64.b64decode(data, validate=True)

    def load_file(self, filepath: Path) -> bytes:
        return read_image_bytes(filepath)


def canonical(data: bytes, name: str, loader: str = "vllm") -> bytes | None:
    """None when vLLM decodes these bytes to the pixels splitvlm's loader gives: always under the
    default loader, which is vLLM's (tests/test_loader_vllm.py), and for an RGB JPEG, PNG or WebP under
    `scaled`; else a PNG of splitvlm's pixels (16-bit grey scaled). ImageError if the bytes are bad."""
    from PIL import Image

    image = image_from_bytes(data, name, loader)
    if loader == "vllm":
        return None
    with Image.open(io.BytesIO(data)) as raw:
        same = raw.format in PASSTHROUGH_FORMATS and raw.mode == "RGB" and not getattr(raw, "is_animated", False)
    if same:
        return None
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def tensor_text(tensor) -> str:
    """A tensor as vLLM's image_embeds parts take it: torch.save's bytes in base64."""
    import torch

    out = io.BytesIO()
    torch.save(tensor.contiguous(), out)
    return base64.b64encode(out.getvalue()).decode("ascii")


def embeds_part(entry, stash: Stash | None) -> dict:
    """An image_embeds content part holding a stored entry (the form `decode` hands vLLM: embeddings
    and the grid; vLLM's chat parser stacks the grids of a request's parts into [images, 3]): by
    reference to the stash where vLLM's loader knows it, else as torch.save bytes in base64."""
    pack = stash.put if stash is not None else tensor_text
    return {"type": "image_embeds", "image_embeds": {"image_embeds": pack(entry.image_embeds),
                                                     "image_grid_thw": pack(entry.image_grid_thw.reshape(3))}}


def _url(part: dict) -> Any:
    value = part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value


def _set_url(part: dict, url: str) -> None:
    if isinstance(part.get("image_url"), dict):
        part["image_url"]["url"] = url
    else:
        part["image_url"] = url


def _image_parts(body: dict) -> list[dict]:
    parts = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") in REFUSED_PARTS:
                raise RequestError(f"content part type {part['type']!r}: splitvlm serve takes images as image_url")
            if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                parts.append(part)
    return parts


class StoreKeys:
    """Pure ASGI middleware; the outermost one, so it checks the API key itself before any work."""

    def __init__(self, app):
        from vllm.multimodal.media.connector import MediaConnector

        self.app = app
        self.settings = ServeSettings.from_env()
        self.provenance = Provenance(**self.settings.provenance)
        self.loader = json.loads(self.provenance.preprocess_json).get("image_loader", "vllm")
        self.secret = secret()
        self.media = MediaConnector(allowed_local_media_path=self.settings.allowed_media_path,
                                    allowed_media_domains=self.settings.allowed_media_domains)
        self.access = StoreAccess(self.settings, expect_of(read_config(self.settings.model), self.provenance.dtype))
        self.counts = Counts(self.settings.run_dir, "api")
        self.stash: Stash | None = Stash()
        if not install(self.stash):
            self.stash = None
        key = os.environ.get("VLLM_API_KEY")
        self.api_key = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", "")) if scope["type"] == "http" else ""
        if path.rstrip("/") == "/metrics" and scope.get("method") == "GET":
            return await with_counters(self.app, scope, receive, send, self.settings.run_dir)
        if scope["type"] != "http" or scope.get("method") != "POST" or path != CHAT_PATH:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self._authorized(headers):
            return await self.app(scope, receive, send)  # vLLM answers 401
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            body = await self.rewrite(body)
        except RequestError as exc:
            return await _error(send, str(exc))
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def rewrite(self, raw: bytes) -> bytes:
        """The request with its images keyed and signed; unchanged when it carries no images."""
        try:
            body = json.loads(raw)
        except ValueError:
            return raw  # vLLM says what is wrong with it
        if not isinstance(body, dict):
            return raw
        xargs = body.get("vllm_xargs")
        had_xarg = isinstance(xargs, dict) and xargs.pop(XARG, None) is not None
        parts = _image_parts(body)
        if not parts and not had_xarg:
            return raw
        fetched = await asyncio.gather(*(self._fetch(part, n) for n, part in enumerate(parts, 1)))
        refs = [(self.provenance.key_of_digest(digest), digest.hex()) for _, digest in fetched]
        stored = await asyncio.to_thread(self._stored, [key for key, _ in refs]) if parts else None
        if stored is not None:  # vLLM takes them as they are: no image decoding, no processor, no tower
            for part, new in zip(parts, stored):
                part.clear()
                part.update(new)
        else:  # vLLM takes all of a request's images as images or all as embeddings: the tower or the connector
            await asyncio.gather(*(self._as_image(part, data, n) for n, (part, (data, _)) in enumerate(zip(parts, fetched), 1)))
        if parts and self.secret is not None:
            body["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}),
                                  XARG: sign(self.secret, refs, embedded=stored is not None)}
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    def _stored(self, keys: list[str]) -> list[dict] | None:
        """image_embeds parts for the keys when every one is stored and passes decode's checks; else None."""
        entries = []
        for key in keys:
            entry = self.access.entry(key)
            if entry is None:
                return None
            entries.append(entry)
        parts = [embeds_part(entry, self.stash) for entry in entries]
        self.counts.add("store_hits", len(parts))
        self.counts.add("store_embeds", len(parts))
        self.counts.flush()
        return parts

    async def _fetch(self, part: dict, n: int) -> tuple[bytes, bytes]:
        """One image's bytes, fetched as vLLM would, and their blake3 digest."""
        from vllm import envs

        url = _url(part)
        if not isinstance(url, str) or not url:
            raise RequestError(f"image {n}: no url")
        try:
            data = await self.media.load_from_url_async(url, RawBytes(), fetch_timeout=envs.VLLM_IMAGE_FETCH_TIMEOUT)
        except Exception as exc:  # not allowed, not found, not base64, an http error: vLLM's own message
            raise RequestError(f"image {n}: {first_line(exc)}") from None
        return data, image_digest(data)

    async def _as_image(self, part: dict, data: bytes, n: int) -> None:
        """Give vLLM bytes that decode to splitvlm's pixels, as a data: URL (vLLM reads no file or URL again)."""
        try:
            replaced = await asyncio.to_thread(canonical, data, f"image {n}", self.loader)
        except SplitVLMError as exc:
            raise RequestError(str(exc)) from None
        if replaced is not None:
            _set_url(part, "data:image/png;base64," + base64.b64encode(replaced).decode("ascii"))
        elif not _url(part)[:5].lower() == "data:":
            _set_url(part, "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii"))
        part.pop("uuid", None)  # vLLM would key its encoder cache by a client's uuid: another client's image


async def _error(send, message: str, status: int = 400) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
