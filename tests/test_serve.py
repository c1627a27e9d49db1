"""`splitvlm serve`: vLLM's own server on loopback, stored images answered from the store byte for byte."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner
from helpers import config
from PIL import Image

from benchmarks.servers import free_port
from splitvlm.cli.main import cli
from splitvlm.core.images import image_from_bytes
from splitvlm.core.provenance import KeyMaker
from splitvlm.decoder import Decoder
from splitvlm.decoder.cache import prompt_token_ids
from splitvlm.decoder.jobs import Job, build_prompt
from splitvlm.encoder import Encoder
from splitvlm.store import EmbeddingStore
from splitvlm.tools.samples import save_corpus

pytestmark = pytest.mark.slow
PROMPTS = ("Describe.", "请描述这张图片。")
TOKENS = 8
KEY = "test-key"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    stored = save_corpus(root / "images", 16, seed=5, sizes=[(64, 64), (96, 64), (64, 112)])
    rgba = root / "images" / "unstored_rgba.png"  # alpha: the server sends vLLM splitvlm's pixels
    Image.new("RGBA", (80, 56), (10, 200, 30, 128)).save(rgba)
    jpeg = root / "images" / "unstored.jpg"  # an RGB JPEG goes to vLLM as it came
    Image.effect_mandelbrot((72, 64), (-2, -1.2, 1, 1.2), 40).convert("RGB").save(jpeg, quality=90)
    return {"root": root, "stored": stored, "unstored": [str(rgba), str(jpeg)], "store": str(root / "store")}


def running_serve(tiny_model: str, paths: dict, name: str, *options: str):
    """`splitvlm serve` on the module's store on a free port, logging to NAME.log; stopped at the end."""
    port, log_path = free_port(), paths["root"] / f"{name}.log"
    log = open(log_path, "wb")
    cmd = [sys.executable, "-m", "splitvlm", "serve", "--model", tiny_model, "--store", paths["store"],
           "--port", str(port), "--max-model-len", "2048", *options]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CI": "1"})
    yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": log_path}
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def server(tiny_model, paths):
    """One `splitvlm serve` for the module, started first: its vLLM start overlaps the reference work."""
    yield from running_serve(tiny_model, paths, "serve", "--allowed-media-path", str(paths["root"] / "images"),
                             "--api-key", KEY, "--store-new")


@pytest.fixture(scope="module")
def server_two(tiny_model, paths):
    """A second `splitvlm serve` on the same store with two API-server processes (vLLM's --api-server-count)."""
    yield from running_serve(tiny_model, paths, "serve2", "--", "--api-server-count", "2")


def jobs_of(images: list[str]) -> list[Job]:
    return [Job(f"{Path(p).stem}.{n}", [p], [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}])
            for p in images for n, t in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def expected(tiny_model, engine, paths) -> dict:
    """What `splitvlm decode` gives for the stored jobs, and end to end (raw images) for the unstored ones."""
    cfg = config(tiny_model, Path(paths["store"]), max_tokens=TOKENS)
    assert not Encoder(cfg, engine=engine).encode(paths["stored"]).failures
    decoded = {r.id: r for r in Decoder(cfg, engine=engine).generate(jobs_of(paths["stored"]))}
    tok = engine.tokenizer()
    e2e_jobs = jobs_of(paths["unstored"])
    prompts = [{"prompt": build_prompt(tok, j), "multi_modal_data": {"image": [image_from_bytes(Path(j.images[0]).read_bytes())]}}
               for j in e2e_jobs]
    outputs = engine.generate(prompts, engine.sampling_params(TOKENS))
    e2e = {j.id: (o.outputs[0].text, list(o.outputs[0].token_ids)) for j, o in zip(e2e_jobs, outputs)}
    reference = config(tiny_model, paths["root"] / "reference", max_tokens=TOKENS)  # the encoder's own entries
    Encoder(reference, engine=engine).encode(paths["unstored"])
    return {"decode": decoded, "e2e": e2e, "tokenizer": tok, "keys": KeyMaker(cfg), "reference": reference.store,
            "engine": engine}


@pytest.fixture(scope="module")
def api(server, expected) -> httpx.Client:
    return healthy(server, httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=300))


