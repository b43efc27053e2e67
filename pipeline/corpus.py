"""Streaming corpus readers: text, JSONL, Parquet, directories / globs of them, HF datasets.

Every reader yields :class:`Piece` objects in a fixed order. A document longer than
``max_piece_chars`` arrives as several pieces (cut only after a newline that is followed by a
non-space character, where byte-level BPE pre-tokenisers split anyway, so the token ids equal those of
the whole document), so one enormous document is never held in memory twice. Nothing is dropped
silently: every skip is counted in :class:`CorpusStats`, which ends up in the manifest.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_SNIFF_BYTES = 8192


@dataclass
class CorpusConfig:
    paths: list[str]
    """Files, directories, globs, saved HF dataset directories, or ``hf:NAME`` hub datasets."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet, HF) holding the document text."""
    delimiter: str = "<|endoftext|>"
    """In text files, a line holding exactly this separates documents."""
    doc_per_file: bool = False
    """Treat each text file as one document (ignores ``delimiter``)."""
    skip_bad_records: bool = False
    """Skip and count JSONL lines that are not JSON objects with a string text field, instead of failing."""
    hf_split: str = "train"
    """Split to read from a HF dataset (hub name or saved DatasetDict)."""
    max_piece_chars: int = 1 << 20
    """Documents longer than this are streamed in pieces of about this size."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("no corpus given: pass --corpus PATH [PATH ...]")
        if self.max_piece_chars < 1024:
            raise ValueError("max_piece_chars must be at least 1024")


@dataclass
class Piece:
    doc_id: str
    """Stable id: ``<source>:<index of the document in that source>``."""
    text: str
    last: bool
    """True on the document's final piece (the EOS goes after it)."""


