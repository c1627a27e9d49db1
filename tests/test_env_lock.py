"""`splitvlm env --lock F`: a run under the lock passes; another environment, or entries made in one, are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import config, write_jobs

from splitvlm.cli.env_cmd import command as env_cli
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.identity import environment
from splitvlm.core.lock import LOCKED, current, read_lock
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.encoder import Encoder
from splitvlm.store import EmbeddingStore, Entry
from splitvlm.tools.samples import save_corpus
from splitvlm.verify import verify


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("lock") / "imgs", 2, seed=6, sizes=[(64, 64)])


@pytest.fixture()
def lock(tmp_path) -> str:
    path = str(tmp_path / "env.lock")
    result = CliRunner().invoke(env_cli, ["--lock", path])
    assert result.exit_code == 0, result.output
    return path


def edit(path: str, **fields: str) -> None:
    data = json.loads(open(path).read())
    data["environment"].update(fields)
    open(path, "w").write(json.dumps(data))


def test_env_prints_and_writes_the_versions(lock):
    out = CliRunner().invoke(env_cli, [])
    env = environment()
    for name in LOCKED:
        assert any(line.split()[0] == name and line.endswith(env[name]) for line in out.output.splitlines())
    assert read_lock(lock) == current() and set(current()) == set(LOCKED)
    assert json.loads(CliRunner().invoke(env_cli, ["--json"]).output) == current()


def test_run_under_its_lock_passes_and_a_changed_lock_is_refused(tiny_model, engine, images, lock, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=6, lock=lock)
    assert Encoder(cfg, engine=engine).encode(images).encoded == 2
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "images": [images[0]], "prompt": "Describe."}]))
    assert Decoder(cfg, engine=engine).generate(jobs)[0].error is None
    assert verify(cfg, jobs, engine=engine).ok
    here = environment()["vllm"]
    edit(lock, vllm="0.26.0", device="some other device")
    for run in (lambda: Encoder(cfg, engine=engine), lambda: Decoder(cfg, engine=engine),
                lambda: verify(cfg, jobs, engine=engine)):
        with pytest.raises(SplitVLMError) as err:
            run()
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"lock {lock}: vllm 0.26.0 here {here}; device some other device here ")


def test_entries_made_elsewhere_are_refused_unless_allowed(tiny_model, engine, images, lock, tmp_path, capsys):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=6, lock=lock)
    Encoder(cfg, engine=engine).encode(images[:1])
    with EmbeddingStore(cfg.store) as store:
        (key,) = store.keys()
        entry = store.get(key)
        meta = {**entry.meta, "torch_version": "1.0.0"}  # the lock also pins torch, unlike the check without one
        store.put(Entry(key, entry.image_embeds.clone(), entry.image_grid_thw.clone(), meta), overwrite=True)
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [{"id": n, "images": [images[0]], "prompt": "Describe."}
                                                          for n in ("a", "b")]))
    refused = Decoder(cfg, engine=engine).generate(jobs)  # each job's own error, not the run's
    assert all(key in r.error and f"torch 1.0.0, lock {environment()['torch']}" in r.error for r in refused)
    assert Decoder(cfg.replace(lock=None), engine=engine).generate(jobs)[0].error is None  # today's check: vLLM, device
    capsys.readouterr()
    results = Decoder(cfg.replace(allow_mismatch=True), engine=engine).generate(jobs)
    assert all(r.error is None for r in results)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and key in warnings[0]  # once per entry, not per job and "torch 1.0.0" in warnings[0]


@pytest.mark.parametrize("text, says", [
    ("not json", "not JSON"),
    ('{"format": "other", "environment": {}}', "not a splitvlm lock file"),
    ('{"format": "splitvlm.lock/1", "environment": {"gpu": "x"}}', "unknown field(s) gpu"),
])
def test_bad_lock_files(tmp_path, text, says):
    path = tmp_path / "bad.lock"
    path.write_text(text)
    with pytest.raises(SplitVLMError) as err:
        read_lock(str(path))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_before_starting_vllm(tiny_model, lock, tmp_path):
    edit(lock, torch="0.0.1")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "prompt": "Hi."}])
    out = subprocess.run([sys.executable, "-m", "splitvlm.cli.main", "decode", "--model", tiny_model,
                          "--store", str(tmp_path / "s"), "--jobs", jobs, "--out", str(tmp_path / "o.jsonl"),
                          "--lock", lock, "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: lock {lock}: torch 0.0.1 here {environment()['torch']}"
