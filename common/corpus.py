"""Streaming corpus readers: text, JSONL, Parquet, directories / globs of them, HF datasets.

Every reader yields :class:`Piece` objects in a fixed order. A document longer than
``max_piece_chars`` arrives as several pieces of ``max_piece_chars`` to ``2 * max_piece_chars``,
cut where a byte-level BPE pre-tokeniser (GPT-2 / Llama-3 regex, SmolLM2's included) ends a
pre-token anyway, so the token ids equal those of the whole document: after a single newline between
two non-space characters, or before a space that follows a non-space character. (A pre-token holds a
space only at its start or inside a run of whitespace, and a run of whitespace before a non-space
character gives up its last character, so "\n\nX" or "\r\nX" must not be cut after the newline.)
Text files are read in slices of at most ``max_piece_chars`` bytes, so even a single 50 MB line never
sits in memory whole; a stretch of ``2 * max_piece_chars`` without a safe point (e.g. base64) is cut
anyway at a character boundary and counted (``forced_cuts``). Nothing is dropped silently: every skip
is counted in :class:`CorpusStats`, which ends up in the manifest.

Every reader also reads a *range* of its source (common/partition.py plans them): a byte range of a
text or JSONL file, a run of Parquet row groups. A range owns the documents that *start* inside it:
it begins at the first document boundary at or after its start offset and ends at the first boundary
at or after its end offset, so consecutive ranges cover every document exactly once and a document
longer than a range belongs to the range where it starts. Document ids therefore never need the part
of the file before them: ``<source>@<byte offset of the document>`` for text and JSONL,
``<source>:<row>`` for Parquet (the row group's first row comes from the file's metadata) and HF
datasets.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import storage

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_SNIFF_BYTES = 8192
# Cut points that are pre-token boundaries for byte-level BPE (see the module docstring). The bytes
# form accepts only printable ASCII around the cut, so it never splits a UTF-8 character and never
# mistakes the tail of a multi-byte space (U+00A0, U+3000) for a non-space.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= )")
_SAFE_CUT_BYTES = re.compile(rb"(?<=[\x21-\x7e]\n)(?=[\x21-\x7e])|(?<=[\x21-\x7e])(?= )")


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
        if not self.delimiter.strip() and not self.doc_per_file:
            # An empty delimiter would make every blank line end a document, silently.
            raise ValueError("--delimiter must not be empty or blank (or pass --doc-per-file)")


@dataclass
class Piece:
    doc_id: str
    """Stable id: ``<source>@<byte offset>`` (text, JSONL) or ``<source>:<row>`` (Parquet, HF)."""
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
    forced_cuts: int = 0
    """Long documents cut where the tokenizer may not split (no safe point within 2 x max_piece_chars,
    e.g. a base64 blob): the ids next to such a cut may differ from the whole document's."""
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
        if storage.is_url(raw):
            out += _expand_url(raw)
            continue
        if raw.startswith("hf:"):
            out.append(("hf", raw[3:], raw))
            continue
        raw = storage.local_path(raw)  # file:///a/b is the path /a/b
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


def _expand_url(url: str) -> list[tuple[str, str, str]]:
    """Sources of a URL (common/storage.py): one object, the corpus files under a prefix, or a glob.
    Source ids follow the local rules above (the name; the key under the prefix; the key under the
    matches' common folder), so they never hold the endpoint or a credential, and the same files read
    from a bucket or from a local copy give the same document ids, hence the same shards."""
    if storage.has_magic(url):
        files = storage.glob(url)
        if not files:
            raise ValueError(f"corpus glob {url!r} matches no file")
        base = storage.common_parent(files)
        return [(_kind(Path(f)) or "text", f, storage.relative(f, base)) for f in files]
    what = storage.kind(url)
    if what == "file":
        return [(_kind(Path(url)) or "text", url, url.rstrip("/").rsplit("/", 1)[-1])]
    if what == "dir":
        files = [f for f in storage.list_files(url) if _kind(Path(f))]
        if not files:
            raise ValueError(f"corpus prefix {url!r} has no .txt/.jsonl/.parquet files")
        return [(_kind(Path(f)) or "text", f, storage.relative(f, url)) for f in files]
    raise ValueError(f"corpus URL {url!r} does not exist (no object and no prefix of that name)")


