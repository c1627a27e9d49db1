"""Input sources: URLs (a real loopback server), webdataset .tar, Parquet and datasets folders, end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import config

from splitvlm.cli.main import cli
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.provenance import KeyMaker
from splitvlm.core.sources import SourceError, image_id, iter_images, read_bytes
from splitvlm.decoder import Decoder, read_jobs
from splitvlm.decoder.jobs import JobError, parse_job
from splitvlm.encoder import Encoder
from splitvlm.encoder.inputs import Inputs
from splitvlm.store import EmbeddingStore
from splitvlm.tools.samples import save_corpus
from splitvlm.verify import verify

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # as datasets writes an Image column


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _datasets_folder(folder: Path, table: pa.Table) -> str:
    """What Dataset.save_to_disk writes, made with pyarrow alone: arrow stream files, state.json, dataset_info.json."""
    folder.mkdir()
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five image files and the same bytes in every kind of source, plus a loopback HTTP server over them."""
    root = tmp_path_factory.mktemp("sources")
    paths = save_corpus(root / "imgs", 5, seed=11, sizes=[(64, 64), (96, 72), (72, 120)])
    data = [Path(p).read_bytes() for p in paths]
    ids = [f"{i:06d}" for i in range(len(data))]
    members = [m for i, d in zip(ids, data) for m in ((f"{i}.png", d), (f"{i}.txt", b"a caption"))]
    tar = _tar(root / "shard-0001.tar", [("meta.json", b"{}"), *members])
    images = pa.array([{"bytes": d, "path": f"{i}.png"} for i, d in zip(ids, data)], type=IMAGE_TYPE)
    parquet = str(root / "data.parquet")
    pq.write_table(pa.table({"id": [f"row-{i}" for i in ids], "image": images}), parquet, row_group_size=2)
    plain = str(root / "plain.parquet")  # binary image column and id column under other names
    pq.write_table(pa.table({"name": [f"n{i}" for i in ids], "img": pa.array(data, pa.binary())}), plain)
    folder = _datasets_folder(root / "ds", pa.table({"__key__": ids, "image": images}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/imgs/{Path(p).name}" for p in paths]
    (root / "urls.txt").write_text("\n".join(urls) + "\n")
    yield {"root": root, "paths": paths, "data": data, "ids": ids, "tar": tar, "parquet": parquet, "plain": plain,
           "datasets": folder, "urls": urls, "url_list": str(root / "urls.txt"), "base": base}
    server.shutdown()
    server.server_close()


def test_every_source_resolves_to_the_files_bytes(corpus):
    data, ids = corpus["data"], corpus["ids"]
    expect = {
        "tar": [(f"{corpus['tar']}::{i}.png", i) for i in ids],
        "parquet": [(f"{corpus['parquet']}::row-{i}", f"row-{i}") for i in ids],
        "datasets": [(f"{corpus['datasets']}::{i}", i) for i in ids],
    }
    for name, refs in expect.items():
        got = list(iter_images(corpus[name]))
        assert [r for r, _ in got] == [r for r, _ in refs], name
        assert [d for _, d in got] == data, name
        assert [read_bytes(r) for r, _ in refs] == data, name  # random access by reference
        assert [image_id(r) for r, _ in refs] == [i for _, i in refs], name
    plain = list(iter_images(corpus["plain"], "img", "name"))
    assert [r for r, _ in plain] == [f"{corpus['plain']}?image=img&id=name::n{i}" for i in ids]
    assert [read_bytes(r) for r, _ in plain] == data
    assert [read_bytes(u) for u in corpus["urls"]] == data
    assert [image_id(u) for u in corpus["urls"]] == [Path(p).stem for p in corpus["paths"]]
    fsspec = pytest.importorskip("fsspec")  # pinned in requirements/cpu.txt: never skipped in CI
    with fsspec.open("memory://bucket/a.png", "wb") as f:  # fsspec's own in-memory file system: a real read
        f.write(data[0])
    assert read_bytes("memory://bucket/a.png") == data[0]


def test_unreadable_references_are_one_line_naming_them(corpus):
    base = corpus["base"]
    cases = {
        f"{base}/imgs/missing.png": "HTTP 404",
        "http://127.0.0.1:9/x.png": "cannot fetch",  # nothing listens on the discard port
        "s3fsmissing://bucket/x.png": "cannot read",
        f"{corpus['tar']}::999999.png": "no image member",
        f"{corpus['parquet']}::nope": "no row with id",
        f"{corpus['datasets']}::nope": "no row with __key__",
        f"{corpus['parquet']}?image=nope::row-000000": "no column 'nope'",
    }
    for ref, reason in cases.items():
        with pytest.raises(SourceError) as err:
            read_bytes(ref)
        assert str(err.value).startswith(ref) and reason in str(err.value) and "\n" not in str(err.value), err.value


def test_jobs_name_urls_and_members_but_not_data_urls(corpus):
    url = corpus["urls"][0]
    job = parse_job({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}}, "f:1")
    assert job.images == [url]
    with pytest.raises(JobError, match="data: URL"):
        parse_job({"id": "b", "images": ["data:image/png;base64,AAAA"], "prompt": "p"}, "f:2")


def test_jobs_command_writes_one_job_per_image(corpus, tmp_path):
    out = tmp_path / "sub" / "jobs.jsonl"
    out.parent.mkdir()
    sources = [str(corpus["root"] / "shard-*.tar"), corpus["parquet"], corpus["datasets"], corpus["url_list"], str(corpus["root"] / "imgs")]
    result = CliRunner().invoke(cli, ["jobs", "--images", *sources, "--prompt", "Describe it.", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = corpus["ids"]
    stems = [Path(p).stem for p in corpus["paths"]]
    # tar keys; parquet ids; datasets keys (taken: the reference); URL stems; file stems (taken: the reference)
    assert [j["id"] for j in lines[:5]] == ids and [j["id"] for j in lines[5:10]] == [f"row-{i}" for i in ids]
    assert [j["id"] for j in lines[15:20]] == stems and len({j["id"] for j in lines}) == 25
    relative = os.path.relpath(corpus["tar"], out.parent)
    assert lines[0]["images"] == [f"{relative}::000000.png"] and relative.startswith("../")
    assert lines[15]["images"] == [corpus["urls"][0]] and lines[0]["prompt"] == "Describe it."
    jobs = read_jobs(str(out))  # relative to the jobs file, as decode reads them
    assert all(j.error is None for j in jobs)
    assert [read_bytes(j.images[0]) for j in jobs] == corpus["data"] * 5
    stdout = CliRunner().invoke(cli, ["jobs", "--images", corpus["tar"], "--prompt", "p"])
    assert json.loads(stdout.stdout.splitlines()[0])["images"] == [f"{corpus['tar']}::000000.png"]  # absolute


def test_option_errors_come_before_any_engine(corpus, tmp_path):
    store = tmp_path / "store"
    run = CliRunner().invoke
    base = ["encode", "--model", str(tmp_path / "no-model"), "--store", str(store)]
    usage = run(cli, [*base, "--image-column", "img", str(corpus["root"] / "imgs")])
    assert usage.exit_code == 2 and "--image-column goes with .parquet or datasets" in usage.output
    ray = run(cli, [*base, "--ray", "--gpus", "0", corpus["tar"]])
    assert ray.exit_code == 2 and "without --ray" in ray.output
    jobs = run(cli, ["jobs", "--images", corpus["tar"], "--id-column", "x", "--prompt", "p"])
    assert jobs.exit_code == 2 and "--id-column goes with" in jobs.output
    # the real command line: one error line naming the file and the column, no store made, no engine
    proc = subprocess.run([sys.executable, "-m", "splitvlm", *base, "--image-column", "picture", corpus["parquet"]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {corpus['parquet']}: no column 'picture'")
    assert not store.exists()


def test_encode_decode_verify_from_every_source(tiny_model, engine, corpus, tmp_path):
    cfg = config(tiny_model, tmp_path / "store", max_tokens=4)
    keys = [KeyMaker(cfg)(d) for d in corpus["data"]]
    first = Encoder(cfg, engine=engine).encode([corpus["tar"]])
    assert first.encoded == 5 and first.inputs == 5 and first.failed == 0
    with EmbeddingStore(cfg.store) as store:
        assert set(store.keys()) == set(keys)
        assert store.get(keys[2]).meta["source"] == f"{corpus['tar']}::000002.png"
    # the same bytes from every other source give the same keys: all already stored
    for spec in (corpus["parquet"], corpus["datasets"], corpus["url_list"], str(corpus["root"] / "imgs")):
        again = Encoder(cfg, engine=engine).encode([spec])
        assert (again.skipped, again.encoded, again.failed) == (5, 0, 0), spec
    plain = Encoder(cfg, engine=engine).encode(Inputs([corpus["plain"]], image_column="img", id_column="name"))
    assert (plain.skipped, plain.encoded) == (5, 0)
    lines = []
    for n, spec in enumerate((corpus["tar"], corpus["parquet"], corpus["datasets"], corpus["url_list"])):
        out = tmp_path / f"jobs{n}.jsonl"
        assert CliRunner().invoke(cli, ["jobs", "--images", spec, "--prompt", "Describe it.", "--out", str(out)]).exit_code == 0
        lines += [{**json.loads(line), "id": f"{n}.{i}"} for i, line in enumerate(out.read_text().splitlines())]
    lines.append({"id": "bykey", "images": [keys[1]], "prompt": "Describe it."})  # verify finds its tar source
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(j) + "\n" for j in lines))
    jobs = read_jobs(str(jobs_file))
    results = Decoder(cfg, engine=engine).generate(jobs)
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert [r.keys for r in results] == [[k] for k in keys] * 4 + [[keys[1]]]
    tokens = [r.token_ids for r in results]
    assert tokens[:5] == tokens[5:10] == tokens[10:15] == tokens[15:20] and tokens[20] == tokens[1]
    assert len({tuple(t) for t in tokens[:5]}) > 1  # the outputs do depend on the image
    report = verify(cfg, jobs, engine=engine)
    assert report.ok and report.identical == 21 and report.embeddings_identical == 5, report.table()


def test_a_bad_member_is_one_line_and_the_rest_are_stored(tiny_model, engine, corpus, tmp_path, capsys):
    data = corpus["data"]
    tar = _tar(tmp_path / "mixed.tar", [("a.png", data[0]), ("b.png", b"not an image"), ("c.png", b""),
                                        ("d.png", data[1])])
    with tarfile.open(tar, "a") as t:  # a link member with an image's name
        link = tarfile.TarInfo("e.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        t.addfile(link)
    parquet = str(tmp_path / "gaps.parquet")
    images = pa.array([{"bytes": data[2], "path": None}, None, {"bytes": data[3], "path": None}], type=IMAGE_TYPE)
    pq.write_table(pa.table({"id": ["x", "y", "x"], "image": images}), parquet)
    missing = f"{corpus['base']}/imgs/gone.png"
    failures = tmp_path / "failures.jsonl"
    cfg = config(tiny_model, tmp_path / "store", failures=str(failures))
    capsys.readouterr()
    stats = Encoder(cfg, engine=engine).encode([tar, parquet, missing, corpus["urls"][4]])
    bad = [f"{tar}::b.png", f"{tar}::c.png", f"{tar}::e.png", f"{parquet}::y", f"{parquet}::x", missing]
    assert (stats.inputs, stats.encoded, stats.failed) == (10, 4, 6)
    recorded = [json.loads(line) for line in failures.read_text().splitlines()]
    assert sorted(f["path"] for f in recorded) == sorted(bad)
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 6 and all(any(line.startswith(f"skipped {ref}: ") for ref in bad) for line in skipped)
    with EmbeddingStore(cfg.store) as store:
        assert set(store.keys()) == {KeyMaker(cfg)(d) for d in (data[0], data[1], data[2], data[4])}
    fake = tmp_path / "fake.tar"
    fake.write_bytes(b"not a tar" * 100)
    with pytest.raises(SplitVLMError, match="fake.tar: not a tar file"):  # the whole input: refused before any work
        Encoder(cfg, engine=engine).encode([str(fake)])


def test_a_folder_written_by_hf_datasets(corpus, tmp_path):
    """A real `datasets.Dataset.save_to_disk` folder (an Image column, an id column) reads as the files' bytes."""
    datasets = pytest.importorskip("datasets")  # pinned in requirements/cpu.txt: never skipped in CI

    data, ids = corpus["data"], corpus["ids"]
    table = datasets.Dataset.from_dict({"id": ids, "image": [{"bytes": d, "path": None} for d in data]})
    table = table.cast_column("image", datasets.Image())
    folder = tmp_path / "hf_dataset"
    table.save_to_disk(str(folder))
    got = list(iter_images(str(folder)))
    assert [r for r, _ in got] == [f"{folder}::{i}" for i in ids]
    assert [d for _, d in got] == data
    assert read_bytes(f"{folder}::{ids[2]}") == data[2]

