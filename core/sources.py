"""Image references beyond local paths: URLs, and members of .tar shards, Parquet files and datasets folders.

A reference is a plain string, usable wherever a path is: a local path; a URL (http(s) with the
standard library, other schemes through fsspec); or CONTAINER::MEMBER for one image inside a
container: `shard.tar::000123.jpg` (the member's name in the tar), `data.parquet::ID` or
`dataset_folder::ID` (the row's id column value, else its row number). Columns other than the
defaults ride in the container part: `data.parquet?image=img&id=name::ID`. The key is always made
from the bytes a reference resolves to, so an image has the same key whichever way it is named.
"""

from __future__ import annotations

import functools
import http.client
import os
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from splitvlm.core.errors import first_line
from splitvlm.core.images import IMAGE_SUFFIXES, MAX_FILE_BYTES, image_from_bytes, read_image_bytes
from splitvlm.core.tables import SourceError, is_dataset_dir, iter_rows, open_table, read_row

__all__ = ["SEP", "SourceError", "check_source", "image_id", "is_path", "is_url", "iter_images", "iter_refs",
           "load_image", "read_bytes", "rebase", "source_kind", "split_ref"]
SEP = "::"
URL_TIMEOUT_S = 30.0  # per connection and per read of an http(s) URL
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(ref: str) -> bool:
    """A URL other than file:// (which names a local path)."""
    return bool(_URL_RE.match(ref)) and not ref.lower().startswith("file://")


def source_kind(spec: str) -> str | None:
    """"tar", "parquet" or "datasets" for a container source, None for anything else."""
    if is_url(spec):
        return None
    suffix = Path(spec).suffix.lower()
    if suffix in (".tar", ".parquet"):
        return suffix[1:]
    return "datasets" if is_dataset_dir(spec) else None


def split_ref(ref: str) -> tuple[str, str, str, str] | None:
    """(container, kind, column query, member) of a member reference; None for a path or URL."""
    if SEP not in ref or is_url(ref) or os.path.lexists(ref):
        return None
    head, member = ref.split(SEP, 1)
    path, _, query = head.partition("?") if source_kind(head) is None else (head, "", "")
    kind = source_kind(path)
    return (path, kind, query, member) if kind and member else None


def is_path(ref: str) -> bool:
    """A reference that is a local file path (read with core.images.read_image_bytes)."""
    return not is_url(ref) and not ref.lower().startswith("file://") and split_ref(ref) is None


def rebase(ref: str, base: str | os.PathLike) -> str:
    """A reference relative to base (a jobs file's folder): URLs and absolute paths stay as they are."""
    if is_url(ref):
        return ref
    head, sep, member = ref.partition(SEP)
    return ref if Path(head).is_absolute() else str(Path(base) / head) + sep + member


