"""What a corpus is made of: its ``--corpus`` arguments expanded into sources, checked, and opened.

A source is ``(kind, location, source id)``: ``kind`` says which reader of common/corpus.py reads it
(``text``, ``jsonl``, ``parquet``, ``hf_disk``, ``hf``), ``location`` is the path or URL to open, and
the source id is the name document ids start with (the file name; the path under a directory, a
prefix or a glob's common folder), so the same files read from a bucket or from a local copy give the
same ids, hence the same shards. Sources come in a deterministic (path) order. Files open through
common/storage.py, so any of them may be a URL.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

from common import storage

if TYPE_CHECKING:
    from common.corpus import CorpusConfig

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_SNIFF_BYTES = 8192


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand_sources(paths: list[str]) -> list[tuple[str, str, str]]:
    """-> [(kind, location, source id)] in a deterministic order; errors name the bad path."""
    return [s[:3] for s in sized_sources(paths)]


def sized_sources(paths: list[str]) -> list[tuple[str, str, str, int | None]]:
    """:func:`expand_sources` with each file's bytes where the listing already gave them (a URL: an
    object store lists sizes with names), None otherwise (a local file: :func:`source_size` is a stat;
    a HF dataset). So planning 10,000 objects costs the listing, not 10,000 more requests."""
    out: list[tuple[str, str, str, int | None]] = []
    for raw in paths:
        if storage.is_url(raw):
            out += _expand_url(raw)
            continue
        if raw.startswith("hf:"):
            out.append(("hf", raw[3:], raw, None))
            continue
        raw = storage.local_path(raw)  # file:///a/b is the path /a/b
        p = Path(raw)
        if _is_hf_dir(p):
            out.append(("hf_disk", raw, p.name, None))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not files:
                raise ValueError(f"corpus directory {raw!r} has no .txt/.jsonl/.parquet files")
            out += [(_kind(f), str(f), f.relative_to(p).as_posix(), None) for f in files]
        elif p.is_file():
            out.append((_kind(p) or "text", raw, p.name, None))
        elif glob.has_magic(raw):
            files = sorted(Path(f) for f in glob.glob(raw, recursive=True) if os.path.isfile(f))
            if not files:
                raise ValueError(f"corpus glob {raw!r} matches no file")
            base = Path(os.path.commonpath([str(f.parent) for f in files]))
            out += [(_kind(f) or "text", str(f), f.relative_to(base).as_posix(), None) for f in files]
        else:
            raise ValueError(f"corpus path {raw!r} does not exist (hub datasets are spelled hf:NAME)")
    return out


def _expand_url(url: str) -> list[tuple[str, str, str, int | None]]:
    """Sources of a URL (common/storage.py): one object, the corpus files under a prefix, or a glob.
    Source ids follow the local rules above (the name; the key under the prefix; the key under the
    matches' common folder), so they never hold the endpoint or a credential, and the same files read
    from a bucket or from a local copy give the same document ids, hence the same shards."""
    if storage.has_magic(url):
        files = storage.glob_sized(url)
        if not files:
            raise ValueError(f"corpus glob {url!r} matches no file")
        base = storage.common_parent([f for f, _ in files])
        return [(_kind(Path(f)) or "text", f, storage.relative(f, base), n) for f, n in files]
    what, size = storage.stat(url)
    if what == "file":
        return [(_kind(Path(url)) or "text", url, url.rstrip("/").rsplit("/", 1)[-1], size)]
    if what == "dir":
        files = [(f, n) for f, n in storage.list_sized(url) if _kind(Path(f))]
        if not files:
            raise ValueError(f"corpus prefix {url!r} has no .txt/.jsonl/.parquet files")
        return [(_kind(Path(f)) or "text", f, storage.relative(f, url), n) for f, n in files]
    raise ValueError(f"corpus URL {url!r} does not exist (no object and no prefix of that name)")


def check_sources(cfg: CorpusConfig) -> None:
    """The checks that need no parsing, run before any heavy work (tokenizer, Ray): every path
    exists, no text file looks binary, the corpus is not only empty files. Errors name the path."""
    sources = sized_sources(cfg.paths)
    files = [(loc, n) for kind, loc, _, n in sources if kind in ("text", "jsonl", "parquet")]
    texts = [loc for kind, loc, _, _ in sources if kind == "text"]
    try:
        # One small request per text file, on threads (common/storage.py map_ordered).
        for loc, binary in zip(texts, storage.map_ordered(looks_binary, texts), strict=True):
            if binary:
                raise ValueError(f"corpus file {loc!r} looks binary (NUL bytes): pass text, .jsonl or .parquet files")
        if files and len(files) == len(sources) and all((source_size(f) if n is None else n) == 0 for f, n in files):
            raise ValueError(f"corpus {' '.join(cfg.paths)} is empty (0 bytes): pass files that hold documents")
    except OSError as e:
        raise ValueError(f"corpus file {e.filename!r} cannot be read: {e.strerror or e}") from e


def open_binary(location: str):
    """A corpus file opened for binary reading (seekable): the one place the readers open files. A URL
    streams in ranged reads as the reader advances (common/storage.py)."""
    return storage.open_binary(location)


def source_size(location: str) -> int:
    """Bytes of a corpus file (planning byte ranges: common/partition.py)."""
    return storage.size(location)


def looks_binary(path: str) -> bool:
    """NUL bytes in the first 8 KiB: not a text file."""
    return b"\0" in storage.read_range(path, 0, _SNIFF_BYTES)  # one small request for a URL


def open_parquet(path: str):
    """A ``pyarrow.parquet.ParquetFile``; an unreadable file is one error naming it."""
    import pyarrow.parquet as pq

    try:
        # A URL: pyarrow's own random-access file, so the footer and each column chunk are ranged reads.
        return pq.ParquetFile(open_binary(path) if not storage.is_url(path) else storage.open_random_access(path))
    except storage.StorageError:
        raise
    except Exception as e:
        raise ValueError(f"corpus file {path!r} is not a readable Parquet file: {e}") from e
