"""Reader: turn INPUT arguments (files, folders, globs, .txt lists, .jsonl) into image paths."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.images import IMAGE_SUFFIXES


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _from_list(path: Path) -> Iterator[str]:
    base = path.parent
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield str(base / line) if not Path(line).is_absolute() else line


def _from_jsonl(path: Path) -> Iterator[str]:
    base = path.parent
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            image = json.loads(line)["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SplitVLMError(f"{path}:{n}: expected a JSON object with an \"image\" field") from None
        yield str(base / image) if not Path(image).is_absolute() else image


def _from_folder(path: Path) -> Iterator[str]:
    # Everything with an image suffix, folders named like images included: the loader reports those.
    for p in sorted(path.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            yield str(p)


def expand_inputs(specs: Iterable[str]) -> list[str]:
    """Image paths in a stable order, each once; a missing file stays in to be reported as a failure.

    A glob that matches nothing, or a folder or list with no images, is a mistake in the command,
    not a bad image: SplitVLMError naming it, before any store is made or engine started."""
    seen: dict[str, None] = {}
    for spec in specs:
        path = Path(spec)
        if _is_glob(spec) and not path.exists():
            found = iter(sorted(glob.glob(spec, recursive=True)))
        elif path.suffix == ".txt" and path.is_file():
            found = _from_list(path)
        elif path.suffix == ".jsonl" and path.is_file():
            found = _from_jsonl(path)
        elif path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found = _from_folder(path)
        else:
            found = iter([spec])
        n = 0
        for p in found:
            n += 1
            seen.setdefault(p, None)
        if n == 0:
            what = "glob" if _is_glob(spec) and not path.exists() else "input"
            raise SplitVLMError(f"{spec}: {what} names no image files")
    return list(seen)