@dataclass
class CorpusStats:
    documents: int = 0
    """Documents yielded."""
    skipped_empty: int = 0
    """Empty or whitespace-only documents (skipped)."""
    skipped_bad_records: int = 0
    """JSONL lines that were not valid records (skipped with ``skip_bad_records``)."""
    utf8_replaced: int = 0
    """Documents with invalid UTF-8, decoded with U+FFFD replacement characters."""
    bytes: int = 0
    """Bytes of text read."""
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


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
    out: list[tuple[str, str, str]] = []
    for raw in paths:
        if raw.startswith("hf:"):
            out.append(("hf", raw[3:], raw))
            continue
        p = Path(raw)
        if _is_hf_dir(p):
            out.append(("hf_disk", raw, p.name))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not files:
                raise ValueError(f"corpus directory {raw!r} has no .txt/.jsonl/.parquet files")
            out += [(_kind(f), str(f), f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            out.append((_kind(p) or "text", raw, p.name))
        elif glob.has_magic(raw):
            files = sorted(Path(f) for f in glob.glob(raw, recursive=True) if os.path.isfile(f))
            if not files:
                raise ValueError(f"corpus glob {raw!r} matches no file")
            base = Path(os.path.commonpath([str(f.parent) for f in files]))
            out += [(_kind(f) or "text", str(f), f.relative_to(base).as_posix()) for f in files]
        else:
            raise ValueError(f"corpus path {raw!r} does not exist (hub datasets are spelled hf:NAME)")
    return out


def _decode(data: bytes, stats_flag: list[bool]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats_flag[0] = True
        return data.decode("utf-8", errors="replace")


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` after newlines followed by a non-space character, in pieces of >= max_chars."""
    start = 0
    while len(text) - start > max_chars:
        cut = start + max_chars
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        if cut >= len(text):
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


class _Emitter:
    """Turns document texts into pieces with ids and counts."""

    def __init__(self, cfg: CorpusConfig, stats: CorpusStats):
        self.cfg, self.stats = cfg, stats

    def whole(self, source: str, index: int, text: str | None, replaced: bool = False) -> Iterator[Piece]:
        if text is None or not text.strip():
            self.stats.skipped_empty += 1
            return
        self.stats.documents += 1
        self.stats.utf8_replaced += replaced
        doc_id = f"{source}:{index}"
        pieces = list(_split_long(text, self.cfg.max_piece_chars)) if len(text) > self.cfg.max_piece_chars else [text]
        for i, t in enumerate(pieces):
            yield Piece(doc_id, t, i == len(pieces) - 1)


def _read_text(path: str, source: str, cfg: CorpusConfig, em: _Emitter) -> Iterator[Piece]:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        if b"\0" in head:
            raise ValueError(f"corpus file {path!r} looks binary (NUL bytes): pass text, .jsonl or .parquet files")
        f.seek(0)
        delim = cfg.delimiter.encode()
        index = 0
        buf: list[bytes] = []
        size = 0
        emitted = False  # pieces of the current document already yielded
        replaced = [False]

        def flush(final: bool) -> Iterator[Piece]:
            nonlocal buf, size, emitted, index, replaced
            data = b"".join(buf)
            buf, size = [], 0
            if final:
                # The newline before a delimiter line (or at the end of the file) is format, not text.
                data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
                if emitted:
                    text = _decode(data, replaced)
                    em.stats.utf8_replaced += replaced[0]
                    yield Piece(f"{source}:{index}", text, True)
                else:
                    text = _decode(data, replaced)
                    yield from em.whole(source, index, text, replaced[0])
                index += 1
                emitted, replaced = False, [False]
            else:
                if not emitted:
                    em.stats.documents += 1
                emitted = True
                yield Piece(f"{source}:{index}", _decode(data, replaced), False)

        for line in f:
            em.stats.bytes += len(line)
            if not cfg.doc_per_file and line.rstrip(b"\r\n") == delim:
                yield from flush(True)
                continue
            # Long document: cut before a line that starts with a non-space character.
            if size >= cfg.max_piece_chars and line[:1] not in (b" ", b"\t", b"\n", b"\r", b""):
                yield from flush(False)
            buf.append(line)
            size += len(line)
        if buf or emitted:
            yield from flush(True)


def _read_jsonl(path: str, source: str, cfg: CorpusConfig, em: _Emitter) -> Iterator[Piece]:
    with open(path, "rb") as f:
        index = 0
        for lineno, line in enumerate(f, 1):
            em.stats.bytes += len(line)
            if not line.strip():
                continue
            replaced = [False]
            problem = None
            try:
                rec = json.loads(_decode(line, replaced))
                if not isinstance(rec, dict):
                    problem = "is not a JSON object"
                elif not isinstance(rec.get(cfg.text_field), str | None):
                    problem = f"field {cfg.text_field!r} is not a string"
                elif cfg.text_field not in rec:
                    problem = f"has no field {cfg.text_field!r} (set --text-field)"
            except json.JSONDecodeError as e:
                problem = f"is not valid JSON ({e.msg})"
            if problem:
                if not cfg.skip_bad_records:
                    raise ValueError(f"{path}:{lineno}: line {problem}; fix it or pass --skip-bad-records to skip and count")
                em.stats.skipped_bad_records += 1
                continue
            yield from em.whole(source, index, rec[cfg.text_field], replaced[0])
            index += 1


def _read_parquet(path: str, source: str, cfg: CorpusConfig, em: _Emitter) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"corpus file {path!r} is not a readable Parquet file: {e}") from e
    if cfg.text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {cfg.text_field!r} (columns: {pf.schema_arrow.names}); set --text-field")
    index = 0
    for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            em.stats.bytes += len(text.encode()) if text else 0
            yield from em.whole(source, index, text)
            index += 1


def _read_hf(kind: str, location: str, source: str, cfg: CorpusConfig, em: _Emitter) -> Iterator[Piece]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError("reading HF datasets needs the `datasets` package: pip install 'cocomix[hf]'") from e
    if kind == "hf_disk":
        ds = datasets.load_from_disk(location)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise ValueError(f"{location}: no split {cfg.hf_split!r} (has {list(ds)}); set --hf-split")
            ds = ds[cfg.hf_split]
        source = f"{source}/{cfg.hf_split}"
    else:
        ds = datasets.load_dataset(location, split=cfg.hf_split, streaming=True)
        source = f"{location}/{cfg.hf_split}"
    if ds.column_names is not None and cfg.text_field not in ds.column_names:
        raise ValueError(f"{location}: no column {cfg.text_field!r} (columns: {ds.column_names}); set --text-field")
    for index, row in enumerate(ds):
        text = row[cfg.text_field]
        em.stats.bytes += len(text.encode()) if text else 0
        yield from em.whole(source, index, text)


def iter_pieces(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[Piece]:
    """Every document of the corpus, in order, as pieces; counts go to ``stats``."""
    stats = stats if stats is not None else CorpusStats()
    em = _Emitter(cfg, stats)
    for kind, location, source in expand_sources(cfg.paths):
        stats.files.append(source)
        if kind == "text":
            yield from _read_text(location, source, cfg, em)
        elif kind == "jsonl":
            yield from _read_jsonl(location, source, cfg, em)
        elif kind == "parquet":
            yield from _read_parquet(location, source, cfg, em)
        else:
            yield from _read_hf(kind, location, source, cfg, em)


def iter_documents(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """Whole documents as (id, text): convenient for small corpora and tests (joins pieces)."""
    parts: list[str] = []
    for p in iter_pieces(cfg, stats):
        parts.append(p.text)
        if p.last:
            yield p.doc_id, "".join(parts)
            parts = []
