"""Stage 1: corpus -> token windows of ``seq_len + 1`` in Arrow / Zarr shards, plus a manifest.

    python -m pipeline.stage1 --corpus owt_train.txt --tokenizer smollm2-135m --seq-len 512 --out OUT

Documents stream from the corpus readers in a fixed order; Ray actors tokenize batches of them (the
tokenizer is built once per actor); the driver gets the results back in order, appends an EOS after
every document, routes each document to train or val by a hash of its id (or, with ``--val-corpus``,
by the corpus it came from), and packs each split's token stream into windows. Window i covers stream tokens [i*T, i*T + T] (T = seq_len): consecutive
windows share one token, so every token after the first is a target exactly once (nanoGPT-style
contiguous packing). The tail of a split's stream that cannot fill a last window is dropped and
counted (``tail_tokens``). Because order is fixed and packing happens in one place, the shards are
byte-identical whatever the number of workers.

The output directory belongs to stage 1: it refuses an ``--out`` that holds anything it did not write
(nothing of the user's is ever deleted or mixed with our files) and a different dataset of its own
unless ``--overwrite``, which removes only what stage 1 wrote (shards, manifest.json, the settings file
of an unfinished run, temporaries). ``--manifest`` replaces only a manifest of this same dataset
(or, with ``--overwrite``, another cocomix manifest), never another file. Killed at any instant and
rerun, the same command writes the same bytes, manifests included: timings and throughput go to
``OUT/runs.jsonl`` (one JSON line per invocation), not into the manifest. Memory is bounded by the
piece size (corpus.py) and the shard size, not by the size of a document.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from common.corpus import CorpusConfig, CorpusStats, Piece, iter_pieces
from shards import FieldSpec, Manifest, Split, token_dtype, verify_part, write_shard
from shards.atomic import atomic_path
from shards.manifest import ExistingFile, inspect_path
from shards.runlog import RUN_LOG, append_run

log = logging.getLogger("pipeline.stage1")
SETTINGS_FILE = ".stage1-settings.json"  # the settings of an unfinished run (removed once manifest.json is in)
# The only names stage 1 writes in --out: shards, manifest.json, SETTINGS_FILE, RUN_LOG and the
# temporaries of shards.atomic / shards.PartWriter (".NAME.tmp-<8 hex>").
_SHARD_NAME = re.compile(r"^(train|val)-\d{5}\.(arrow|zarr)$")
_TEMPORARY = re.compile(r"^\.((train|val)-\d{5}\.(arrow|zarr)|manifest\.json|\.stage1-settings\.json)\.tmp-[0-9a-f]{8}$")


@dataclass
class TokenizeConfig:
    corpus: list[str]
    """Corpus files, directories, globs, saved HF datasets or hf:NAME."""
    tokenizer: str
    """Teacher whose tokenizer to use: HF hub id, model directory, .gguf file, or smollm2-135m."""
    out: str
    """Output directory for shards and manifest.json."""
    seq_len: int = 512
    """Tokens the student predicts per window (each window stores seq_len + 1 tokens)."""
    format: Literal["arrow", "zarr"] = "arrow"
    """Shard format: arrow (memory-mapped IPC, fastest for training) or zarr (v3, chunked)."""
    val_fraction: float = 0.005
    """Fraction of documents in the validation split, chosen by a hash of the document id."""
    val_corpus: list[str] | None = None
    """A held-out corpus whose documents form the val split (e.g. owt_valid.txt); every document
    of --corpus then goes to train and --val-fraction is not used."""
    seed: int = 0
    """Salt of the split hash."""
    shard_mb: float = 64.0
    """Target shard size in MB."""
    num_workers: int = 0
    """Tokenizer actors (0 = one per CPU of the Ray cluster)."""
    batch_chars: int = 1 << 18
    """Characters of text per actor call."""
    eos_token: str | None = None
    """Token appended after every document (default: <|endoftext|> if in the vocabulary, else EOS)."""
    text_field: str = "text"
    """JSONL field / Parquet or HF column holding the text."""
    delimiter: str = "<|endoftext|>"
    """Line separating documents in text files."""
    doc_per_file: bool = False
    """Each text file is one document."""
    skip_bad_records: bool = False
    """Skip and count bad JSONL lines instead of failing."""
    hf_split: str = "train"
    """Split of a HF dataset to read."""
    zarr_chunk_windows: int = 16
    """Windows per Zarr chunk."""
    zarr_compression: Literal["none", "zstd"] = "none"
    """Zarr compression (a compressed shard is decompressed once per shard when read)."""
    overwrite: bool = False
    """Replace a different dataset of stage 1 in --out (only the files stage 1 wrote there, never
    other files) and a cocomix manifest of another dataset at --manifest."""
    ray_address: str | None = None
    """Ray address (default: RAY_ADDRESS, a running cluster, else embedded; 'local' forces embedded)."""
    in_process: bool = False
    """Tokenize in the driver process, without Ray (debugging, benchmarks)."""
    manifest: str | None = None
    """Also save the manifest here (e.g. manifests/NAME.json), with shard paths relative to it."""

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"--seq-len must be positive, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.format not in ("arrow", "zarr"):
            raise ValueError(f"--format must be arrow or zarr, got {self.format!r}")
        if self.shard_mb <= 0:
            raise ValueError("--shard-mb must be positive")
        if self.num_workers < 0:
            raise ValueError("--num-workers must be >= 0")
        if self.batch_chars < 1:
            raise ValueError(f"--batch-chars must be positive, got {self.batch_chars}")
        if self.zarr_chunk_windows < 1:
            raise ValueError(f"--zarr-chunk-windows must be positive, got {self.zarr_chunk_windows}")
        if not self.out:
            raise ValueError("--out is empty: pass the output directory")
        self.corpus_config()  # validates --delimiter and friends

    def corpus_config(self, paths: list[str] | None = None) -> CorpusConfig:
        return CorpusConfig(
            paths=list(paths if paths is not None else self.corpus),
            text_field=self.text_field,
            delimiter=self.delimiter,
            doc_per_file=self.doc_per_file,
            skip_bad_records=self.skip_bad_records,
            hf_split=self.hf_split,
        )


def in_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Deterministic split by document id: adding documents never moves old ones."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < val_fraction * 2**64


# -- tokenizer payload: built once in the driver, rebuilt cheaply in each actor --------------------


def encoder_payload(tokenizer) -> tuple[str, object]:
    """What an actor needs to encode exactly like ``tokenizer(text, add_special_tokens=False)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return ("json", backend.to_str())  # rebuilding from JSON takes ms, a GGUF parse takes seconds
    return ("hf", tokenizer)


