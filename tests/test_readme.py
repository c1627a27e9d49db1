"""The README's examples run as shown: its Python API block and its Serve commands, on the tiny model."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

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
    assert out.startswith("encoded 3,")  # the summary, then each result's id, finish reason and text, in order
    assert re.findall(r"^(j\d) (?:length|stop) ", out, re.M) == ["j0", "j1", "j2", "j3"]
    report = json.loads(Path("report.json").read_text())
    assert report["ok"] and report["identical"] == report["total"] == 4


def sh_commands(block: str) -> list[str]:
    """The block's commands: comment lines dropped, backslash continuations joined, a quoted
    multi-line argument kept with its command."""
    lines = [line for line in block.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#")]
    commands: list[str] = []
    for line in lines:
        if commands and commands[-1].count("'") % 2:  # inside a quoted argument
            commands[-1] += "\n" + line
        else:
            commands.append(line)
    return commands


@pytest.mark.slow
def test_the_serve_section_runs_as_shown(tiny_model, engine, monkeypatch, tmp_path):
    """After `splitvlm demo` (on this session's engine, the tiny model linked where the demo puts its
    own), the README's serve command and both curls, run by bash as written but for the port."""
    import shutil
    import subprocess

    from benchmarks.servers import Server
    from splitvlm.tools import demo

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    monkeypatch.chdir(tmp_path)
    assert demo.run_demo(demo.DEFAULT_WORKDIR, images=3, max_tokens=8, model_dir=tiny_model, engine=engine,
                         echo=lambda line: None, show_progress=False).ok
    Path(demo.DEFAULT_WORKDIR, "model").symlink_to(tiny_model)
    serve, chat, metrics = sh_commands(readme_block("Serve", "sh"))
    assert serve.startswith("splitvlm serve ") and serve.count(" --port 8000") == 1
    assert chat.count("8000") == metrics.count("8000") == 1
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))  # the venv's
    # bash runs the command as written; Server appends `--port N` (a free port), which "$@" passes on
    argv = ["bash", "-c", "exec " + serve.replace(" --port 8000", "") + ' "$@"', "bash"]
    with Server("serve", argv, tmp_path, timeout=300) as server:
        port = str(server.port)
        answer = subprocess.run(["bash", "-c", chat.replace("8000", port)], capture_output=True, text=True, timeout=120)
        counted = subprocess.run(["bash", "-c", metrics.replace("8000", port)], capture_output=True, text=True,
                                 timeout=60)
    reply = json.loads(answer.stdout)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] > 0, answer.stdout
    assert "splitvlm_tower_images_total 0.0" in counted.stdout.splitlines(), counted.stdout
