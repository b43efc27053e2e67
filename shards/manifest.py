"""The manifest: one JSON file that ties shards and their provenance together (docs/data.md, "The manifest").

Shard paths are stored relative to the manifest file, so a dataset directory can be moved or synced
to object storage; in memory they are absolute. A shard is complete only once its entry, with its
checksum, is in the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .fields import FieldSpec

SCHEMA = "cocomix.manifest"
SCHEMA_VERSION = 1
FORMATS = ("arrow", "zarr")
KINDS = ("tokens", "concepts")
# Sections a concept manifest must carry so the trainer can refuse mismatched data.
_PROVENANCE = ("teacher", "hook", "sae", "attribution")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cocomix")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


@dataclass
class ShardPart:
    """One file (Arrow) or directory (Zarr) holding some of a shard's fields."""

    path: Path
    """Absolute in memory; written relative to the manifest."""
    format: str
    checksum: str
    bytes: int


@dataclass
class Shard:
    windows: int
    parts: dict[str, ShardPart]
    """Part name (e.g. ``tokens``, ``concepts``) -> its file; all parts have ``windows`` rows."""


@dataclass
class Split:
    windows: int = 0
    tokens: int = 0
    """Tokens this split trains on: windows * seq_len predicted positions."""
    shards: list[Shard] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Other per-split counts (documents, tail tokens dropped, ...)."""


@dataclass
class Manifest:
    kind: str
    """``tokens`` (stage 1 output) or ``concepts`` (stage 2 output, referencing token shards)."""
    seq_len: int
    tokenizer: dict[str, Any]
    fields: dict[str, FieldSpec]
    field_parts: dict[str, str]
    """Field name -> the shard part that stores it."""
    splits: dict[str, Split] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None
    hook: dict[str, Any] | None = None
    sae: dict[str, Any] | None = None
    attribution: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """Everything that decides the shards' bytes; a rerun with other settings is refused."""
    stats: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    """Creation time of manifests written before timings moved to run logs (read, never written: a
    rerun of the same command must write the same bytes; each stage logs its timings in runs.jsonl)."""
    version: str = field(default_factory=_version)
    path: Path | None = None
    """Where this manifest was loaded from or last saved to."""

    # -- derived -------------------------------------------------------------------------------------
    def part_fields(self, part: str) -> dict[str, FieldSpec]:
        return {k: v for k, v in self.fields.items() if self.field_parts[k] == part}

    @property
    def parts(self) -> list[str]:
        return list(dict.fromkeys(self.field_parts.values()))

    def add_shard(self, split: str, windows: int, parts: dict[str, ShardPart]) -> None:
        s = self.splits.setdefault(split, Split())
        s.shards.append(Shard(windows=windows, parts=parts))
        s.windows += windows
        s.tokens += windows * self.seq_len

    # -- JSON ----------------------------------------------------------------------------------------
    def to_json(self, base: Path) -> dict[str, Any]:
        folders: dict[Path, str] = {}  # os.path.relpath per folder, not per part (10,000-shard manifests)

        def rel(p: Path) -> str:
            folder = folders.get(p.parent)
            if folder is None:
                folder = folders[p.parent] = Path(os.path.relpath(p.parent, base)).as_posix()
            return p.name if folder == "." else f"{folder}/{p.name}"

        return {
            "schema": f"{SCHEMA}/{SCHEMA_VERSION}",
            "kind": self.kind,
            **({"created": self.created} if self.created else {}),
            "version": self.version,
            "corpus": self.corpus,
            "tokenizer": self.tokenizer,
            "seq_len": self.seq_len,
            "teacher": self.teacher,
            "hook": self.hook,
            "sae": self.sae,
            "attribution": self.attribution,
            "settings": self.settings,
            "fields": {k: {**v.to_json(), "part": self.field_parts[k]} for k, v in self.fields.items()},
            "splits": {
                name: {
                    "windows": s.windows,
                    "tokens": s.tokens,
                    **s.extra,
                    "shards": [
                        {
                            "windows": sh.windows,
                            "parts": {
                                pn: {"path": rel(p.path), "format": p.format, "checksum": p.checksum, "bytes": p.bytes}
                                for pn, p in sh.parts.items()
                            },
                        }
                        for sh in s.shards
                    ],
                }
                for name, s in self.splits.items()
            },
            "stats": self.stats,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename) with paths relative to ``path``'s folder."""
        path = Path(path).absolute()
        data = self.to_json(path.parent)
        validate(data, where=str(path))
        with atomic_path(path) as tmp:
            tmp.write_text(dumps(data) + "\n")
        self.path = path
        return path


