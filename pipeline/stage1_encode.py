"""Stage 1's tokenization: text -> token ids, in batches of about ``--batch-chars`` characters.

The tokenizer is loaded once in the driver and shipped to the workers as its JSON (rebuilt in
milliseconds, once per worker process: pipeline/stage1_task.py) rather than re-parsed from a GGUF file.
"""

from __future__ import annotations

import ctypes

import numpy as np


def encoder_payload(tokenizer) -> tuple[str, object]:
    """What a worker needs to encode exactly like ``tokenizer(text, add_special_tokens=False)``."""
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
