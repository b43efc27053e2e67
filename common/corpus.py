"""Streaming corpus readers: text, JSONL, Parquet, directories / globs of them, HF datasets.

Every reader yields :class:`Piece` objects in a fixed order. A document longer than
``max_piece_chars`` arrives as several pieces, cut where the tokenizer would split anyway, so the token
ids equal those of the whole document (common/corpus_cuts.py says where). Text files are read in slices
of at most ``max_piece_chars`` bytes, so even a single 50 MB line never sits in memory whole. Nothing is
dropped silently: every skip is counted in :class:`CorpusStats`, which ends up in the manifest.

The corpus is split in three jobs: this module holds the settings, the pieces and their counts, and
the readers; common/corpus_sources.py expands ``--corpus`` into sources, checks and opens them (local
paths or object storage, common/storage.py); common/corpus_cuts.py finds where a long document and a
range of a file may be cut.

Every reader also reads a *range* of its source (common/partition.py plans them): a byte range of a
text or JSONL file, a run of Parquet row groups. A range owns the documents that *start* inside it
(common/corpus_cuts.py), so document ids never need the part of the file before them:
``<source>@<byte offset of the document>`` for text and JSONL, ``<source>:<row>`` for Parquet (the row
group's first row comes from the file's metadata) and HF datasets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from common.corpus_cuts import SAFE_CUT_BYTES, forced_cut, is_delimiter_line, line_boundary, split_long, text_boundary
from common.corpus_sources import expand_sources, looks_binary, open_binary, open_parquet


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


def _decode(data: bytes, stats_flag: list[bool]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats_flag[0] = True
        return data.decode("utf-8", errors="replace")


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
        for t, last in _with_last(split_long(text, self.cfg.max_piece_chars, self.stats)):
            yield Piece(doc_id, t, last)


def _read_text(path: str, source: str, cfg: CorpusConfig, em: _Emitter, start: int = 0,
               end: int | None = None) -> Iterator[Piece]:
    """Documents of a text file that start in bytes [start, end) (module docstring), read in slices
    of at most ``max_piece_chars`` bytes (a 50 MB line included), so memory stays bounded by the piece
    size, not the document size. With ``--doc-per-file`` the file is one document: one range."""
    if start == 0 and looks_binary(path):
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
            pos = text_boundary(f, start, size, delim, limit)
            stop = size if end is None else text_boundary(f, end, size, delim, limit)
        f.seek(pos)
        doc_start = pos
        at_line_start = True
        # Lines never straddle ``stop``: it is 0, the end of the file or just after a delimiter line.
        while pos < stop and (seg := f.readline(limit)):
            em.stats.bytes += len(seg)
            pos += len(seg)
            whole_line = at_line_start and (seg.endswith(b"\n") or len(seg) < limit)
            at_line_start = seg.endswith(b"\n")
            if whole_line and not cfg.doc_per_file and is_delimiter_line(seg, delim):
                yield from end_document()
                doc_start = pos
                continue
            buf += seg
            while len(buf) > limit:
                hi = min(len(buf), 2 * limit)
                m = SAFE_CUT_BYTES.search(buf, max(limit, scanned), hi)
                if m is not None:
                    cut = m.start()
                elif hi < 2 * limit:
                    scanned = len(buf)  # the last offset needs the next byte to decide
                    break
                else:
                    cut = forced_cut(buf, limit)
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
        pos = line_boundary(f, start, size)
        stop = size if end is None else line_boundary(f, end, size)
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
