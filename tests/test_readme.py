"""The README's examples run as shown: its Python API block, on the tiny model and this session's engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str, lang: str = "python") -> str:
    """The first fenced block of `lang` under the README's `## heading`."""
    section = README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block under '## {heading}'"
    return match.group(1)


def test_the_python_api_section_runs_as_shown(tiny_model, engine, monkeypatch, tmp_path, capsys):
    """Only the model name changes (no hub here); `Engine(cfg)` gives the session's engine, as the CLI
    tests do. The block's own `assert report.ok` is the exactness check: split == end to end."""
    from splitvlm.tools.samples import save_corpus

    code = readme_block("Python API")
    assert code.count('"Qwen/Qwen2-VL-2B-Instruct"') == 1
    code = code.replace('"Qwen/Qwen2-VL-2B-Instruct"', repr(tiny_model))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("splitvlm.core.engine.Engine", lambda *a, **k: engine)
    images = save_corpus(tmp_path / "images", 3, seed=5, sizes=[(64, 64), (96, 72), (120, 100)])
    Path("jobs.jsonl").write_text("".join(json.dumps({"id": f"j{n}", "images": [images[n % 3]],
                                                      "prompt": f"Describe picture {n}."}) + "\n" for n in range(4)))
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "encoded 3" in out and out.count("j") >= 4
    report = json.loads(Path("report.json").read_text())
    assert report["ok"] and report["identical"] == report["total"] == 4
