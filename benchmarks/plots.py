"""Small PNG plots of the benchmark results: encoder images/s by image size, decode speedup by length.

    python -m benchmarks.plots [--results benchmarks/results] [--out docs/img]

Every bench_encode*.json and bench_decode*.json in the results folder becomes one series
(labelled by device and profile); a plot whose results are missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS

DOCS_IMG = Path(__file__).parents[1] / "docs" / "img"
ENCODE_PNG = "encode_images_per_s_by_size.png"
DECODE_PNG = "decode_speedup_by_max_tokens.png"


def load(results: Path, prefix: str) -> list[dict]:
    """The readable reports named prefix*.json, in name order."""
    reports = []
    for path in sorted(results.glob(f"{prefix}*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipped {path}: {exc}")
            continue
        if report.get("benchmark", prefix) == prefix:
            reports.append(report)
    return reports


def label(report: dict) -> str:
    return f"{report.get('device', '?')}, {report.get('profile', '?')}" + (" (smoke)" if report.get("smoke") else "")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    return plt, fig, ax


def plot_encode(reports: list[dict], out: Path) -> Path | None:
    """Vision tower images/s for each image size, one bar per report."""
    reports = [r for r in reports if r.get("per_size")]
    if not reports:
        return None
    plt, fig, ax = _figure()
    sizes = [row["size"] for row in reports[0]["per_size"]]
    patches = {row["size"]: row["patches_per_image"] for row in reports[0]["per_size"]}
    width = 0.8 / len(reports)
    for k, report in enumerate(reports):
        rate = {row["size"]: row["images_per_s"] for row in report["per_size"]}
        xs = [i + (k - (len(reports) - 1) / 2) * width for i in range(len(sizes))]
        ax.bar(xs, [rate.get(s, 0.0) for s in sizes], width, label=label(report))
    ax.set_xticks(range(len(sizes)), [f"{s}\n{patches[s]} p" for s in sizes], fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_title("Vision tower throughput by image size (p: patches per image)", fontsize=9)
    return _save(plt, fig, ax, out / ENCODE_PNG)


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_decode(reports: list[dict], out: Path) -> Path | None:
    """Store vs end-to-end requests/s ratio for each max_tokens, one line per report."""
    reports = [r for r in reports if r.get("results")]
    if not reports:
        return None
    plt, fig, ax = _figure()
    for report in reports:
        rows = sorted(report["results"], key=lambda r: r["max_tokens"])
        ax.plot([r["max_tokens"] for r in rows], [r["speedup"] for r in rows], marker="o", label=label(report))
    goals = sorted({(int(k.rsplit("_", 1)[1]), float(g["target"].split()[-1]))
                    for r in reports for k, g in r.get("goals", {}).items()})
    if goals:
        ax.plot([t for t, _ in goals], [g for _, g in goals], "k_", markersize=18, mew=1.5, ls="none", label="goal")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["max_tokens"] for report in reports for r in report["results"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("output tokens (max_tokens)")
    ax.set_ylabel("speedup (requests/s, store / end to end)")
    ax.set_title("Decoding from the store vs end to end", fontsize=9)
    return _save(plt, fig, ax, out / DECODE_PNG)


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="Folder of the result JSONs.")
    ap.add_argument("--out", default=str(DOCS_IMG), help="Folder for the PNGs.")
    args = ap.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, prefix, plot in (("encode", "bench_encode", plot_encode), ("decode", "bench_decode", plot_decode)):
        path = plot(load(results, prefix), out)
        if path is None:
            print(f"no {prefix}*.json in {results}: {name} plot skipped")
        else:
            print(f"wrote {path}")
            written.append(path)
    return written


if __name__ == "__main__":
    main()
