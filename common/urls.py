"""Names of files and objects, as plain strings: URLs, local paths, glob patterns. No I/O here:
common/storage.py lists and reads what these name."""

from __future__ import annotations

import re

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)
_MAGIC = re.compile(r"[*?\[]")


def scheme_of(name: str) -> str | None:
    """``"s3"`` for ``s3://b/k``; None for a local path (and ``hf:NAME``, which is not a URL)."""
    m = _URL.match(name)
    return m.group(1).lower() if m else None


def is_url(name: str) -> bool:
    """True for a remote URL (``file://`` is a local path)."""
    return scheme_of(name) not in (None, "file")


def local_path(name: str) -> str:
    """``file:///a/b`` -> ``/a/b``; anything else unchanged."""
    return _URL.match(name).group(2) if scheme_of(name) == "file" else name  # type: ignore[union-attr]


def has_magic(name: str) -> bool:
    """True when ``name`` holds glob characters (``*``, ``?``, ``[``)."""
    return _MAGIC.search(name) is not None


def join(url: str, rel: str) -> str:
    """``join("s3://b/p/", "x/y.txt")`` -> ``s3://b/p/x/y.txt``."""
    return url.rstrip("/") + "/" + rel


def relative(url: str, base: str) -> str:
    """The part of ``url`` under the folder ``base`` (both URLs), ``/``-separated."""
    base = base.rstrip("/") + "/"
    if not url.startswith(base):
        raise ValueError(f"{url} is not under {base}")
    return url[len(base):]


def common_parent(urls: list[str]) -> str:
    """The deepest folder URL holding every one of ``urls`` (like ``os.path.commonpath`` of parents)."""
    parents = [u.rstrip("/").rsplit("/", 1)[0].split("/") for u in urls]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return "/".join(common)


def _segment_regex(seg: str) -> str:
    """A glob segment as a regex that never crosses ``/``; like ``glob``, a wildcard at the start of a
    name does not match a leading dot."""
    out = "(?!\\.)" if seg[:1] in "*?[" else ""
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and (j := seg.find("]", i + 2 if seg[i + 1:i + 2] in "!^" else i + 1)) != -1:
            body = seg[i + 1:j]
            body = "^" + body[1:] if body[:1] in "!^" else body
            out += "[" + body.replace("\\", "\\\\") + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return out


def glob_regex(pattern: str) -> re.Pattern:
    """``*``, ``?`` and ``[...]`` within one name, ``**`` as a whole name for any depth (as
    ``glob.glob(..., recursive=True)``)."""
    parts: list[str] = []
    segs = pattern.split("/")
    for k, seg in enumerate(segs):
        if seg == "**":
            parts.append("(?:(?!\\.)[^/]+/)*" if k < len(segs) - 1 else "(?:(?!\\.)[^/]+/)*(?!\\.)[^/]+")
        else:
            parts.append(_segment_regex(seg) + ("/" if k < len(segs) - 1 else ""))
    return re.compile("".join(parts) + r"\Z", re.S)
