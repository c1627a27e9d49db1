"""The demo: a small corpus encoded, decoded from the store and proven identical to end-to-end, on the tiny model."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from splitvlm.core.errors import SplitVLMError
from splitvlm.tools import samples

DEFAULT_WORKDIR = ".splitvlm/demo"
MARKER = ".splitvlm-demo"  # marks a folder as demo output: --fresh deletes only such folders
PROMPTS = {
    "describe": samples.PROMPTS[0],
    "zh": samples.PROMPTS[2],
    "colours": samples.PROMPTS[1],
}
PAIR_PROMPT = "What differs between these two images?"
Echo = Callable[[str], None]


# -- real pictures shipped with matplotlib (mpl-data/sample_data) --
def _sample(name: str) -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))


def _copy_sample(name: str) -> Callable[[Path], None]:
    return lambda out: out.write_bytes(_sample(name).read_bytes())


def _mri_slice(out: Path) -> None:
    """s1045.ima.gz: a 256x256 big-endian 16-bit MRI slice of a head, scaled to 8-bit grey."""
    raw = np.frombuffer(gzip.decompress(_sample("s1045.ima.gz").read_bytes()), ">u2").reshape(256, 256)
    grey = np.clip(raw.astype(np.float64) / np.percentile(raw, 99.5) * 255, 0, 255)
    Image.fromarray(np.rint(grey).astype(np.uint8), mode="L").save(out)


def _fault_relief(out: Path) -> None:
    """jacksboro_fault_dem.npz: a measured elevation model, rendered as shaded relief."""
    import matplotlib
    from matplotlib.colors import LightSource

    with np.load(_sample("jacksboro_fault_dem.npz")) as dem:
        elevation = dem["elevation"]
    rgb = LightSource(azdeg=315, altdeg=45).shade(
        elevation, cmap=matplotlib.colormaps["gist_earth"], vert_exag=0.05, blend_mode="overlay")
    Image.fromarray(np.rint(rgb[..., :3] * 255).astype(np.uint8)).save(out)


def _generated(make: Callable[[], Image.Image]) -> Callable[[Path], None]:
    return lambda out: make().save(out)


# name, needs matplotlib, writer; interleaved so that a small --images still gets a photograph
CORPUS: list[tuple[str, bool, Callable[[Path], None]]] = [
    ("grace_hopper.jpg", True, _copy_sample("grace_hopper.jpg")),
    ("red_square.png", False, _generated(samples.red_square)),
    ("mri_head.png", True, _mri_slice),
    ("rainbow_flag.png", False, _generated(samples.rainbow_flag)),
    ("present.png", True, _copy_sample("Minduka_Present_Blue_Pack.png")),
    ("blue_circle.png", False, _generated(samples.blue_circle)),
    ("fault_relief.png", True, _fault_relief),
    ("matplotlib_logo.png", True, _copy_sample("logo2.png")),
]


def has_matplotlib() -> bool:
    try:
        import matplotlib.cbook  # noqa: F401
    except ImportError:
        return False
    return True


def write_corpus(folder: Path, n: int) -> list[Path]:
    """The first n demo images in folder (kept when already there), then synthetic ones as needed."""
    folder.mkdir(parents=True, exist_ok=True)
    usable = [(name, write) for name, needs_mpl, write in CORPUS if has_matplotlib() or not needs_mpl]
    i = 0
    while len(usable) < n:
        usable.append((f"synthetic_{i:03d}.png", _generated(lambda i=i: samples.synthetic_image(i))))
        i += 1
    paths = []
    for name, write in usable[:n]:
        path = folder / name
        if not path.exists():
            tmp = path.with_name(f".tmp-{name}")
            write(tmp)
            tmp.replace(path)
        paths.append(path)
    return paths


def write_jobs(path: Path, images: list[Path]) -> int:
    """Every image with every prompt, plus one job with two images; paths relative to the jobs file."""
    rel = [str(p.relative_to(path.parent)) for p in images]
    jobs = [{"id": f"{Path(r).stem}.{tag}", "images": [r], "prompt": prompt}
            for r in rel for tag, prompt in PROMPTS.items()]
    if len(rel) >= 2:
        jobs.append({"id": "pair.compare", "images": rel[:2], "prompt": PAIR_PROMPT})
    path.write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs), encoding="utf-8")
    return len(jobs)


def prepare_workdir(workdir: Path, fresh: bool) -> None:
    """Make the workdir; refuse to write into (or, with fresh, to delete) a folder the demo did not make."""
    if workdir.exists():
        if not workdir.is_dir():
            raise SplitVLMError(f"{workdir}: not a folder")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise SplitVLMError(f"{workdir} is not empty and was not made by `splitvlm demo`; choose another --workdir")
        if fresh:
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `splitvlm demo`; safe to delete\n")


def tiny_model(model_dir: Path, echo: Echo) -> None:
    from splitvlm.tools.make_model import human_count, make_model, read_marker

    info = read_marker(model_dir)
    if info is None:
        t0 = time.perf_counter()
        make_model("tiny", str(model_dir))
        info = read_marker(model_dir) or {}
        verb = f"built in {time.perf_counter() - t0:.1f} s"
    else:
        verb = "reused"
    echo(f"[model]   {verb}: {info.get('arch', '?')} Qwen2-VL with random weights, "
         f"{human_count(info.get('parameters', 0))} parameters, in {model_dir}")


@dataclass
class DemoResult:
    workdir: Path
    jobs: int
    identical: int
    ok: bool
    seconds: float

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    @property
    def outputs(self) -> Path:
        return self.workdir / "outputs.jsonl"

    @property
    def report(self) -> Path:
        return self.workdir / "report.json"


def run_demo(workdir: str | Path = DEFAULT_WORKDIR, images: int = 10, max_tokens: int = 24, fresh: bool = False,
             model_dir: str | Path | None = None, engine=None, echo: Echo = print,
             show_progress: bool = True) -> DemoResult:
    """Encode a corpus, decode jobs from the store, verify split == end-to-end; one vLLM engine for all.

    model_dir and engine (its Config's model must be model_dir) let a caller that already has both,
    such as the tests, skip building the tiny model and starting vLLM.
    """
    from splitvlm.core.config import Config
    from splitvlm.decoder import Decoder, read_jobs
    from splitvlm.encoder import Encoder
    from splitvlm.verify import verify

    if images < 1:
        raise SplitVLMError("--images must be at least 1")
    t_start = time.perf_counter()
    root = Path(workdir)
    prepare_workdir(root, fresh)
    if model_dir is None:
        model_dir = root / "model"
        tiny_model(model_dir, echo)
    if engine is not None and Path(engine.cfg.model).resolve() != Path(model_dir).resolve():
        raise SplitVLMError(f"the engine runs {engine.cfg.model}, not {model_dir}")

    paths = write_corpus(root / "images", images)
    n_jobs = write_jobs(root / "jobs.jsonl", paths)
    real = sum(name == p.name and needs_mpl for p in paths for name, needs_mpl, _ in CORPUS)
    echo(f"[corpus]  {len(paths)} images ({real} from matplotlib's sample data, {len(paths) - real} generated) "
         f"x {len(PROMPTS)} prompts{' + 1 two-image job' if len(paths) >= 2 else ''} = {n_jobs} jobs "
         f"in {root / 'jobs.jsonl'}")
    if not has_matplotlib():
        echo("          (matplotlib is not installed, so its sample pictures are left out)")

    cfg = Config(model=str(model_dir), store=str(root / "store"), max_tokens=max_tokens, max_model_len=2048,
                 gpu_memory_utilization=0.3, show_progress=show_progress)
    if engine is None:
        from splitvlm.core.engine import Engine

        t0 = time.perf_counter()
        engine = Engine(cfg)
        env = engine.environment()
        echo(f"[engine]  vLLM {env['vllm']} on {env['device']}, profile {cfg.profile}, "
             f"started in {time.perf_counter() - t0:.1f} s")

    stats = Encoder(cfg, engine=engine).encode([str(root / "images")])
    echo(f"[encode]  {stats.summary()}")
    for failure in stats.failures:
        echo(f"          failed: {failure['error']}")

    jobs = read_jobs(str(root / "jobs.jsonl"))
    decoder = Decoder(cfg, engine=engine)
    results = decoder.generate(jobs)
    result = DemoResult(root, n_jobs, 0, False, 0.0)
    with open(result.outputs, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results)
    echo(f"[decode]  {decoder.stats.summary()}")

    report = verify(cfg, jobs, report_path=str(result.report), engine=engine)
    distinct = len({j.tokens_sha256 for j in report.jobs})
    took = ", ".join(f"{name.replace('_', '-')} {s:.1f} s" for name, s in report.seconds.items())
    echo(f"[verify]  split (stored embeddings) vs end-to-end (raw images) in one engine: {report.identical}/"
         f"{report.total} jobs, {report.embeddings_identical}/{report.embeddings_checked} re-encoded embeddings "
         f"identical; {distinct} distinct outputs; {took}")
    echo(report.table())
    result.identical, result.ok = report.identical, report.ok
    result.seconds = time.perf_counter() - t_start
    echo(f"store:   {result.store}")
    echo(f"outputs: {result.outputs}")
    echo(f"report:  {result.report}")
    echo("(the text is gibberish: the tiny model's weights are random; what counts is that the bytes match)")
    echo(f"{'all identical' if result.ok else 'NOT all identical'}; {result.seconds:.1f} s in all")
    return result