class Encoder:
    """Text -> token ids without special tokens."""

    def __init__(self, payload: tuple[str, object]):
        kind, obj = payload
        if kind == "json":
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(obj)
            self._fast = True
        else:
            self._tok = obj
            self._fast = False

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._fast:
            # Same ids as encode_batch without offsets / token strings: ~170 instead of ~250 bytes of
            # memory per character of a 1 MB piece (measured with tokenizers 0.23).
            fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            out = [np.asarray(e.ids, dtype=np.uint32) for e in fast(texts, add_special_tokens=False)]
        else:
            out = [np.asarray(self._tok(t, add_special_tokens=False)["input_ids"], dtype=np.uint32) for t in texts]
        if sum(map(len, texts)) >= 1 << 18:
            _release_freed_memory()
        return out


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    The tokenizer makes millions of small allocations per large piece and frees them; glibc keeps the
    fragmented heap, so without this the RSS grew by ~40 MB per 1 MB piece and a 20 MB one-line
    document took 1.3 GB even in pieces (bench/stage1.py --memory)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: ctypes.CDLL | bool | None = None


def _actor_class():
    import ray

    @ray.remote
    class TokenizerActor:
        def __init__(self, payload):
            self.encoder = Encoder(payload)

        def encode(self, texts: list[str]) -> list[np.ndarray]:
            return self.encoder.encode(texts)

    return TokenizerActor


# -- packing and shard writing --------------------------------------------------------------------