def _each(fn, items: list[str]) -> Iterator:  # noqa: ANN001 - a one-argument function
    """``map(fn, items)``; over URLs on 16 threads (one request each: a serial walk over thousands
    of objects would cost minutes), still in order, the first failure in order raised."""
    if not any(storage.is_url(i) for i in items):
        return map(fn, items)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return iter(list(pool.map(fn, items)))


def check_sources(cfg: CorpusConfig) -> None:
    """The checks that need no parsing, run before any heavy work (tokenizer, Ray): every path
    exists, no text file looks binary, the corpus is not only empty files. Errors name the path."""
    sources = expand_sources(cfg.paths)
    files = [loc for kind, loc, _ in sources if kind in ("text", "jsonl", "parquet")]
    texts = [loc for kind, loc, _ in sources if kind == "text"]
    try:
        for loc, binary in zip(texts, _each(_looks_binary, texts), strict=True):
            if binary:
                raise ValueError(f"corpus file {loc!r} looks binary (NUL bytes): pass text, .jsonl or .parquet files")
        if files and len(files) == len(sources) and all(source_size(f) == 0 for f in files):
            raise ValueError(f"corpus {' '.join(cfg.paths)} is empty (0 bytes): pass files that hold documents")
    except OSError as e:
        raise ValueError(f"corpus file {e.filename!r} cannot be read: {e.strerror or e}") from e


