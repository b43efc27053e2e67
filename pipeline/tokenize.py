"""Stage 1: corpus -> token windows of ``seq_len + 1`` in Arrow / Zarr shards, plus a manifest.

    python -m pipeline.tokenize --corpus owt_train.txt --tokenizer smollm2-135m --seq-len 512 --out OUT

Documents stream from the corpus readers in a fixed order; Ray actors tokenize batches of them (the
tokenizer is built once per actor); the driver gets the results back in order, appends an EOS after
every document, routes each document to train or val by a hash of its id (or, with ``--val-corpus``,
by the corpus it came from), and packs each split's token stream into windows. Window i covers stream tokens [i*T, i*T + T] (T = seq_len): consecutive
windows share one token, so every token after the first is a target exactly once (nanoGPT-style
contiguous packing). The tail of a split's stream that cannot fill a last window is dropped and
counted (``tail_tokens``). Because order is fixed and packing happens in one place, the shards are
byte-identical whatever the number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from shards import FieldSpec, Manifest, Split, load_manifest, token_dtype, verify_part, write_shard
from shards.cli import add_dataclass_args, dataclass_from_args

from .corpus import CorpusConfig, CorpusStats, Piece, iter_pieces

log = logging.getLogger("pipeline.tokenize")
SETTINGS_FILE = ".stage1-settings.json"


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
    """Replace an output directory that holds a different dataset."""
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
            encs = self._tok.encode_batch(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.uint32) for e in encs]
        return [np.asarray(self._tok(t, add_special_tokens=False)["input_ids"], dtype=np.uint32) for t in texts]


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
        self.pending: list[np.ndarray] = []
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
            idx = np.arange(n)[:, None] * self.T + np.arange(self.T + 1)  # (n, T+1)
            self.pending.extend(self.buf[idx])
            self.buf = self.buf[n * self.T :]
            self.windows += n
            while len(self.pending) >= self.windows_per_shard:
                self._flush(self.pending[: self.windows_per_shard])
                self.pending = self.pending[self.windows_per_shard :]

    def _flush(self, windows: list[np.ndarray]) -> None:
        k = len(self.manifest.splits.get(self.name).shards) if self.name in self.manifest.splits else 0
        ext = "arrow" if self.cfg.format == "arrow" else "zarr"
        part = write_shard(
            self.out / f"{self.name}-{k:05d}.{ext}",
            {"tokens": self.spec},
            {"tokens": np.stack(windows)},
            format=self.cfg.format,
            zarr_chunk_windows=self.cfg.zarr_chunk_windows,
            zarr_compression=None if self.cfg.zarr_compression == "none" else self.cfg.zarr_compression,
        )
        self.manifest.add_shard(self.name, len(windows), {"tokens": part})
        log.info("wrote %s (%d windows, %.1f MB)", part.path.name, len(windows), part.bytes / 1e6)

    def finish(self) -> None:
        if self.pending:
            self._flush(self.pending)
            self.pending = []
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


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> Manifest | None:
    """Return the complete manifest if this exact dataset is already there; else make ``out`` ready."""
    manifest_path = out / "manifest.json"
    settings_path = out / SETTINGS_FILE
    if manifest_path.exists():
        try:
            m = load_manifest(manifest_path)
        except ValueError:
            m = None
        if m is not None and m.settings == settings and not overwrite:
            try:
                for s in m.splits.values():
                    for sh in s.shards:
                        for p in sh.parts.values():
                            verify_part(p)
                return m
            except ValueError as e:
                log.warning("existing output is damaged (%s); rewriting it", e)
    ours = settings_path.exists() and json.loads(settings_path.read_text()) == settings
    if out.exists() and any(out.iterdir()) and not ours and not overwrite:
        raise ValueError(
            f"output directory {str(out)!r} already holds a different dataset (other corpus or settings); "
            "choose another --out or pass --overwrite"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    settings_path.write_text(json.dumps(settings, indent=2))
    return None


def run(cfg: TokenizeConfig) -> Manifest:
    """Tokenize the corpus into shards; returns the saved manifest (reused if already complete)."""
    from tqdm import tqdm

    from .raylib import cpus_per_actor, init_ray, ordered_map
    from .teacher import load_tokenizer, resolve_teacher, separator_token_id, tokenizer_fingerprint

    corpus_cfg = cfg.corpus_config()
    from .corpus import expand_sources

    expand_sources(corpus_cfg.paths)  # fail on a missing path before loading anything heavy
    val_cfg = cfg.corpus_config(cfg.val_corpus) if cfg.val_corpus else None
    if val_cfg is not None:
        expand_sources(val_cfg.paths)
    src = resolve_teacher(cfg.tokenizer)
    tokenizer = load_tokenizer(src)
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
    out = Path(cfg.out)
    done = _prepare_out(out, settings, cfg.overwrite)
    if done is not None:
        log.info("%s already holds this dataset (checksums verified); nothing to do", out)
        if cfg.manifest:
            done.save(cfg.manifest)
            done.path = (out / "manifest.json").absolute()
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
    try:
        for ids_list in encode(texts(batches)):
            batch = pending_batches.pop(0)
            for (split, piece), ids in zip(batch, ids_list, strict=True):
                tag = b"val\0" if split == "val" else b""  # moving a file between roles changes the fingerprint
                corpus_hash.update(tag + piece.doc_id.encode() + b"\0" + piece.text.encode() + b"\0")
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
    manifest.stats = {"wall_s": round(elapsed, 2), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                      "num_workers": n_workers, "ray": mode}
    if cfg.manifest:
        manifest.save(cfg.manifest)
    manifest.save(out / "manifest.json")
    (out / SETTINGS_FILE).unlink(missing_ok=True)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.tokenize", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, TokenizeConfig)
    return p


def config_from_args(argv: list[str] | None = None) -> TokenizeConfig:
    return dataclass_from_args(TokenizeConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(argv)
        m = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in m.splits.items():
        print(f"{name}: {s.windows} windows, {s.tokens:,} predicted tokens, {len(s.shards)} shard(s), "
              f"{s.extra.get('documents', 0)} documents, tail dropped {s.extra.get('tail_tokens', 0)} tokens")
    print(f"manifest: {m.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