class SplitWriter:
    """Packs one split's token stream into windows and writes full shards as they fill."""

    def __init__(self, name: str, manifest: Manifest, out: Path, cfg: TokenizeConfig, windows_per_shard: int):
        self.name, self.manifest, self.out, self.cfg = name, manifest, out, cfg
        self.T = cfg.seq_len
        self.spec = manifest.fields["tokens"]
        self.windows_per_shard = windows_per_shard
        self.buf = np.zeros(0, dtype=self.spec.storage_dtype)
        self.blocks: list[np.ndarray] = []  # (n, T + 1) windows not in a shard yet, at most one shard's worth
        self.pending = 0
        self.documents = 0
        self.stream_tokens = 0
        self.windows = 0

    def add(self, ids: np.ndarray, eos: int | None) -> None:
        if eos is not None:
            ids = np.append(ids, eos)
            self.documents += 1
        self.stream_tokens += len(ids)
        self.buf = np.concatenate([self.buf, ids.astype(self.spec.storage_dtype)])
        n = (len(self.buf) - 1) // self.T  # windows that fit: each needs T + 1 tokens
        if n > 0:
            # Window i = buf[i*T : i*T + T + 1]: a strided view, copied once (no (n, T+1) index array).
            self.blocks.append(np.lib.stride_tricks.sliding_window_view(self.buf, self.T + 1)[: n * self.T : self.T].copy())
            self.buf = self.buf[n * self.T :].copy()
            self.pending += n
            self.windows += n
            while self.pending >= self.windows_per_shard:
                self._flush(self._take(self.windows_per_shard))

    def _take(self, n: int) -> np.ndarray:
        """The next ``n`` pending windows as one (n, T + 1) array."""
        out: list[np.ndarray] = []
        need = n
        while need:
            b = self.blocks[0]
            if len(b) <= need:
                out.append(self.blocks.pop(0))
                need -= len(b)
            else:
                out.append(b[:need])
                self.blocks[0] = b[need:]
                need = 0
        self.pending -= n
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _flush(self, windows: np.ndarray) -> None:
        k = len(self.manifest.splits.get(self.name).shards) if self.name in self.manifest.splits else 0
        ext = "arrow" if self.cfg.format == "arrow" else "zarr"
        path = self.out / f"{self.name}-{k:05d}.{ext}"
        try:
            part = write_shard(
                path,
                {"tokens": self.spec},
                {"tokens": windows},
                format=self.cfg.format,
                zarr_chunk_windows=self.cfg.zarr_chunk_windows,
                zarr_compression=None if self.cfg.zarr_compression == "none" else self.cfg.zarr_compression,
            )
        except OSError as e:  # a full disk, a quota, a file size limit: the temporary is already removed
            raise ValueError(f"could not write shard {str(path.absolute())!r}: {_why(e)}; free space (or pass another "
                             "--out) and rerun the same command") from e
        self.manifest.add_shard(self.name, len(windows), {"tokens": part})
        log.info("wrote %s (%d windows, %.1f MB)", part.path.name, len(windows), part.bytes / 1e6)

    def finish(self) -> None:
        if self.pending:
            self._flush(self._take(self.pending))
        s = self.manifest.splits.setdefault(self.name, Split())
        # Tokens not in any window: the stream's tail after the last window's final token.
        kept = self.windows * self.T + (1 if self.windows else 0)
        s.extra.update(documents=self.documents, stream_tokens=self.stream_tokens, tail_tokens=self.stream_tokens - kept)