def _decode(data: bytes, stats_flag: list[bool]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats_flag[0] = True
        return data.decode("utf-8", errors="replace")


def _split_long(text: str, max_chars: int, stats: CorpusStats | None = None) -> Iterator[str]:
    """Cut ``text`` at safe points (module docstring) into pieces of ``max_chars`` to
    ``2 * max_chars``; a stretch without one is cut at ``max_chars`` and counted in ``stats``."""
    start = 0
    while len(text) - start > max_chars:
        hi = min(len(text), start + 2 * max_chars)
        m = _SAFE_CUT.search(text, start + max_chars, hi)  # a regex scan, not a Python loop per char
        if m is not None:
            cut = m.start()
        elif hi == len(text):
            break  # the rest is at most 2 * max_chars: one last piece
        else:
            cut = start + max_chars
            if stats is not None:
                stats.forced_cuts += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def _with_last(parts: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """(part, is_last) without materialising the parts."""
    prev: str | None = None
    for p in parts:
        if prev is not None:
            yield prev, False
        prev = p
    if prev is not None:
        yield prev, True


class _Emitter:
    """Turns document texts into pieces with ids and counts."""

    def __init__(self, cfg: CorpusConfig, stats: CorpusStats):
        self.cfg, self.stats = cfg, stats

    def whole(self, doc_id: str, text: str | None, replaced: bool = False) -> Iterator[Piece]:
        if text is None or not text.strip():
            self.stats.skipped_empty += 1
            return
        self.stats.documents += 1
        self.stats.utf8_replaced += replaced
        for t, last in _with_last(_split_long(text, self.cfg.max_piece_chars, self.stats)):
            yield Piece(doc_id, t, last)


def open_binary(location: str):
    """A corpus file opened for binary reading (seekable): the one place the readers open files. A URL
    streams in ranged reads as the reader advances (common/storage.py)."""
    return storage.open_binary(location)


def source_size(location: str) -> int:
    """Bytes of a corpus file (planning byte ranges: common/partition.py)."""
    return storage.size(location)


def _looks_binary(path: str) -> bool:
    return b"\0" in storage.read_range(path, 0, _SNIFF_BYTES)  # one small request for a URL


def _is_delimiter_line(seg: bytes, delim: bytes) -> bool:
    """A whole line holding exactly the delimiter, with its LF or CRLF (or none at the end of the file)."""
    return seg in (delim, delim + b"\n", delim + b"\r\n", delim + b"\r")


def _text_boundary(f, offset: int, size: int, delim: bytes, limit: int) -> int:
    """The first document start at or after ``offset`` in a text file: 0, or just after a delimiter
    line (the end of the file when there is none).

    A delimiter line is at most ``len(delim) + 2`` bytes long, so one that ends at or after ``offset``
    starts at or after ``offset - len(delim) - 3``: the scan starts there, at the next line start.
    Lines are read in slices of ``limit`` bytes exactly like the reader does, so both agree on which
    lines are whole."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    pos = max(0, offset - len(delim) - 3)
    at_line_start = True
    if pos > 0:
        f.seek(pos - 1)
        at_line_start = f.read(1) == b"\n"
    f.seek(pos)
    while seg := f.readline(limit):
        whole_line = at_line_start and (seg.endswith(b"\n") or len(seg) < limit)
        at_line_start = seg.endswith(b"\n")
        pos += len(seg)
        if whole_line and pos >= offset and _is_delimiter_line(seg, delim):
            return pos
    return size


def _line_boundary(f, offset: int, size: int) -> int:
    """The first line start at or after ``offset`` (a JSONL record boundary)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())


def _forced_cut(buf: bytearray, pos: int) -> int:
    """``pos`` moved back to the start of a UTF-8 character (continuation bytes are 0x80-0xBF)."""
    for c in range(pos, pos - 4, -1):
        if not 0x80 <= buf[c] <= 0xBF:
            return c
    return pos  # not UTF-8 there anyway: decoded with replacement characters either way


def _read_text(path: str, source: str, cfg: CorpusConfig, em: _Emitter, start: int = 0,
               end: int | None = None) -> Iterator[Piece]:
    """Documents of a text file that start in bytes [start, end) (module docstring), read in slices
    of at most ``max_piece_chars`` bytes (a 50 MB line included), so memory stays bounded by the piece
    size, not the document size. With ``--doc-per-file`` the file is one document: one range."""
    if start == 0 and _looks_binary(path):
        raise ValueError(f"corpus file {path!r} looks binary (NUL bytes): pass text, .jsonl or .parquet files")
    limit = cfg.max_piece_chars
    delim = cfg.delimiter.encode()
    doc_start = 0  # byte offset of the current document: its id
    buf = bytearray()  # the current document's bytes not yet yielded
    scanned = 0  # cut points before this offset of ``buf`` were already searched
    emitted = False  # pieces of the current document already yielded
    replaced = [False]

    def piece(data: bytes) -> Piece:
        nonlocal emitted
        if not emitted:
            em.stats.documents += 1
        emitted = True
        return Piece(f"{source}@{doc_start}", _decode(data, replaced), False)

    def end_document() -> Iterator[Piece]:
        nonlocal buf, scanned, emitted, replaced
        data = bytes(buf)
        buf, scanned = bytearray(), 0
        # The newline before a delimiter line (or at the end of the file) is format, not text.
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        text = _decode(data, replaced)
        if emitted:
            em.stats.utf8_replaced += replaced[0]
            yield Piece(f"{source}@{doc_start}", text, True)
        else:
            yield from em.whole(f"{source}@{doc_start}", text, replaced[0])
        emitted, replaced = False, [False]

    with open_binary(path) as f:
        size = f.seek(0, os.SEEK_END)
        if cfg.doc_per_file:
            pos, stop = (0, size) if start == 0 else (size, size)
        else:
            pos = _text_boundary(f, start, size, delim, limit)
            stop = size if end is None else _text_boundary(f, end, size, delim, limit)
        f.seek(pos)
        doc_start = pos
        at_line_start = True
        # Lines never straddle ``stop``: it is 0, the end of the file or just after a delimiter line.
        while pos < stop and (seg := f.readline(limit)):
            em.stats.bytes += len(seg)
            pos += len(seg)
            whole_line = at_line_start and (seg.endswith(b"\n") or len(seg) < limit)
            at_line_start = seg.endswith(b"\n")
            if whole_line and not cfg.doc_per_file and _is_delimiter_line(seg, delim):
                yield from end_document()
                doc_start = pos
                continue
            buf += seg
            while len(buf) > limit:
                hi = min(len(buf), 2 * limit)
                m = _SAFE_CUT_BYTES.search(buf, max(limit, scanned), hi)
                if m is not None:
                    cut = m.start()
                elif hi < 2 * limit:
                    scanned = len(buf)  # the last offset needs the next byte to decide
                    break
                else:
                    cut = _forced_cut(buf, limit)
                    em.stats.forced_cuts += 1
                data = bytes(buf[:cut])
                del buf[:cut]
                scanned = 0
                yield piece(data)
        if buf or emitted:
            yield from end_document()


def _read_jsonl(path: str, source: str, cfg: CorpusConfig, em: _Emitter, start: int = 0,
                end: int | None = None) -> Iterator[Piece]:
    """Records (lines) of a JSONL file that start in bytes [start, end) (module docstring)."""
    with open_binary(path) as f:
        size = f.seek(0, os.SEEK_END)
        pos = _line_boundary(f, start, size)
        stop = size if end is None else _line_boundary(f, end, size)
        f.seek(pos)
        lineno = 0  # known only when reading from the start of the file
        while pos < stop and (line := f.readline()):
            at, pos, lineno = pos, pos + len(line), lineno + 1
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
                    where = f"{path}:{lineno}" if start == 0 else f"{path} (the line at byte {at})"
                    raise ValueError(
                        f"{where}: line {problem}; fix it or pass --skip-bad-records to skip and count"
                    )
                em.stats.skipped_bad_records += 1
                continue
            yield from em.whole(f"{source}@{at}", rec[cfg.text_field], replaced[0])


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


def _read_parquet(path: str, source: str, cfg: CorpusConfig, em: _Emitter, start: int = 0,
                  end: int | None = None) -> Iterator[Piece]:
    """Rows of row groups [start, end) of a Parquet file; ids count rows from the file's first."""
    with open_parquet(path) as pf:
        if cfg.text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {cfg.text_field!r} (columns: {pf.schema_arrow.names}); "
                             "set --text-field")
        groups = list(range(start, pf.num_row_groups if end is None else min(end, pf.num_row_groups)))
        if not groups:
            return
        row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
        for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024, row_groups=groups):
            for text in batch.column(0).to_pylist():
                em.stats.bytes += len(text.encode()) if text else 0
                yield from em.whole(f"{source}:{row}", text)
                row += 1


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
        yield from em.whole(f"{source}:{index}", text)