def dumps(data: dict[str, Any]) -> str:
    """``json.dumps(data, indent=2)``, the same text, several times faster for many shards: with an
    indent, json encodes in pure Python (0.4 s for 10,000 shards), so each split's shard list is
    rendered here from templates (its entries have one fixed shape) and the rest by json."""
    splits = data.get("splits")
    lists = {name: s.get("shards") for name, s in splits.items()} if isinstance(splits, dict) else {}
    if not lists or not all(isinstance(v, list) and all(map(_plain_shard, v)) for v in lists.values()):
        return json.dumps(data, indent=2)
    marks = {name: f"\0shards {i}\0" for i, name in enumerate(lists)}
    text = json.dumps({**data, "splits": {n: {**s, "shards": marks[n]} for n, s in splits.items()}}, indent=2)
    for name, shards in lists.items():
        mark = json.dumps(marks[name])
        at = text.index(mark)
        pad = " " * (at - text.rindex("\n", 0, at) - 1 - len('"shards": '))  # the "shards" key's indent
        text = text[:at] + _render_shards(shards, pad) + text[at + len(mark):]
    return text


def _plain_shard(sh: Any) -> bool:
    """A shard entry of exactly the shape :func:`_render_shards` writes (what ``to_json`` makes)."""
    return (type(sh) is dict and list(sh) == ["windows", "parts"] and type(sh["windows"]) is int
            and type(sh["parts"]) is dict and len(sh["parts"]) > 0 and all(
                type(pn) is str and type(p) is dict and list(p) == ["path", "format", "checksum", "bytes"]
                and type(p["path"]) is str and type(p["format"]) is str and type(p["checksum"]) is str
                and type(p["bytes"]) is int for pn, p in sh["parts"].items()))


def _render_shards(shards: list[dict[str, Any]], pad: str) -> str:
    if not shards:
        return "[]"
    q = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str (ensure_ascii)
    i1, i2, i3, i4 = (pad + "  " * k for k in range(1, 5))
    out = []
    for sh in shards:
        parts = ",\n".join(
            f'{i3}{q(pn)}: {{\n{i4}"path": {q(p["path"])},\n{i4}"format": {q(p["format"])},\n'
            f'{i4}"checksum": {q(p["checksum"])},\n{i4}"bytes": {int.__repr__(p["bytes"])}\n{i3}}}'
            for pn, p in sh["parts"].items())
        out.append(f'{i1}{{\n{i2}"windows": {int.__repr__(sh["windows"])},\n{i2}"parts": {{\n{parts}\n{i2}}}\n{i1}}}')
    return "[\n" + ",\n".join(out) + f"\n{pad}]"


def _err(errors: list[str], cond: bool, msg: str) -> bool:
    if not cond:
        errors.append(msg)
    return cond


def _shard_ok(sh: Any, parts: set) -> bool:
    """Whether one shard entry passes every check :func:`validate` makes of it."""
    if not (type(sh) is dict and type(sh.get("windows")) is int and type(sh.get("parts")) is dict):
        return False
    if sh["parts"].keys() != parts:
        return False
    for p in sh["parts"].values():
        if not (type(p) is dict and "checksum" in p and "bytes" in p and p.get("format") in FORMATS):
            return False
        path = p.get("path")
        if not (type(path) is str and not os.path.isabs(path)):
            return False
    return True