def _batches(pieces: Iterator[tuple[str | None, Piece]], batch_chars: int) -> Iterator[list[tuple[str | None, Piece]]]:
    """Group (split, piece) pairs into batches of about ``batch_chars`` characters."""
    batch: list[tuple[str | None, Piece]] = []
    size = 0
    for sp in pieces:
        batch.append(sp)
        size += len(sp[1].text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _settings(cfg: TokenizeConfig, tok_info: dict, windows_per_shard: int) -> dict:
    d = asdict(cfg)
    for k in ("out", "num_workers", "batch_chars", "overwrite", "ray_address", "shard_mb", "tokenizer", "manifest", "in_process"):
        d.pop(k)
    d.update(tokenizer=tok_info, windows_per_shard=windows_per_shard)
    return json.loads(json.dumps(d))


# -- the output directory: what stage 1 wrote there, and what it did not -------------------------


@dataclass
class OutDir:
    """What ``--out`` holds, sorted into what stage 1 wrote there and everything else."""

    path: Path
    ours: list[Path] = field(default_factory=list)
    """Entries stage 1 wrote (shards, manifest.json, settings file, temporaries); the run log is kept."""
    foreign: list[str] = field(default_factory=list)
    """Names of every other entry: never touched, not even by ``--overwrite``."""
    manifest: ExistingFile | None = None
    """manifest.json, when it is a cocomix manifest (valid or damaged)."""
    settings: dict | None = None
    """The settings of an unfinished run (SETTINGS_FILE), when there is one."""


def _is_run_log(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("command") == "pipeline.stage1"


def survey_out(out: Path, manifest_copy: Path | None = None) -> OutDir:
    """Sort the entries of ``out``. Ours: a cocomix manifest.json, the settings file, temporaries of
    our names, and shard names (``train-00000.arrow``, ``val-00003.zarr/``) beside our manifest or
    settings file; ``manifest_copy`` (this run's ``--manifest``) is judged on its own. All else is foreign."""
    d = OutDir(out)
    if not out.is_dir():
        return d
    entries = sorted(out.iterdir())
    names = {e.name for e in entries}
    if "manifest.json" in names:
        info = inspect_path(out / "manifest.json")
        d.manifest = info if info.kind in ("manifest", "damaged") else None
    if SETTINGS_FILE in names:
        try:
            settings = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
            d.settings = settings if isinstance(settings, dict) else None
        except (OSError, ValueError):
            pass
    marked = d.manifest is not None or d.settings is not None
    for e in entries:
        n = e.name
        if (n == "manifest.json" and d.manifest is not None) or (n == SETTINGS_FILE and d.settings is not None) \
                or _TEMPORARY.match(n) or (marked and _SHARD_NAME.match(n) and e.is_dir() == n.endswith(".zarr")):
            d.ours.append(e)
        elif (n == RUN_LOG and _is_run_log(e)) or (manifest_copy is not None and e.absolute() == manifest_copy):
            continue
        else:
            d.foreign.append(n + ("/" if e.is_dir() else ""))
    return d


def _settings_diff(old: dict, new: dict) -> list[str]:
    """``key: X there, Y now`` for every setting that differs (one level into dicts: tokenizer.*)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{j}: {a.get(j)!r} there, {b.get(j)!r} now" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        else:
            out.append(f"{k}: {a!r} there, {b!r} now")
    return out


def command_line(cfg: TokenizeConfig) -> str:
    """The shell command that runs ``cfg`` (flags that differ from the defaults), for messages."""
    parts = ["python", "-m", "pipeline.stage1"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            parts += [flag, *map(str, v)]
        elif v is not None:
            parts += [flag, str(v)]
    return shlex.join(parts)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _check_writable_dir(target: Path, flag: str, shown: str | None = None) -> None:
    """``target`` (a directory to create or use, for ``flag`` = ``shown``) can be made and written:
    its nearest existing ancestor is a directory, on a writable file system, writable by this user."""
    shown = str(target) if shown is None else shown
    p = target.absolute()
    anc = p
    while not (anc.exists() or anc.is_symlink()):
        anc = anc.parent
    if not anc.is_dir():
        if anc == p and shown == str(target):
            raise ValueError(f"{flag} {shown!r} is a file, not a directory: pass a directory path")
        raise ValueError(f"{flag} {shown!r}: {str(anc)!r} is a file, so no directory can be made under it; "
                         f"pass another {flag}")
    if os.statvfs(anc).f_flag & os.ST_RDONLY:
        raise ValueError(f"{flag} {shown!r}: {str(anc)!r} is on a read-only file system; pass a path on writable storage")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {shown!r}: {str(anc)!r} is not writable by this user; pass another {flag}")


def check_manifest_target(path: str | None) -> ExistingFile | None:
    """Refuse, before any heavy work, a ``--manifest`` that holds something other than a cocomix
    manifest (never replaced, whatever the flags) or whose folder cannot be written."""
    if path is None:
        return None
    p = Path(path)
    _check_writable_dir(p.parent, "--manifest", path)
    info = inspect_path(p)
    if info.kind == "directory":
        raise ValueError(f"--manifest {path!r} is a directory: pass a file path, e.g. {str(p / 'NAME.json')!r}")
    if info.kind == "other":
        raise ValueError(f"--manifest {path!r} holds {info.what}; stage 1 never replaces a file that is not a cocomix "
                         "manifest: pass another --manifest path")
    return info


def _check_manifest_settings(info: ExistingFile | None, cfg: TokenizeConfig, settings: dict) -> None:
    """A manifest already at ``--manifest`` is rewritten only if it is this dataset's (same settings:
    an idempotent rerun) or with ``--overwrite``; otherwise refused, naming what differs."""
    if info is None or info.kind == "absent" or cfg.overwrite:
        return
    m = info.manifest
    if info.kind == "manifest" and m is not None and m.kind == "tokens" and m.settings == settings:
        return
    if m is None:
        what = info.what
    elif m.kind != "tokens":
        what = f"a {m.kind} manifest (stage 2's), not stage 1's"
    else:
        what = f"the manifest of a different stage-1 dataset ({'; '.join(_settings_diff(m.settings, settings)[:6])})"
    raise ValueError(f"--manifest {cfg.manifest!r} holds {what}. To replace that manifest, run: "
                     f"{command_line(cfg)} --overwrite ; to keep it, pass another --manifest path")


def check_out(cfg: TokenizeConfig) -> OutDir:
    """The checks on ``--out`` that need no tokenizer: a directory we can write, holding nothing
    stage 1 did not write. Foreign entries are refused even with ``--overwrite``, which would not
    remove them: our output never mixes silently with a user's files."""
    out = Path(cfg.out)
    _check_writable_dir(out, "--out")
    d = survey_out(out, Path(cfg.manifest).absolute() if cfg.manifest else None)
    if d.foreign:
        shown = ", ".join(d.foreign[:8]) + (f", ... ({len(d.foreign)} in all)" if len(d.foreign) > 8 else "")
        raise ValueError(f"--out {cfg.out!r} holds {len(d.foreign)} entr{'y' if len(d.foreign) == 1 else 'ies'} stage 1 "
                         f"did not write ({shown}); stage 1 writes only into a directory of its own and never deletes "
                         "or writes beside other files: pass a new or empty --out, or move those files elsewhere")
    return d


def _verified(m: Manifest) -> bool:
    try:
        for s in m.splits.values():
            for sh in s.shards:
                for p in sh.parts.values():
                    verify_part(p)
    except ValueError as e:
        log.warning("existing output is damaged (%s); rewriting it", e)
        return False
    return True


def _prepare_out(d: OutDir, cfg: TokenizeConfig, settings: dict) -> Manifest | None:
    """Return the complete manifest if this exact dataset is already there; else make ``--out``
    ready, removing only what stage 1 wrote (``check_out`` has refused anything else)."""
    out = d.path
    m = d.manifest.manifest if d.manifest is not None else None
    complete = m is not None and m.kind == "tokens" and m.settings == settings and d.settings in (None, settings)
    if complete and not cfg.overwrite and _verified(m):
        for e in d.ours:
            if _TEMPORARY.match(e.name):
                _remove(e)
        return m
    # With a settings file the directory holds an unfinished run (its manifest.json, if any, is the
    # one an interrupted --overwrite was replacing): stage 1 never resumes one, so it is redone, or
    # replaced by these settings, without a flag. A finished dataset of other settings needs --overwrite.
    if d.settings is not None and d.settings != settings:
        log.warning("%s holds an unfinished stage-1 run of other settings (%s); replacing it", out,
                    "; ".join(_settings_diff(d.settings, settings)[:6]))
    elif d.manifest is not None and not complete and not cfg.overwrite:
        if m is None:
            what = d.manifest.what
        elif m.kind != "tokens":
            what = f"a {m.kind} manifest (stage 2's) as manifest.json"
        else:
            what = f"a different dataset ({'; '.join(_settings_diff(m.settings, settings)[:6])})"
        shards = sum(1 for e in d.ours if _SHARD_NAME.match(e.name))
        raise ValueError(f"--out {cfg.out!r} already holds {what}. To replace it (only what stage 1 wrote there: "
                         f"{shards} shard(s), manifest.json, temporaries), run: {command_line(cfg)} --overwrite ; "
                         "to keep it, pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Settings first: from here on, the directory is an unfinished run of these settings, whatever
        # instant a kill comes at; only then is the old manifest (the thing a rerun trusts) removed.
        with atomic_path(out / SETTINGS_FILE) as tmp:
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
        for e in sorted(d.ours, key=lambda e: e.name != "manifest.json"):
            if e.name != SETTINGS_FILE:
                _remove(e)
    except OSError as e:
        raise ValueError(f"--out {cfg.out!r}: cannot prepare the output directory: {_why(e)} ({e.filename or out})") from e
    return None


def _remove(e: Path) -> None:
    if e.is_dir() and not e.is_symlink():
        shutil.rmtree(e)
    else:
        e.unlink(missing_ok=True)


def _remove_stray_temporaries(target: Path) -> None:
    """Temporaries shards.atomic left beside ``target`` when a run was killed mid-save."""
    for t in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if re.fullmatch(rf"\.{re.escape(target.name)}\.tmp-[0-9a-f]{{8}}", t.name):
            _remove(t)


def _save(m: Manifest, path: Path, flag: str) -> None:
    try:
        m.save(path)
    except OSError as e:
        raise ValueError(f"{flag}: could not write {str(path.absolute())!r}: {_why(e)}; free space (or choose another "
                         "place) and rerun the same command") from e


def run(cfg: TokenizeConfig) -> Manifest:
    """Tokenize the corpus into shards; returns the saved manifest (reused if already complete)."""
    from tqdm import tqdm

    from common.teacher import (
        load_tokenizer,
        resolve_teacher,
        separator_token_id,
        tokenizer_fingerprint,
    )
    from pipeline.raylib import check_job_paths, cpus_per_actor, init_ray, ordered_map

    # Inside `ray job submit`, a relative path would land in Ray's temporary copy of --working-dir.
    check_job_paths({"--out": cfg.out, "--manifest": cfg.manifest, "--corpus": cfg.corpus, "--val-corpus": cfg.val_corpus})
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    corpus_cfg = cfg.corpus_config()
    from common.corpus import check_sources

    # Everything that needs no tokenizer is checked first: paths, corpus files, --out, --manifest.
    check_sources(corpus_cfg)
    val_cfg = cfg.corpus_config(cfg.val_corpus) if cfg.val_corpus else None
    if val_cfg is not None:
        check_sources(val_cfg)
    out_dir = check_out(cfg)
    target = check_manifest_target(cfg.manifest)
    src = resolve_teacher(cfg.tokenizer)
    try:
        tokenizer = load_tokenizer(src)
    except ValueError as e:  # transformers' messages run over several lines: the first says it
        raise ValueError(str(e).strip().splitlines()[0]) from e
    eos = separator_token_id(tokenizer, cfg.eos_token)
    vocab_size = len(tokenizer)
    tok_info = {
        "name": src.name,
        "path": src.path if not src.is_local else None,
        "gguf_file": src.gguf_file,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "eos_token": tokenizer.convert_ids_to_tokens(eos),
    }
    spec = FieldSpec(token_dtype(vocab_size), (cfg.seq_len + 1,))
    windows_per_shard = max(1, int(cfg.shard_mb * 1e6) // spec.nbytes)
    settings = _settings(cfg, tok_info, windows_per_shard)
    _check_manifest_settings(target, cfg, settings)
    out = Path(cfg.out)
    t_start = time.perf_counter()
    done = _prepare_out(out_dir, cfg, settings)
    if done is not None:
        log.info("%s already holds this dataset (checksums verified); nothing to do", out)
        if cfg.manifest:
            _remove_stray_temporaries(Path(cfg.manifest).absolute())
            _save(done, Path(cfg.manifest), "--manifest")
            done.path = (out / "manifest.json").absolute()
        append_run(out, {"command": "pipeline.stage1", "outcome": "reused", "started": started,
                              "wall_s": round(time.perf_counter() - t_start, 2), "manifest": str(done.path),
                              "manifest_copy": str(Path(cfg.manifest).absolute()) if cfg.manifest else None})
        return done

    manifest = Manifest(kind="tokens", seq_len=cfg.seq_len, tokenizer=tok_info, fields={"tokens": spec},
                        field_parts={"tokens": "tokens"}, settings=settings)
    writers = {s: SplitWriter(s, manifest, out, cfg, windows_per_shard) for s in ("train", "val")}
    stats = CorpusStats()
    corpus_hash = hashlib.sha256()

    actors: list = []
    if cfg.in_process:
        mode, n_workers = "none", 1
        encoder = Encoder(encoder_payload(tokenizer))
        encode = lambda texts_iter: map(encoder.encode, texts_iter)  # noqa: E731
    else:
        mode = init_ray(cfg.ray_address)
        import ray

        n_workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        Actor = _actor_class().options(num_cpus=cpus_per_actor(n_workers))
        payload = ray.put(encoder_payload(tokenizer))
        actors = [Actor.remote(payload) for _ in range(n_workers)]
        encode = lambda texts_iter: ordered_map(actors, "encode", texts_iter)  # noqa: E731
    log.info("tokenizing with %d worker(s) (Ray: %s)", n_workers, mode)

    t0 = time.perf_counter()
    tokens = 0
    # Each piece carries its split: None = by the hash of its id, "val" = from --val-corpus.
    tagged = ((None if val_cfg is None else "train", p) for p in iter_pieces(corpus_cfg, stats))
    if val_cfg is not None:
        tagged = itertools.chain(tagged, (("val", p) for p in iter_pieces(val_cfg, stats)))
    batches = _batches(tagged, cfg.batch_chars)
    pending_batches: list[list[tuple[str | None, Piece]]] = []

    def texts(bs: Iterator[list[tuple[str | None, Piece]]]) -> Iterator[list[str]]:
        for b in bs:
            pending_batches.append(b)
            yield [p.text for _, p in b]

    bar = tqdm(unit="doc", desc="stage 1", dynamic_ncols=True, file=sys.stderr)
    first_piece = True
    try:
        for ids_list in encode(texts(batches)):
            batch = pending_batches.pop(0)
            for (split, piece), ids in zip(batch, ids_list, strict=True):
                # The fingerprint hashes id and text of each document, whatever its pieces (for a
                # one-piece document the same bytes as before pieces existed).
                if first_piece:
                    tag = b"val\0" if split == "val" else b""  # moving a file between roles changes the fingerprint
                    corpus_hash.update(tag + piece.doc_id.encode() + b"\0")
                corpus_hash.update(piece.text.encode() + (b"\0" if piece.last else b""))
                first_piece = piece.last
                if split is None:
                    split = "val" if in_val(piece.doc_id, cfg.seed, cfg.val_fraction) else "train"
                writers[split].add(ids, eos if piece.last else None)
                tokens += len(ids) + piece.last
                bar.update(piece.last)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(tokens=f"{tokens:,}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
    finally:
        bar.close()
        if actors:
            import ray

            for a in actors:
                ray.kill(a)
    if stats.documents == 0:
        raise ValueError(
            f"corpus {cfg.corpus} has no documents ({stats.skipped_empty} empty, "
            f"{stats.skipped_bad_records} bad records skipped)"
        )
    for w in writers.values():
        w.finish()
    if manifest.splits["train"].windows == 0:
        raise ValueError(
            f"the corpus yields {writers['train'].stream_tokens} training tokens, fewer than one window of "
            f"{cfg.seq_len + 1}: lower --seq-len or add text"
        )
    elapsed = time.perf_counter() - t0
    manifest.corpus = {"sources": list(cfg.corpus), **({"val_sources": list(cfg.val_corpus)} if cfg.val_corpus else {}),
                       "fingerprint": "sha256:" + corpus_hash.hexdigest()[:16], **stats.to_json()}
    # The manifest holds only what decides the bytes; timings go to the run log (a rerun of the same
    # command must write the same manifest).
    if cfg.manifest:
        _remove_stray_temporaries(Path(cfg.manifest).absolute())
        _save(manifest, Path(cfg.manifest), "--manifest")
    _save(manifest, out / "manifest.json", "--out")
    (out / SETTINGS_FILE).unlink(missing_ok=True)
    append_run(out, {"command": "pipeline.stage1", "outcome": "wrote", "started": started,
                          "wall_s": round(elapsed, 2), "tokens": tokens, "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                          "num_workers": n_workers, "ray": mode, "manifest": str(manifest.path),
                          "manifest_copy": str(Path(cfg.manifest).absolute()) if cfg.manifest else None})
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.stage1", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, TokenizeConfig)
    return p


def config_from_args(argv: list[str] | None = None) -> TokenizeConfig:
    return dataclass_from_args(TokenizeConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.stage1``: 0, 2 with one ``error:`` line (common/cli.py), 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_cli(_main, argv, interrupted="interrupted: nothing was kept that a rerun would trust; run the "
                                            "same command again")


def _main(argv: list[str] | None) -> int:
    cfg = config_from_args(argv)
    m = run(cfg)
    for name, s in m.splits.items():
        print(f"{name}: {s.windows} windows, {s.tokens:,} predicted tokens, {len(s.shards)} shard(s), "
              f"{s.extra.get('documents', 0)} documents, tail dropped {s.extra.get('tail_tokens', 0)} tokens")
    out = Path(cfg.out).absolute()
    # Absolute paths: under a Ray job or a script, the working directory is not the user's.
    print(f"shards: {out}")
    print(f"manifest: {out / 'manifest.json'}")
    if cfg.manifest:
        print(f"manifest copy: {Path(cfg.manifest).absolute()}")
    print(f"run log: {out / RUN_LOG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
