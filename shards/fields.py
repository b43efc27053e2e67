"""Per-window fields: their names, dtypes and shapes, and the numpy dtypes they are stored as."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# bfloat16 has no numpy dtype: its bits are stored as uint16 and viewed as torch.bfloat16 by readers
# that need the values (`FieldSpec.storage_dtype`).
DTYPES = ("uint8", "uint16", "uint32", "int32", "int64", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class FieldSpec:
    """One per-window array: e.g. ``tokens`` is ``uint16`` of shape ``(T + 1,)``."""

    dtype: str
    """Logical dtype, one of :data:`DTYPES`."""
    shape: tuple[int, ...]
    """Shape of the field in one window (the window axis is not included)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"field dtype {self.dtype!r} is not one of {DTYPES}")
        if not self.shape or any(int(s) <= 0 for s in self.shape):
            raise ValueError(f"field shape {self.shape!r} must be non-empty with positive sizes")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype("uint16" if self.dtype == "bfloat16" else self.dtype)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes per window."""
        return self.numel * self.storage_dtype.itemsize

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> FieldSpec:
        return cls(dtype=d["dtype"], shape=tuple(d["shape"]))


def as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of logical ``dtype`` as float32. bfloat16 is stored as its raw uint16 bits (see
    ``DTYPES``), which are the top half of the same number's float32 bits; other dtypes are cast."""
    if dtype == "bfloat16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a).astype(np.float32)


def token_dtype(vocab_size: int) -> str:
    """Smallest dtype for token ids (docs/data.md: uint16 when the vocabulary fits)."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def id_dtype(n: int) -> str:
    """Dtype for concept ids among ``n`` latents (docs/data.md: uint16 if C <= 65535 else int32)."""
    return "uint16" if n <= 65535 else "int32"


def check_window_arrays(fields: dict[str, FieldSpec], arrays: dict[str, np.ndarray], n: int | None = None) -> int:
    """Check that ``arrays`` holds every field with shape (n, *field.shape); return n."""
    missing = set(fields) - set(arrays)
    extra = set(arrays) - set(fields)
    if missing or extra:
        raise ValueError(
            f"window arrays do not match the fields: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for name, spec in fields.items():
        a = arrays[name]
        if n is None:
            n = a.shape[0]
        if a.shape != (n, *spec.shape):
            raise ValueError(f"field {name!r}: expected shape {(n, *spec.shape)}, got {a.shape}")
    return int(n or 0)