def iter_pieces(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[Piece]:
    """Every document of the corpus, in order, as pieces; counts go to ``stats``."""
    stats = stats if stats is not None else CorpusStats()
    for kind, location, source in expand_sources(cfg.paths):
        stats.files.append(source)
        yield from read_range(kind, location, source, cfg, stats)


def read_range(kind: str, location: str, source: str, cfg: CorpusConfig, stats: CorpusStats, start: int = 0,
               end: int | None = None) -> Iterator[Piece]:
    """The documents of one source (an ``expand_sources`` entry) that start in [start, end): bytes of
    a text or JSONL file, row groups of a Parquet file; HF datasets are read whole (start 0, end None)."""
    em = _Emitter(cfg, stats)
    if kind == "text":
        yield from _read_text(location, source, cfg, em, start, end)
    elif kind == "jsonl":
        yield from _read_jsonl(location, source, cfg, em, start, end)
    elif kind == "parquet":
        yield from _read_parquet(location, source, cfg, em, start, end)
    else:
        if (start, end) != (0, None):
            raise ValueError(f"{source}: a HF dataset is read whole, not by ranges")
        yield from _read_hf(kind, location, source, cfg, em)


def iter_documents(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """Whole documents as (id, text): convenient for small corpora and tests (joins pieces)."""
    parts: list[str] = []
    for p in iter_pieces(cfg, stats):
        parts.append(p.text)
        if p.last:
            yield p.doc_id, "".join(parts)
            parts = []
