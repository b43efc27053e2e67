"""Where the corpus readers (common/corpus.py) may cut: pieces of a long document, and ranges of a file.

**Pieces.** A document longer than ``max_piece_chars`` arrives as several pieces of ``max_piece_chars``
to ``2 * max_piece_chars``, cut where a byte-level BPE pre-tokeniser (GPT-2 / Llama-3 regex, SmolLM2's
included) ends a pre-token anyway, so the token ids equal those of the whole document: after a single
newline between two non-space characters, or before a space that follows a non-space character. (A
pre-token holds a space only at its start or inside a run of whitespace, and a run of whitespace before
a non-space character gives up its last character, so "\\n\\nX" or "\\r\\nX" must not be cut after the
newline.) A stretch of ``2 * max_piece_chars`` without a safe point (e.g. base64) is cut anyway at a
character boundary and counted (``CorpusStats.forced_cuts``).

**Ranges.** A range of a source (common/partition.py plans them) owns the documents that *start* inside
it: it begins at the first document boundary at or after its start offset and ends at the first
boundary at or after its end offset, so consecutive ranges cover every document exactly once and a
document longer than a range belongs to the range where it starts. The boundary functions here find
those offsets in text files (a delimiter line) and JSONL files (a line start).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.corpus import CorpusStats

# Cut points that are pre-token boundaries for byte-level BPE (see the module docstring). The bytes
# form accepts only printable ASCII around the cut, so it never splits a UTF-8 character and never
# mistakes the tail of a multi-byte space (U+00A0, U+3000) for a non-space.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= )")
SAFE_CUT_BYTES = re.compile(rb"(?<=[\x21-\x7e]\n)(?=[\x21-\x7e])|(?<=[\x21-\x7e])(?= )")


def split_long(text: str, max_chars: int, stats: CorpusStats | None = None) -> Iterator[str]:
    """Cut ``text`` at safe points (module docstring) into pieces of ``max_chars`` to
    ``2 * max_chars``; a stretch without one is cut at ``max_chars`` and counted in ``stats``."""
    start = 0
    while len(text) - start > max_chars:
        hi = min(len(text), start + 2 * max_chars)
        m = SAFE_CUT.search(text, start + max_chars, hi)  # a regex scan, not a Python loop per char
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


def forced_cut(buf: bytearray, pos: int) -> int:
    """``pos`` moved back to the start of a UTF-8 character (continuation bytes are 0x80-0xBF)."""
    for c in range(pos, pos - 4, -1):
        if not 0x80 <= buf[c] <= 0xBF:
            return c
    return pos  # not UTF-8 there anyway: decoded with replacement characters either way


def is_delimiter_line(seg: bytes, delim: bytes) -> bool:
    """A whole line holding exactly the delimiter, with its LF or CRLF (or none at the end of the file)."""
    return seg in (delim, delim + b"\n", delim + b"\r\n", delim + b"\r")


def text_boundary(f, offset: int, size: int, delim: bytes, limit: int) -> int:
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
        if whole_line and pos >= offset and is_delimiter_line(seg, delim):
            return pos
    return size


def line_boundary(f, offset: int, size: int) -> int:
    """The first line start at or after ``offset`` (a JSONL record boundary)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())
