"""`splitvlm demo` at reduced size on the shared engine: all jobs identical, exit 0, reruns reuse the store."""

from __future__ import annotations

import functools
import json

import pytest
from click.testing import CliRunner

from splitvlm.cli.main import cli
from splitvlm.tools import demo


@pytest.fixture()
def shared_engine_demo(monkeypatch, tiny_model, engine):
    """Make `splitvlm demo` use the session's tiny model and engine instead of building its own."""
    monkeypatch.setattr(demo, "run_demo", functools.partial(demo.run_demo, model_dir=tiny_model, engine=engine))


def test_demo_command_proves_every_job_identical(shared_engine_demo, tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(workdir), "--images", "3", "--max-tokens", "8",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    jobs = 3 * len(demo.PROMPTS) + 1  # every image with every prompt, plus the two-image job
    lines = result.stdout.splitlines()
    assert f"identical {jobs}/{jobs}" in lines
    assert lines[-1].startswith("all identical")
    assert f"store:   {workdir / 'store'}" in lines

    report = json.loads((workdir / "report.json").read_text(encoding="utf-8"))
    assert report["ok"] and report["total"] == jobs and report["embeddings_checked"] == 3
    outputs = [json.loads(line) for line in (workdir / "outputs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["id"] for o in outputs] == [j["id"] for j in report["jobs"]]
    assert all(o["token_ids"] and o["error"] is None for o in outputs)
    assert len({o["sha256"] for o in outputs}) > jobs // 2  # the model reacts to image and prompt
    if demo.has_matplotlib():
        assert (workdir / "images" / "grace_hopper.jpg").is_file()


def test_demo_rerun_reuses_the_store(tiny_model, engine, tmp_path):
    lines: list[str] = []
    run = functools.partial(demo.run_demo, tmp_path / "demo", images=2, max_tokens=4, model_dir=tiny_model,
                            engine=engine, echo=lines.append, show_progress=False)
    first = run()
    lines.clear()
    second = run()
    assert first.ok and second.ok and second.jobs == first.jobs == 2 * len(demo.PROMPTS) + 1
    printed = "\n".join(lines).splitlines()
    assert any(line.startswith("[encode]  encoded 0, skipped 2 already stored") for line in printed)
    assert f"identical {second.jobs}/{second.jobs}" in printed


def test_corpus_has_a_photograph_and_grows_with_synthetic_images(tmp_path):
    paths = demo.write_corpus(tmp_path / "images", len(demo.CORPUS) + 2)
    assert len(paths) == len(demo.CORPUS) + 2 and all(p.stat().st_size > 0 for p in paths)
    assert paths[-1].name == "synthetic_001.png"
    if demo.has_matplotlib():
        assert paths[0].name == "grace_hopper.jpg"
    assert demo.write_jobs(tmp_path / "jobs.jsonl", paths[:1]) == len(demo.PROMPTS)  # no pair job for one image


def test_fresh_refuses_a_folder_the_demo_did_not_make(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path), "--fresh"])
    assert result.exit_code != 0
    assert precious.read_text() == "keep me"
