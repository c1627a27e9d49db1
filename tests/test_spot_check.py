"""Spot checks: a seeded, reproducible share of jobs also runs end to end; a one-ulp change is named."""

from __future__ import annotations

import json

import pytest
from helpers import config, flip_one_ulp, write_jobs

from splitvlm.cli.decode_cmd import end_to_end_runner
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.provenance import KeyMaker
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.decoder.spot_check import chosen, spot_check
from splitvlm.encoder import Encoder
from splitvlm.tools.samples import save_corpus


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_corpus(tmp_path_factory.mktemp("spot") / "imgs", 3, seed=4, sizes=[(64, 64), (96, 80)])


@pytest.fixture()
def cfg(tiny_model, engine, images, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=12)
    Encoder(cfg, engine=engine).encode(images)
    return cfg


@pytest.fixture()
def jobs_file(images, tmp_path):
    return write_jobs(tmp_path / "jobs.jsonl", [
        {"id": f"{n}-{p}", "images": [path], "prompt": prompt}
        for n, path in enumerate(images) for p, prompt in enumerate(["Describe.", "What colours?"])
    ] + [{"id": "pair", "images": images[:2], "prompt": "Compare."}])


def test_choice_is_seeded_reproducible_and_about_the_share():
    ids = [f"job{i}" for i in range(2000)]
    picked = {s: {i for i in ids if chosen(i, 0.25, s)} for s in (0, 1)}
    assert picked[0] == {i for i in ids if chosen(i, 0.25, 0)}  # the same jobs every run
    assert picked[0] != picked[1]
    assert all(400 < len(p) < 600 for p in picked.values())
    assert all(chosen(i, 1.0, 0) for i in ids) and not any(chosen(i, 0.0, 0) for i in ids)
    # a job's fate does not depend on the other jobs: a subset picks the same ones
    assert {i for i in ids[:100] if chosen(i, 0.25, 0)} == picked[0] & set(ids[:100])


def test_spot_check_all_passes(cfg, engine, jobs_file):
    jobs = read_jobs(jobs_file)
    decoder = Decoder(cfg, engine=engine)
    results = decoder.generate(jobs)
    report = spot_check(jobs, results, 1.0, 0, end_to_end_runner(decoder))
    assert report.checked == [j.id for j in jobs] and report.identical == len(jobs)
    assert not report.mismatches and not report.errors
    assert f"{len(jobs)}/{len(jobs)} identical" in report.summary()
    line = results[0].to_json()
    assert line["spot_checked"] is True and line["spot_check_identical"] is True
    # a share: only the chosen jobs are checked and marked
    results = decoder.generate(jobs)
    report = spot_check(jobs, results, 0.5, 3, end_to_end_runner(decoder))
    assert report.checked == [j.id for j in jobs if chosen(j.id, 0.5, 3)]
    assert all((r.to_json()["spot_checked"] is True) == (r.id in report.checked) for r in results)
    with pytest.raises(SplitVLMError):
        spot_check(jobs, results, 1.5, 0, end_to_end_runner(decoder))


def test_altered_entry_fails_naming_its_jobs(cfg, engine, jobs_file, images):
    flip_one_ulp(cfg.store, KeyMaker(cfg)(open(images[1], "rb").read()))
    jobs = read_jobs(jobs_file)
    decoder = Decoder(cfg, engine=engine)
    results = decoder.generate(jobs)
    report = spot_check(jobs, results, 1.0, 0, end_to_end_runner(decoder))
    assert set(report.mismatches) == {"1-0", "1-1", "pair"}
    assert all(r.spot_check_identical is (r.id not in report.mismatches) for r in results)
    assert "MISMATCH: 1-0 (" in report.summary() and "pair (" in report.summary()
    assert "differs from a fresh encode in 1 elements" in report.mismatches["1-0"]


def test_outputs_compared_token_by_token_and_byte_by_byte():
    from splitvlm.decoder.jobs import Job
    from splitvlm.decoder.pipeline import Result

    jobs = [Job(n, [], []) for n in ("same", "tokens", "text", "failed", "skipped")]
    split = [Result(n, text="ab", token_ids=[1, 2, 3]) for n in ("same", "tokens", "text", "failed")]
    split.append(Result("skipped", error="not in the store"))
    e2e = [Result("same", text="ab", token_ids=[1, 2, 3]), Result("tokens", text="ab", token_ids=[1, 2, 4]),
           Result("text", text="ab ", token_ids=[1, 2, 3]), Result("failed", error="no source image")]
    report = spot_check(jobs, split, 1.0, 0, lambda j, k: (e2e[: len(j)], {}))
    assert report.checked == ["same", "tokens", "text", "failed"]
    assert report.mismatches == {"tokens": "first difference at token 2", "text": "text bytes differ"}
    assert report.errors == {"failed": "no source image"} and report.identical == 1
    assert [r.spot_check_identical for r in split] == [True, False, False, False, None]


def test_cli_exit_status_4_names_the_job(cfg, jobs_file, images, cli_run, tmp_path):
    flip_one_ulp(cfg.store, KeyMaker(cfg)(open(images[0], "rb").read()))
    out = tmp_path / "out.jsonl"
    run = cli_run("decode", "--model", cfg.model, "--store", cfg.store, "--jobs", jobs_file, "--out", out,
                  "--max-tokens", "12", "--max-model-len", "2048", "--no-progress", "--spot-check", "1.0")
    assert run.exit_code == 4, run.stdout[-2000:] + run.stderr[-2000:]
    assert "MISMATCH: 0-0" in run.stdout and "0-1" in run.stdout and "pair" in run.stdout
    lines = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert lines["0-0"]["spot_check_identical"] is False and lines["2-0"]["spot_check_identical"] is True