def healthy(server: dict, client: httpx.Client) -> httpx.Client:
    """The client, once the server answers on /health (its start overlaps the reference work)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if server["proc"].poll() is not None:
            pytest.fail("splitvlm serve exited: " + server["log"].read_text(errors="replace")[-3000:])
        try:
            if client.get("/health").status_code == 200:
                return client
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail("splitvlm serve did not come up: " + server["log"].read_text(errors="replace")[-3000:])


def body(model: str, image: str, text: str, route: str = "data") -> dict:
    if route == "file":
        url = "file://" + image
    else:
        url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": TOKENS,
            "temperature": 0, "return_token_ids": True}


def requests_of(model: str, images: list[str]) -> list[tuple[str, dict]]:
    """One request per job; the second prompt of each image comes by file:// (both routes hit the store)."""
    return [(f"{Path(p).stem}.{n}", body(model, p, t, "file" if n else "data")) for p in images for n, t in enumerate(PROMPTS)]


def answer(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    return {"text": choice["message"]["content"], "token_ids": choice["token_ids"],
            "finish_reason": choice["finish_reason"], "prompt_token_ids": data["prompt_token_ids"]}


def counters(api: httpx.Client) -> dict[str, float]:
    lines = [line.split() for line in api.get("/metrics").text.splitlines() if line.startswith("splitvlm_")]
    return {name.removeprefix("splitvlm_").removesuffix("_total"): float(value) for name, value in lines}


def collapse(ids: list[int], pad: int) -> list[int]:
    return [t for i, t in enumerate(ids) if t != pad or i == 0 or ids[i - 1] != pad]


@pytest.fixture(scope="module")
def sequential(api, tiny_model, paths) -> tuple[dict, dict, dict]:
    before = counters(api)
    answers = {job_id: answer(api.post("/v1/chat/completions", json=b)) for job_id, b in requests_of(tiny_model, paths["stored"])}
    return answers, before, counters(api)


def test_stored_images_give_decode_bytes_without_the_tower(sequential, expected):
    answers, before, after = sequential
    decoded = expected["decode"]
    assert len(answers) == 32 and set(answers) == set(decoded)
    for job_id, got in answers.items():
        want = decoded[job_id]
        assert want.error is None, want.error
        assert got["text"].encode() == want.text.encode(), job_id
        assert got["token_ids"] == want.token_ids and got["finish_reason"] == want.finish_reason, job_id
        assert len(got["prompt_token_ids"]) == want.prompt_tokens, job_id
    assert after["tower_images"] - before["tower_images"] == 0
    assert after["store_hits"] - before["store_hits"] == 32
    assert after["store_embeds"] - before["store_embeds"] == 32  # as embeddings: no image processing either
    assert after["store_misses"] == before["store_misses"]
    assert len({a["text"] for a in answers.values()}) > 16  # outputs differ by image and prompt


def test_chat_template_gives_build_prompt(sequential, expected, paths):
    """vLLM's chat template path renders the prompt decode's build_prompt renders (images collapsed)."""
    answers, tok = sequential[0], expected["tokenizer"]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for job in jobs_of(paths["stored"]):
        assert collapse(answers[job.id]["prompt_token_ids"], pad) == prompt_token_ids(tok, build_prompt(tok, job)), job.id


def test_concurrent_requests_give_the_sequential_bytes(api, sequential, tiny_model, paths):
    answers = sequential[0]
    requests = requests_of(tiny_model, paths["stored"])

    async def all_at_once():
        async with httpx.AsyncClient(base_url=str(api.base_url), headers=dict(api.headers), timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for _, b in requests))

    responses = asyncio.run(all_at_once())
    assert len(responses) == 32
    for (job_id, _), response in zip(requests, responses):
        got = answer(response)
        assert got["text"].encode() == answers[job_id]["text"].encode() and got["token_ids"] == answers[job_id]["token_ids"], job_id


def test_two_api_servers_give_the_same_bytes_and_count_in_both(server_two, sequential, tiny_model, paths):
    """With --api-server-count 2 each frontend process keys, reads and hands over stored images, and
    /metrics sums the counters of both (vLLM then serves /metrics from its multiprocess registry)."""
    client = healthy(server_two, httpx.Client(base_url=server_two["url"], timeout=300))
    requests = [(f"{Path(p).stem}.0", body(tiny_model, p, PROMPTS[0])) for p in paths["stored"][:12]]
    before = counters(client)

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server_two["url"], timeout=300) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for _, b in requests))

    responses = asyncio.run(all_at_once())
    after = counters(client)
    for (job_id, _), response in zip(requests, responses):
        got = answer(response)
        assert got["text"].encode() == sequential[0][job_id]["text"].encode(), job_id
        assert got["token_ids"] == sequential[0][job_id]["token_ids"], job_id
    assert after["store_hits"] - before["store_hits"] == 12 and after["store_embeds"] - before["store_embeds"] == 12
    assert after["tower_images"] == before["tower_images"]
    assert server_two["log"].read_text(errors="replace").count("Started server process") == 2  # uvicorn, per frontend