def _checked(ref: str, data: bytes) -> bytes:
    if not data:
        raise SourceError(f"{ref}: empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise SourceError(f"{ref}: over the {MAX_FILE_BYTES:,}-byte limit for an image file")
    return data


def _fetch(url: str) -> bytes:
    """The bytes at a URL, at most MAX_FILE_BYTES + 1 of them; SourceError naming the URL."""
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        try:
            import fsspec
        except ImportError:
            raise SourceError(f"{url}: {scheme}:// URLs are read through fsspec, which is not installed "
                              "(pip install fsspec)") from None
        try:
            with fsspec.open(url, "rb") as f:
                return f.read(MAX_FILE_BYTES + 1)
        except Exception as exc:  # a missing backend (s3fs, gcsfs), credentials, no such object
            raise SourceError(f"{url}: cannot read ({type(exc).__name__}: {first_line(exc)})") from None
    request = urllib.request.Request(url, headers={"User-Agent": "splitvlm"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_FILE_BYTES:
                raise SourceError(f"{url}: {int(length):,} bytes is over the {MAX_FILE_BYTES:,}-byte limit")
            return response.read(MAX_FILE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise SourceError(f"{url}: no answer within {URL_TIMEOUT_S:g} s") from None
        raise SourceError(f"{url}: cannot fetch ({getattr(reason, 'strerror', None) or reason})") from None
    except TimeoutError:
        raise SourceError(f"{url}: no answer within {URL_TIMEOUT_S:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise SourceError(f"{url}: cannot fetch ({type(exc).__name__}: {first_line(exc)})") from None


def _is_image_member(info: tarfile.TarInfo) -> bool:
    return Path(info.name).suffix.lower() in IMAGE_SUFFIXES


@functools.lru_cache(maxsize=16)
def _tar_index(path: str, stamp: tuple) -> dict[str, tuple[int, int, bool]]:
    """Member name -> (data offset, size, regular file) of each image member's first copy, from the headers."""
    index: dict[str, tuple[int, int, bool]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # random access: data is seeked over, not read
            for info in tar:
                if _is_image_member(info):
                    index.setdefault(info.name, (info.offset_data, info.size, info.isreg()))
    except (OSError, tarfile.TarError) as exc:
        raise SourceError(f"{path}: not a readable tar ({first_line(exc)})") from None
    return index


def _stat(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return st.st_mtime_ns, st.st_size


def _tar_member(path: str, member: str, ref: str) -> bytes:
    found = _tar_index(path, _stat(path)).get(member)
    if found is None:
        raise SourceError(f"{ref}: no image member {member!r} in {path}")
    offset, size, regular = found
    if not regular:
        raise SourceError(f"{ref}: not a regular file in the tar (a link or folder)")
    if size > MAX_FILE_BYTES:  # before reading it; an empty member is refused by read_bytes (_checked)
        raise SourceError(f"{ref}: {size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit for an image file")
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def read_bytes(ref: str | os.PathLike) -> bytes:
    """The encoded bytes any reference names (the key is made from them); SourceError/ImageError in one line."""
    ref = os.fspath(ref)
    if ref.lower().startswith("file://"):
        ref = urllib.parse.unquote(ref[len("file://"):])
    if is_url(ref):
        return _checked(ref, _fetch(ref))
    parts = split_ref(ref)
    if parts is None:
        return read_image_bytes(ref)
    path, kind, query, member = parts
    if kind == "tar":
        return _checked(ref, _tar_member(path, member, ref))
    return _checked(ref, read_row(path, kind, query, member, ref))


def load_image(ref: str | os.PathLike, loader: str = "vllm") -> tuple[bytes, Image.Image]:
    """A reference's (or a local path's) bytes, for the key, and its RGB image by the loader's rules (core.images)."""
    data = read_bytes(ref)
    return data, image_from_bytes(data, os.fspath(ref), loader)


def check_source(spec: str, image_column: str | None = None, id_column: str | None = None) -> int | None:
    """Open a container source and check it (columns included) before any work; its image count where known."""
    kind = source_kind(spec)
    if kind is None:
        raise SourceError(f"{spec}: not a .tar, .parquet or datasets folder")
    if kind != "datasets" and not os.path.isfile(spec):
        raise SourceError(f"{spec}: no such file")
    if kind == "tar":
        if not tarfile.is_tarfile(spec):
            raise SourceError(f"{spec}: not a tar file")
        return None
    return open_table(spec, kind, image_column, id_column).rows


def _iter_tar(path: str) -> Iterator[tuple[str, str, bytes | SourceError]]:
    """(reference, webdataset key, bytes) per image member, streamed in tar order; never unpacked."""
    seen: set[str] = set()
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                tar.members = []  # stream mode would keep every header: a shard's size is not bounded
                if not _is_image_member(info):
                    continue
                ref = f"{path}{SEP}{info.name}"
                if info.name in seen:
                    data: bytes | SourceError = SourceError(f"{ref}: member repeats; the reference names its first copy")
                elif not info.isreg():
                    data = SourceError(f"{ref}: not a regular file in the tar (a link or folder)")
                elif info.size > MAX_FILE_BYTES:
                    data = SourceError(f"{ref}: {info.size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit")
                else:
                    data = tar.extractfile(info).read() or SourceError(f"{ref}: empty (0 bytes)")
                seen.add(info.name)
                yield ref, _wds_key(info.name), data
    except (OSError, tarfile.TarError) as exc:
        yield path, "", SourceError(f"{path}: broken tar after {len(seen)} image members ({first_line(exc)})")


def _iter(spec: str, image_column: str | None, id_column: str | None, with_bytes: bool):
    kind = source_kind(spec)
    if kind == "tar" and with_bytes:
        return _iter_tar(spec)
    if kind == "tar":
        index = _tar_index(spec, _stat(spec))
        return ((f"{spec}{SEP}{name}", _wds_key(name), None) for name in index)
    return iter_rows(open_table(spec, kind or "", image_column, id_column), with_bytes)


def iter_images(spec: str, image_column: str | None = None,
                id_column: str | None = None) -> Iterator[tuple[str, bytes | SourceError]]:
    """(reference, bytes) of each image of a container source, streamed in a stable order. An image
    that cannot be read has a SourceError in place of its bytes, and the others still come."""
    return ((ref, data) for ref, _, data in _iter(spec, image_column, id_column, True))


def iter_refs(spec: str, image_column: str | None = None,
              id_column: str | None = None) -> Iterator[tuple[str, str | SourceError]]:
    """(reference, id) of each image of a container source without reading the images (a SourceError
    in place of the id for a row that cannot be named once)."""
    for ref, ident, error in _iter(spec, image_column, id_column, False):
        yield ref, error if isinstance(error, SourceError) else ident


def image_id(ref: str) -> str:
    """A job id for a reference: a file's stem, a tar member's webdataset key, a row's id."""
    parts = split_ref(ref)
    if parts is None:
        name = urllib.parse.urlsplit(ref).path if is_url(ref) else ref
        return Path(name).stem or name
    _, kind, _, member = parts
    return _wds_key(member) if kind == "tar" else member


def _wds_key(member: str) -> str:
    """webdataset's sample key: the member's name up to the first dot of its base name."""
    folder, _, base = member.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]