def validate(data: Any, where: str = "manifest") -> None:
    """Check a manifest's JSON structure; raise one ``ValueError`` listing every problem by field."""
    e: list[str] = []
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a manifest is a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if _err(
        e,
        isinstance(schema, str) and schema.startswith(SCHEMA + "/"),
        f"schema: expected '{SCHEMA}/<n>', got {schema!r}",
    ):
        try:
            v = int(schema.split("/", 1)[1])
            _err(
                e,
                v <= SCHEMA_VERSION,
                f"schema: version {v} is newer than this code reads ({SCHEMA_VERSION}); upgrade cocomix",
            )
        except ValueError:
            e.append(f"schema: bad version in {schema!r}")
    kind = data.get("kind")
    _err(e, kind in KINDS, f"kind: expected one of {KINDS}, got {kind!r}")
    seq_len = data.get("seq_len")
    _err(e, isinstance(seq_len, int) and seq_len > 0, f"seq_len: expected a positive integer, got {seq_len!r}")
    tok = data.get("tokenizer")
    if _err(e, isinstance(tok, dict), "tokenizer: missing or not an object"):
        for k in ("name", "fingerprint", "vocab_size", "eos_id"):
            _err(e, k in tok, f"tokenizer.{k}: missing")
        _err(
            e,
            isinstance(tok.get("vocab_size"), int) and tok.get("vocab_size", 0) > 0,
            "tokenizer.vocab_size: expected a positive integer",
        )
    if kind == "concepts":
        for k in _PROVENANCE:
            _err(e, isinstance(data.get(k), dict), f"{k}: a concept manifest needs this section")
    fields = data.get("fields")
    parts: set[str] = set()
    if _err(e, isinstance(fields, dict) and fields, "fields: missing or empty"):
        for name, f in fields.items():
            if not _err(e, isinstance(f, dict), f"fields.{name}: not an object"):
                continue
            try:
                FieldSpec.from_json(f)
            except (KeyError, ValueError, TypeError) as ex:
                e.append(f"fields.{name}: {ex}")
            _err(e, isinstance(f.get("part"), str), f"fields.{name}.part: missing")
            parts.add(f.get("part"))
        _err(e, "tokens" in fields, "fields.tokens: every manifest stores tokens")
        if "tokens" in fields and isinstance(seq_len, int):
            _err(
                e,
                list(fields["tokens"].get("shape", [])) == [seq_len + 1],
                f"fields.tokens.shape: expected [{seq_len + 1}] (seq_len + 1)",
            )
    splits = data.get("splits")
    if _err(e, isinstance(splits, dict), "splits: missing or not an object"):
        for sn, s in splits.items():
            w = f"splits.{sn}"
            if not _err(e, isinstance(s, dict) and isinstance(s.get("shards"), list), f"{w}.shards: missing"):
                continue
            total = 0
            for i, sh in enumerate(s["shards"]):
                if _shard_ok(sh, parts):  # the common case, without building a message per check
                    total += sh["windows"]
                    continue
                ws = f"{w}.shards[{i}]"
                if not _err(
                    e,
                    isinstance(sh, dict) and isinstance(sh.get("windows"), int) and isinstance(sh.get("parts"), dict),
                    f"{ws}: needs windows and parts",
                ):
                    continue
                total += sh["windows"]
                _err(
                    e,
                    set(sh["parts"]) == parts,
                    f"{ws}.parts: has {sorted(sh['parts'])}, fields need {sorted(p for p in parts if p)}",
                )
                for pn, p in sh["parts"].items():
                    if not _err(e, isinstance(p, dict), f"{ws}.parts.{pn}: not an object"):
                        continue
                    for k in ("path", "format", "checksum", "bytes"):
                        _err(e, k in p, f"{ws}.parts.{pn}.{k}: missing")
                    _err(
                        e,
                        p.get("format") in FORMATS,
                        f"{ws}.parts.{pn}.format: expected one of {FORMATS}, got {p.get('format')!r}",
                    )
                    _err(
                        e,
                        isinstance(p.get("path"), str) and not os.path.isabs(p["path"]),
                        f"{ws}.parts.{pn}.path: must be relative to the manifest",
                    )
            _err(e, s.get("windows") == total, f"{w}.windows: {s.get('windows')} but its shards hold {total}")
    if e:
        raise ValueError(f"{where} is not a valid manifest:\n  - " + "\n  - ".join(e))


class _Resolver:
    """Absolute part paths for one manifest: each folder is resolved once (symlinks followed) and the
    file name is joined as written. ``Path.resolve`` per part cost ~5 lstat calls each, over a second
    for a 10,000-shard manifest (docs/data.md, "The manifest"; bench/manifest.py)."""

    def __init__(self, base: Path) -> None:
        self.base = str(base)
        self.folders: dict[str, str] = {}

    def __call__(self, rel: str) -> Path:
        head, _, name = rel.rpartition("/")
        if name in ("", ".", ".."):  # not a plain file name: resolve the whole path
            return Path(os.path.realpath(os.path.join(self.base, rel)))
        folder = self.folders.get(head)
        if folder is None:
            folder = self.folders[head] = os.path.realpath(os.path.join(self.base, head))
        return Path(folder, name)