def test_unstored_images_equal_end_to_end_and_are_stored(api, expected, tiny_model, paths):
    before = counters(api)
    requests = requests_of(tiny_model, paths["unstored"])
    first = {job_id: answer(api.post("/v1/chat/completions", json=b)) for job_id, b in requests}
    middle = counters(api)
    for job_id, got in first.items():
        text, token_ids = expected["e2e"][job_id]
        assert got["text"].encode() == text.encode() and got["token_ids"] == token_ids, job_id
    assert middle["tower_images"] - before["tower_images"] == 2
    assert middle["stored_new"] - before["stored_new"] == 2
    with EmbeddingStore(paths["store"], readonly=True) as served, EmbeddingStore(expected["reference"], readonly=True) as ref:
        for image in paths["unstored"]:  # what --store-new kept is what `splitvlm encode` stores
            key = expected["keys"](Path(image).read_bytes())
            assert torch.equal(served.get(key).image_embeds, ref.get(key).image_embeds), image
    again = {job_id: answer(api.post("/v1/chat/completions", json=b)) for job_id, b in requests}
    after = counters(api)
    assert again == first  # the tower's output in flight == the same output stored and handed back as embeddings
    assert after["tower_images"] == middle["tower_images"] and after["store_hits"] - middle["store_hits"] == 4
    assert after["store_embeds"] - middle["store_embeds"] == 4


def test_a_request_with_stored_and_unstored_images(api, expected, tiny_model, paths, tmp_path):
    """vLLM takes a request's images all as images or all as embeddings: one unstored image sends the
    stored one through the connector (no tower for it), and the answer equals end to end."""
    fresh = tmp_path / "fresh.png"
    Image.effect_mandelbrot((64, 80), (-1.5, -1, 0.5, 1), 30).convert("RGB").save(fresh)
    images = [paths["stored"][3], str(fresh)]
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode()}}
               for p in images] + [{"type": "text", "text": "Compare."}]
    request = {"model": tiny_model, "messages": [{"role": "user", "content": content}], "max_tokens": TOKENS,
               "temperature": 0, "return_token_ids": True}
    before = counters(api)
    got = answer(api.post("/v1/chat/completions", json=request))
    after = counters(api)
    assert after["store_hits"] - before["store_hits"] == 1 and after["store_embeds"] == before["store_embeds"]
    assert after["tower_images"] - before["tower_images"] == 1
    job = Job("mixed", images, [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}])
    tok, engine = expected["tokenizer"], expected["engine"]
    prompt = {"prompt": build_prompt(tok, job), "multi_modal_data": {"image": [image_from_bytes(Path(p).read_bytes()) for p in images]}}
    output = engine.generate([prompt], engine.sampling_params(TOKENS))[0].outputs[0]
    assert got["text"].encode() == output.text.encode() and got["token_ids"] == list(output.token_ids)


def test_refusals_are_4xx_and_the_server_stays_up(api, server, sequential, tiny_model, paths):
    image = paths["stored"][0]
    bad = body(tiny_model, image, "Describe.")
    bad["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(b"no image").decode()
    cases = {
        "bad image": (bad, 400, "not an image"),
        "unknown model": (body("no-such-model", image, "Describe."), 404, "does not exist"),
        "file outside": (body(tiny_model, "/etc/passwd", "Describe.", "file"), 400, "allowed-local-media-path"),
        "oversized": (body(tiny_model, image, "word " * 3000), 400, "maximum context length"),
    }
    for name, (request, status, words) in cases.items():
        response = api.post("/v1/chat/completions", json=request)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.text)
    unauthorized = httpx.post(server["url"] + "/v1/chat/completions", json=body(tiny_model, image, "Describe."))
    assert unauthorized.status_code == 401
    job_id, good = requests_of(tiny_model, [image])[0]
    assert answer(api.post("/v1/chat/completions", json=good)) == sequential[0][job_id]


def test_usage_errors_before_any_engine(tiny_model, engine, tmp_path):
    from splitvlm.serve.server import ServeOptions, UsageError, prepare

    result = CliRunner().invoke(cli, ["serve", "--model", tiny_model, "--store", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no store there" in result.output
    cfg = config(tiny_model, tmp_path / "none")
    for extra in (["--enable-prefix-caching"], ["--chat-template", "x"], ["--no-such-option"]):
        with pytest.raises(UsageError):
            prepare(ServeOptions(cfg, extra=extra))
