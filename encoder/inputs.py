"""Reader: turn INPUT arguments (files, folders, globs, .txt lists, .jsonl, URLs, .tar, .parquet, datasets
folders) into image references, the containers streamed."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.images import IMAGE_SUFFIXES
from splitvlm.core.sources import (
    SourceError,
    check_source,
    is_url,
    iter_images,
    iter_refs,
    rebase,
    source_kind,
    split_ref,
)

Item = str | tuple[str, bytes | SourceError]  # a reference the loader reads, or (reference, bytes read already)


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _from_list(path: Path) -> Iterator[str]:
    base = path.parent
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield rebase(line, base)  # URLs and absolute paths as they are


def _from_jsonl(path: Path) -> Iterator[str]:
    base = path.parent
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            image = json.loads(line)["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SplitVLMError(f"{path}:{n}: expected a JSON object with an \"image\" field") from None
        yield rebase(image, base)


def _from_folder(path: Path) -> Iterator[str]:
    # Everything with an image suffix, folders named like images included: the loader reports those.
    for p in sorted(path.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            yield str(p)


def _expand(spec: str) -> Iterator[str]:
    """The references one non-container INPUT names; SplitVLMError when it names none."""
    path = Path(spec)
    if is_url(spec) or split_ref(spec) is not None:
        found: Iterator[str] = iter([spec])
    elif _is_glob(spec) and not path.exists():
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
        yield p
    if n == 0:
        what = "glob" if _is_glob(spec) and not path.exists() else "input"
        raise SplitVLMError(f"{spec}: {what} names no image files")


def expand_inputs(specs: Iterable[str]) -> list[str]:
    """Image paths and references in a stable order, each once; a missing file stays in to be reported
    as a failure. Container sources (.tar, .parquet, datasets folders) are refused: Inputs streams them.

    A glob that matches nothing, or a folder or list with no images, is a mistake in the command,
    not a bad image: SplitVLMError naming it, before any store is made or engine started."""
    seen: dict[str, None] = {}
    for spec in specs:
        if source_kind(spec) is not None:
            raise SplitVLMError(f"{spec}: a {source_kind(spec)} source is streamed, not listed as files "
                                "(encode --ray takes image files, lists and URLs)")
        for p in _expand(spec):
            seen.setdefault(p, None)
    return list(seen)


def _specs(specs: Iterable[str]) -> Iterator[str]:
    """The arguments with globs that match container sources (shards/*.tar) split into their matches."""
    for spec in specs:
        if _is_glob(spec) and not Path(spec).exists():
            matches = sorted(glob.glob(spec, recursive=True))
            if any(source_kind(m) for m in matches):
                yield from matches
                continue
        yield spec


class Inputs:
    """Checked INPUT arguments: references read on the loader threads, containers streamed in order."""

    def __init__(self, specs: Iterable[str], image_column: str | None = None, id_column: str | None = None):
        """Every input is checked here (globs, lists, containers and their columns), before any store or engine."""
        self.image_column, self.id_column = image_column, id_column
        self.parts: list[list[str] | str] = []  # reference lists and container specs, in argument order
        self.containers = 0  # .tar, Parquet and datasets sources
        self.tables = 0  # Parquet and datasets sources: the ones the column names apply to
        self.total: int | None = 0  # images in all, None when a tar is among them
        seen: dict[str, None] = {}
        for spec in _specs(specs):
            kind = source_kind(spec)
            if kind is None:
                new = [p for p in _expand(spec) if p not in seen]
                seen.update(dict.fromkeys(new))
                self._count(len(new))
                if self.parts and isinstance(self.parts[-1], list):
                    self.parts[-1].extend(new)
                else:
                    self.parts.append(new)
                continue
            try:
                self._count(check_source(spec, image_column, id_column))
            except SourceError as exc:
                raise SplitVLMError(str(exc)) from None
            self.containers += 1
            self.tables += kind != "tar"
            self.parts.append(spec)

    def _count(self, n: int | None) -> None:
        self.total = None if n is None or self.total is None else self.total + n

    def __iter__(self) -> Iterator[Item]:
        for part in self.parts:
            if isinstance(part, list):
                yield from part
            else:
                yield from iter_images(part, self.image_column, self.id_column)

    def refs(self) -> Iterator[tuple[str, str | SourceError | None]]:
        """(reference, id) of every input without reading images; the id None for paths and URLs."""
        for part in self.parts:
            if isinstance(part, list):
                yield from ((p, None) for p in part)
            else:
                yield from iter_refs(part, self.image_column, self.id_column)
