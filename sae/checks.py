"""What ``sae.train`` and ``sae.eval`` check before any heavy work, and their error contract.

A user mistake (a bad flag, a missing or damaged file, an SAE that does not fit the teacher, a full
disk) prints one line ``error: ...`` naming the file or flag and what to do, and exits 2; no
traceback. Everything here is cheap: the teacher is read from its config (no weights), token
manifests from their JSON, so a typo costs seconds, not a teacher load or a training run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import one_line
from sae.hooks import hidden_size, n_layers

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------- the teacher, from its config
@dataclass(frozen=True)
class TeacherShape:
    """What the checks need to know about a teacher."""

    name: str
    """The teacher as the user named it."""
    n_blocks: int
    """Number of transformer blocks (valid --layer: 0..n_blocks-1, or -n_blocks..-1)."""
    width: int
    """Residual stream width (an SAE's d_in must equal it)."""
    max_positions: int | None
    """Longest window the position embeddings allow; None when the config does not say."""


def _first_int(config: object, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def shape_from_config(name: str, config: object) -> TeacherShape:
    n = _first_int(config, ("num_hidden_layers", "n_layer", "num_layers"))
    width = _first_int(config, ("hidden_size", "n_embd", "d_model"))
    if n is None or width is None:
        raise ValueError(f"--teacher {name!r}: its config has no number of layers / hidden size")
    return TeacherShape(name, n, width, _first_int(config, ("max_position_embeddings", "n_positions", "n_ctx")))


def shape_of_model(name: str, model) -> TeacherShape:
    """The shape of a loaded teacher (authoritative: counts the blocks the hooks will find)."""
    pos = _first_int(getattr(model, "config", None), ("max_position_embeddings", "n_positions", "n_ctx"))
    return TeacherShape(name, n_layers(model), hidden_size(model), pos)


def _gguf_shape(name: str, path: Path) -> TeacherShape | None:
    """Depth, width and context of a GGUF teacher from the file's header (gguf-py, which transformers
    uses to read GGUF): ~4 s for SmolLM2 where loading the model takes ~30 s. None if unreadable."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

        def get(key: str) -> int | None:
            f = reader.fields.get(f"{arch}.{key}")
            return None if f is None else int(f.parts[f.data[0]][0])

        n, width = get("block_count"), get("embedding_length")
        return TeacherShape(name, n, width, get("context_length")) if n and width else None
    except Exception:  # no gguf-py, another layout: the caller loads the model and asks it instead
        return None


def peek_teacher(name: str) -> TeacherShape | None:
    """The teacher's shape from its config alone (the header of a GGUF file); None when that cannot be
    read without loading the model (then the caller loads it and uses :func:`shape_of_model`).
    ValueError for a path that does not exist, an alias whose package is missing, or a hub id that
    cannot be read (offline and not cached)."""
    from transformers import AutoConfig

    from common.teacher import resolve_teacher

    try:
        src = resolve_teacher(name)
    except ValueError as e:
        raise ValueError(f"--teacher: {e}") from e
    if src.gguf_file:
        return _gguf_shape(name, Path(src.path) / src.gguf_file)
    try:
        config = AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--teacher {name!r}: cannot read its config ({one_line(e)[:200]}); pass a model directory, "
            "a .gguf file, smollm2-135m, or a hub id that is cached or reachable"
        ) from e
    return shape_from_config(name, config)


def teacher_shape(name: str, device: str, dtype: str = "float32") -> tuple[TeacherShape, torch.nn.Module | None]:
    """(shape, teacher): the shape from the config alone when :func:`peek_teacher` can read it (teacher
    None), else from the model, loaded on ``device`` in ``dtype`` and returned for the caller to use."""
    shape = peek_teacher(name)
    if shape is not None:
        return shape, None
    from common.teacher import load_teacher

    model = load_teacher(name, device, dtype)
    return shape_of_model(name, model), model


def check_window(seq_len: int, shape: TeacherShape, flag: str) -> None:
    if shape.max_positions is not None and seq_len > shape.max_positions:
        raise ValueError(
            f"{flag} {seq_len} is longer than teacher {shape.name!r} can read ({shape.max_positions} positions); "
            f"pass at most {shape.max_positions}"
        )


def check_sae_fits(sae, shape: TeacherShape, source: str) -> None:
    if sae.d_in != shape.width:
        raise ValueError(
            f"{source}: d_in={sae.d_in} does not match the teacher's width {shape.width} ({shape.name!r}): the SAE "
            "was trained on another teacher; pass its own --teacher or another --sae"
        )


# ---------------------------------------------------------------- data
def check_corpus(paths: list[str]) -> None:
    for p in paths:
        if not p.startswith("hf:") and not Path(p).exists():
            raise ValueError(f"--corpus {p} does not exist: check the path")


def check_window_source(tokens: str | None, split: str, corpus: list[str], seq_len: int) -> int:
    """The window length the data will give (``--tokens``' stage-1 windows, else ``--seq-len``), once
    the data is there (the windows themselves: sae.data.window_source)."""
    if tokens:
        return check_tokens(tokens, split)
    check_corpus(corpus)
    return seq_len


def check_tokens(tokens: str, split: str) -> int:
    """A stage-1 token directory (or manifest) that holds ``split``; returns its window length."""
    from shards import load_manifest, open_split

    try:
        m = load_manifest(tokens)
    except ValueError as e:
        raise ValueError(f"--tokens {tokens}: {one_line(e)}; "
                         "pass a stage-1 output directory (pipeline/stage1.py)") from e
    if split not in m.splits:
        raise ValueError(f"--split {split!r}: {tokens} has no such split (it has {', '.join(sorted(m.splits))})")
    if "tokens" not in m.fields:
        raise ValueError(f"--tokens {tokens}: its manifest has no 'tokens' field: not a stage-1 token dataset")
    if m.splits[split].windows == 0:
        raise ValueError(f"--split {split!r}: {tokens} holds no window in it")
    open_split(m, split, fields=["tokens"]).close()  # every shard file of the split exists
    return int(m.seq_len)


def check_writable_file(path: Path, flag: str, ours: Callable[[Path], bool]) -> None:
    """``path`` can be written, and replacing it loses nothing: absent, or a file ``ours`` accepts."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: pass a file path")
    if path.exists() and not ours(path):
        raise ValueError(f"{flag} {path} exists and was not written by this command: pass another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {parent} does not exist; create it or pass another path")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: directory {parent} is not writable: pass another path")
