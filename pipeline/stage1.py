"""Stage 1: corpus -> token windows of ``seq_len + 1`` in Arrow / Zarr shards, plus a manifest.

    python -m pipeline.stage1 --corpus owt_train.txt --tokenizer smollm2-135m --seq-len 512 --out OUT

Documents stream from the corpus readers in a fixed order; Ray actors tokenize batches of them (the
tokenizer is built once per actor); the driver gets the results back in order, appends an EOS after
every document, routes each document to train or val by a hash of its id (or, with ``--val-corpus``,
by the corpus it came from), and packs each split's token stream into windows of ``seq_len + 1``
tokens with stride ``seq_len`` (pipeline/stage1_pack.py). Because order is fixed and packing happens
in one place, the shards are byte-identical whatever the number of workers.

The output directory belongs to stage 1: it refuses an ``--out`` that holds anything it did not
write and a different dataset of its own unless ``--overwrite``, which removes only what stage 1
wrote (pipeline/stage1_out.py). Killed at any instant and rerun, the same command writes the same
bytes, manifests included: timings and throughput go to ``OUT/runs.jsonl`` (one JSON line per
invocation), not into the manifest. Memory is bounded by the piece size (common/corpus.py) and the
shard size, not by the size of a document.

Files: this one drives a run and is the command line; stage1_config.py holds the settings,
stage1_encode.py the tokenizer and its Ray actors, stage1_pack.py the packing into shards,
stage1_out.py the rules of the output place (with pipeline/outputs.py, shared with stage 2).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from common.corpus import CorpusStats, Piece, iter_pieces
from pipeline.outputs import remove_temporaries_of
from pipeline.stage1_config import TokenizeConfig, command_line, in_val, settings_record
from pipeline.stage1_encode import Encoder, actor_class, encoder_payload, make_batches
from pipeline.stage1_out import (
    SETTINGS_FILE,
    OutDir,
    check_manifest_settings,
    check_manifest_target,
    check_out,
    prepare_out,
    save_manifest,
    survey_out,
)
from pipeline.stage1_pack import SplitWriter
from shards import FieldSpec, Manifest, token_dtype
from shards.runlog import RUN_LOG, append_run

# The public API (pipeline/demo.py, stage 2, the benchmarks and tests import it from here).
__all__ = ["TokenizeConfig", "run", "main", "build_parser", "config_from_args", "in_val", "command_line", "Encoder",
           "encoder_payload", "SplitWriter", "OutDir", "survey_out", "check_out", "check_manifest_target",
           "SETTINGS_FILE"]

log = logging.getLogger("pipeline.stage1")


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
    check_job_paths({"--out": cfg.out, "--manifest": cfg.manifest, "--corpus": cfg.corpus,
                     "--val-corpus": cfg.val_corpus})
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
    settings = settings_record(cfg, tok_info, windows_per_shard)
    check_manifest_settings(target, cfg, settings)
    out = Path(cfg.out)
    t_start = time.perf_counter()
    done = prepare_out(out_dir, cfg, settings)
    if done is not None:
        log.info("%s already holds this dataset (checksums verified); nothing to do", out)
        if cfg.manifest:
            remove_temporaries_of(Path(cfg.manifest).absolute())
            save_manifest(done, Path(cfg.manifest), "--manifest")
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
        Actor = actor_class().options(num_cpus=cpus_per_actor(n_workers))
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
    batches = make_batches(tagged, cfg.batch_chars)
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
        remove_temporaries_of(Path(cfg.manifest).absolute())
        save_manifest(manifest, Path(cfg.manifest), "--manifest")
    save_manifest(manifest, out / "manifest.json", "--out")
    (out / SETTINGS_FILE).unlink(missing_ok=True)
    append_run(out, {"command": "pipeline.stage1", "outcome": "wrote", "started": started,
                          "wall_s": round(elapsed, 2), "tokens": tokens,
                          "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
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