def from_json(data: dict[str, Any], base: Path, where: str = "manifest") -> Manifest:
    validate(data, where)
    resolve = _Resolver(base)
    splits = {}
    for name, s in data["splits"].items():
        extra = {k: v for k, v in s.items() if k not in ("windows", "tokens", "shards")}
        shards = [
            Shard(
                windows=sh["windows"],
                parts={
                    pn: ShardPart(
                        path=resolve(p["path"]), format=p["format"], checksum=p["checksum"], bytes=p["bytes"]
                    )
                    for pn, p in sh["parts"].items()
                },
            )
            for sh in s["shards"]
        ]
        splits[name] = Split(windows=s["windows"], tokens=s.get("tokens", 0), shards=shards, extra=extra)
    return Manifest(
        kind=data["kind"],
        seq_len=data["seq_len"],
        tokenizer=data["tokenizer"],
        fields={k: FieldSpec.from_json(v) for k, v in data["fields"].items()},
        field_parts={k: v["part"] for k, v in data["fields"].items()},
        splits=splits,
        corpus=data.get("corpus") or {},
        teacher=data.get("teacher"),
        hook=data.get("hook"),
        sae=data.get("sae"),
        attribution=data.get("attribution"),
        settings=data.get("settings") or {},
        stats=data.get("stats") or {},
        created=data.get("created"),
        version=data.get("version", ""),
    )


@dataclass
class ExistingFile:
    """What a path that a command is about to write holds (see :func:`inspect_path`)."""

    kind: str
    """``absent``, ``directory``, ``manifest``, ``damaged`` (a cocomix manifest that does not
    validate) or ``other`` (anything else: a user's file, never replaced)."""
    what: str
    """One line for an error message: what is there."""
    manifest: Manifest | None = None
    """The manifest, when ``kind`` is ``manifest``."""


def inspect_path(path: str | os.PathLike) -> ExistingFile:
    """Classify what ``path`` holds before writing a manifest there, so a command replaces only a
    manifest, never a user's file (issue 12: ``--manifest`` silently overwrote any file)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return ExistingFile("absent", "nothing")
    if path.is_dir():
        return ExistingFile("directory", "a directory")
    try:
        size = path.stat().st_size
        if size > 1 << 30:  # a manifest of even 100k shards is tens of MB: do not read a user's big file
            return ExistingFile("other", f"a {size:,}-byte file, too large for a manifest")
        raw = path.read_bytes()
    except OSError as e:
        return ExistingFile("other", f"a file that cannot be read ({e.strerror or e})")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError:
        return ExistingFile("other", f"a binary file of {len(raw):,} bytes")
    except json.JSONDecodeError:
        head = " ".join(text[:40].split())
        return ExistingFile("other", f"a {len(raw):,}-byte file that is not JSON (it starts with {head!r})")
    if not isinstance(data, dict):
        return ExistingFile("other", f"a JSON {type(data).__name__}, not a cocomix manifest")
    schema = data.get("schema")
    if not (isinstance(schema, str) and schema.startswith(SCHEMA + "/")):
        keys = ", ".join(sorted(map(str, data))[:6]) + (", ..." if len(data) > 6 else "")
        return ExistingFile("other", f"a JSON object that is not a cocomix manifest (keys: {keys or 'none'})")
    try:
        m = from_json(data, path.absolute().parent, where=str(path))
    except (ValueError, KeyError, TypeError) as e:
        problems = str(e).split("\n  - ")[1:] or [str(e)]
        return ExistingFile("damaged", f"a damaged cocomix manifest ({'; '.join(problems[:3])})")
    m.path = path.absolute()
    return ExistingFile("manifest", f"a {m.kind} manifest", m)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; errors name the file and every bad field."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise ValueError(f"manifest {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {str(path)!r} is not valid JSON: {e}") from e
    m = from_json(data, path.absolute().parent, where=str(path))
    m.path = path.absolute()
    return m
