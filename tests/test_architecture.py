"""The layering of the packages, checked from the source (docs/architecture.md).

Every ``.py`` file of the project packages is parsed with ``ast`` and every import is collected,
wherever it sits (module level, inside a function, under ``if TYPE_CHECKING``): a lazy import runs
the same code when it fires, so it is held to the same rule. Layers, bottom up:

    0  common/, shards/          the ground (shards may use common.cli and common.device only)
    1  sae/, trainer/            libraries (never each other)
    2  pipeline/                 stage 1, stage 2, Ray
    3  recipes/, bench/          whole-system drivers and benchmarks (never each other)

A module may import its own package and packages of a lower layer; every other arrow fails with the
file, the line and the rule. Beyond the layers: shards/ and common/cli.py pull in nothing heavy
(torch, transformers, Ray, ...) even transitively, the trainer never imports Ray or model classes, and
no module shadows a standard-library module or one of our packages (``python bench/x.py`` puts
``bench/`` first on ``sys.path``). And the documentation stays in the repository: no file cites notes
that live outside it, and the files docs/ names exist.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS: dict[str, int] = {
    "common": 0,
    "shards": 0,
    "sae": 1,
    "trainer": 1,
    "pipeline": 2,
    "recipes": 3,
    "bench": 3,
}
"""Project package -> its layer. A package may import packages of a strictly lower layer."""

SAME_LAYER_ALLOWED: dict[str, set[str]] = {"shards": {"common.cli", "common.device"}}
"""Exceptions inside one layer: shards/ may use the ground's light modules (never teacher/corpus)."""

HEAVY = ("torch", "transformers", "ray", "tokenizers", "accelerate", "gguf", "datasets", "sae_lens", "sparsify")
"""Third-party packages the light ground (shards/, common/cli.py) must never pull in."""

THIRD_PARTY_SHADOWED = ("torch", "numpy", "ray", "transformers", "tokenizers", "pyarrow", "zarr", "safetensors",
                        "datasets", "tqdm", "matplotlib", "gguf", "accelerate", "pytest")
"""Dependencies a script's folder must not shadow either (``sys.path[0]`` is the script's folder)."""

# trainer/: the student reads shards and never loads a teacher (README "Training the student"). Two
# commands need the teacher's *tokenizer*: generate (to encode a prompt) and synthetic (a toy
# tokenizer for smoke runs). They may import exactly these names, lazily, and nothing else does.
TRAINER_TOKENIZER_MODULES = ("trainer.generate", "trainer.synthetic")
TRAINER_ALLOWED_NAMES: dict[str, set[str]] = {
    "common.teacher": {"resolve_teacher", "tokenizer_fingerprint", "load_tokenizer"},
    "transformers": {"AutoTokenizer", "PreTrainedTokenizerFast"},
    "tokenizers": {"Tokenizer", "models", "pre_tokenizers", "decoders", "trainers"},
}
TRAINER_LIGHT_COMMON = ("common.cli", "common.device", "common.tracking")
"""What every trainer module may use of common/."""
TRAINER_NEVER = ("ray", "sae", "pipeline", "recipes", "bench", "sae_lens", "sparsify", "accelerate", "gguf")
# trainer/hf_remote/ is the CoCoMix student written for transformers: a resource that `python -m
# trainer.export` copies into an export directory, where transformers imports it (trust_remote_code;
# docs/export.md). It must subclass transformers' model classes, so the trainer's rules above do not
# apply to it; instead no trainer module imports it and it imports nothing of this project.
TRAINER_REMOTE_CODE = "trainer.hf_remote"


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module (``pipeline.runner``)."""
    path: str
    """Its file, relative to the repository root."""
    line: int
    target: str
    """The imported module, resolved to a submodule when one is named (``from shards import fields``
    -> ``shards.fields``)."""
    names: tuple[str, ...]
    """For ``from X import a, b``: (a, b); empty for ``import X``."""

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def project_files() -> dict[str, Path]:
    """Module name -> file, for every .py file under the layered packages."""
    mods: dict[str, Path] = {}
    for pkg in LAYERS:
        base = ROOT / pkg
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(ROOT).parts):
                continue
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


MODULES = project_files()


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _resolve_relative(module: str, level: int, name: str | None) -> str:
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path) -> list[Import]:
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    out: list[Import] = []
    for node in ast.walk(tree):  # every depth: function bodies, try/except, if-blocks
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Import(module, rel, node.lineno, a.name, ()))
        elif isinstance(node, ast.ImportFrom):
            src = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
            names = tuple(a.name for a in node.names)
            subs = [f"{src}.{n}" for n in names if f"{src}.{n}" in MODULES]
            if subs:  # `from shards import fields`: the submodule is what runs
                for s in subs:
                    out.append(Import(module, rel, node.lineno, s, ()))
                rest = tuple(n for n in names if f"{src}.{n}" not in MODULES)
                if rest:
                    out.append(Import(module, rel, node.lineno, src, rest))
            else:
                out.append(Import(module, rel, node.lineno, src, names))
    return out


ALL_IMPORTS: list[Import] = [i for m, p in MODULES.items() for i in imports_of(m, p)]


def top(name: str) -> str:
    return name.split(".")[0]


def _under(target: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_the_packages_exist():
    """The check would pass vacuously if the tree moved: the ground and the libraries must be here."""
    for pkg in ("common", "shards", "sae", "trainer", "pipeline"):
        assert (ROOT / pkg / "__init__.py").is_file(), f"{pkg}/ is gone: update LAYERS and docs/architecture.md"
    assert len(ALL_IMPORTS) > 100


def layer_violations(imports: list[Import] = ALL_IMPORTS) -> list[str]:
    bad = []
    for imp in imports:
        src, dst = top(imp.module), top(imp.target)
        if dst not in LAYERS or dst == src:
            continue
        if LAYERS[dst] < LAYERS[src]:
            continue
        if _under(imp.target, SAME_LAYER_ALLOWED.get(src, set())):
            continue
        what = "up the layers" if LAYERS[dst] > LAYERS[src] else "sideways within a layer"
        bad.append(
            f"{imp.where()}: {imp.module} imports {imp.target}: {what} "
            f"({src}/ is layer {LAYERS[src]}, {dst}/ is layer {LAYERS[dst]}; docs/architecture.md)"
        )
    return bad


def test_layer_rule_catches_an_upward_import():
    """The rule itself: up, sideways and shards -> common.teacher fail; down and common.cli pass."""
    fake = [
        Import("sae.train", "sae/train.py", 1, "pipeline.stage1", ()),
        Import("sae.data", "sae/data.py", 2, "trainer.data", ()),
        Import("shards.dataset", "shards/dataset.py", 3, "common.teacher", ()),
        Import("pipeline.runner", "pipeline/runner.py", 4, "sae", ("load_sae",)),
        Import("shards.dataset", "shards/dataset.py", 5, "common.cli", ()),
        Import("bench.train", "bench/train.py", 6, "recipes.demo", ()),
    ]
    assert [b.split(":")[1] for b in layer_violations(fake)] == ["1", "2", "3", "6"]


def test_no_import_runs_up_the_layers():
    bad = layer_violations()
    assert not bad, f"{len(bad)} import(s) break the layering:\n" + "\n".join(bad)


def package_graph() -> dict[str, dict[str, Import]]:
    """Package -> package it imports -> one import that makes the arrow (for the message)."""
    g: dict[str, dict[str, Import]] = {p: {} for p in LAYERS}
    for imp in ALL_IMPORTS:
        src, dst = top(imp.module), top(imp.target)
        if dst in LAYERS and dst != src:
            g[src].setdefault(dst, imp)
    return g


def find_cycles(g: dict[str, dict[str, Import]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(node: str, stack: list[str]) -> None:
        for nxt in sorted(g.get(node, {})):
            if nxt in stack:
                cyc = stack[stack.index(nxt):] + [nxt]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cyc)
            elif len(stack) < len(g):
                walk(nxt, stack + [nxt])

    for start in sorted(g):
        walk(start, [start])
    return cycles


def test_find_cycles_finds_a_cycle():
    """The detector itself: a -> b -> c -> a is one cycle, reported once."""
    imp = Import("x", "x.py", 1, "y", ())
    g = {"a": {"b": imp}, "b": {"c": imp}, "c": {"a": imp}, "d": {"a": imp}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": imp}, "b": {}}) == []


def test_no_package_cycle():
    g = package_graph()
    msgs = []
    for cyc in find_cycles(g):
        steps = [f"{a} -> {b} ({g[a][b].where()} imports {g[a][b].target})" for a, b in pairwise(cyc)]
        msgs.append(" ; ".join(steps))
    assert not msgs, "package cycle(s):\n" + "\n".join(msgs)


def test_relative_imports_resolve():
    """`from .x import y` inside a package resolves to that package's module (the checker's own rule)."""
    assert _resolve_relative("shards.dataset", 1, "fields") == "shards.fields"
    assert _resolve_relative("shards", 1, "fields") == "shards.fields"  # shards/__init__.py
    targets = {i.target for i in ALL_IMPORTS if i.module == "shards"}
    assert "shards.manifest" in targets


def closure(start: str) -> dict[str, Import]:
    """Every module that importing ``start`` can run (following project imports, lazy ones included,
    and the packages' ``__init__`` files), mapped to the import that first reaches it."""
    by_module: dict[str, list[Import]] = {}
    for imp in ALL_IMPORTS:
        by_module.setdefault(imp.module, []).append(imp)
    reached: dict[str, Import] = {}
    todo = [start]
    while todo:
        m = todo.pop()
        for imp in by_module.get(m, []):
            t = imp.target
            chain = [".".join(t.split(".")[: i + 1]) for i in range(len(t.split(".")))]
            for c in chain:  # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c
                if c not in reached:
                    reached[c] = imp
                    if c in MODULES:
                        todo.append(c)
    return reached


LIGHT = [m for m in MODULES if top(m) == "shards"] + ["common.cli"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_ground_pulls_in_nothing_heavy(module):
    """The trainer imports shards/ and common.cli; neither may drag torch, transformers or Ray in."""
    bad = [
        f"{imp.where()} ({imp.module} imports {name})"
        for name, imp in closure(module).items()
        if top(name) in HEAVY
    ]
    assert not bad, f"{module} reaches heavy packages: " + "; ".join(sorted(set(bad)))


def trainer_violations(imports: list[Import] = ALL_IMPORTS) -> list[str]:
    bad = []
    for imp in imports:
        if top(imp.module) != "trainer" or _under(imp.module, (TRAINER_REMOTE_CODE,)):
            continue
        t = imp.target
        if _under(t, TRAINER_NEVER):
            bad.append(f"{imp.where()}: {imp.module} imports {t}: the trainer never imports {top(t)}")
            continue
        gated = next((g for g in TRAINER_ALLOWED_NAMES if _under(t, (g,))), None)
        if top(t) == "common" and not _under(t, TRAINER_LIGHT_COMMON) and gated is None:
            light = ", ".join(TRAINER_LIGHT_COMMON)
            bad.append(f"{imp.where()}: {imp.module} imports {t}: the trainer uses only {light} of common/")
        elif gated is not None:
            extra = set(imp.names) - TRAINER_ALLOWED_NAMES[gated]
            if imp.module not in TRAINER_TOKENIZER_MODULES:
                bad.append(f"{imp.where()}: {imp.module} imports {t}: only "
                           f"{', '.join(TRAINER_TOKENIZER_MODULES)} may load a tokenizer")
            elif not imp.names or extra or t != gated:
                what = ", ".join(sorted(extra)) if extra else f"the module {t}"
                bad.append(f"{imp.where()}: {imp.module} imports {what}: only the tokenizer names "
                           f"{sorted(TRAINER_ALLOWED_NAMES[gated])} of {gated} are allowed in the trainer")
    return bad


def test_trainer_never_loads_teacher_code():
    """No Ray, no SAE, no pipeline, no transformers model classes anywhere in trainer/; tokenizer
    loading only in generate/synthetic, by name (the run itself: tests/test_trainer_objectives.py)."""
    bad = trainer_violations()
    assert not bad, "\n".join(bad)


def remote_code_violations(imports: list[Import] = ALL_IMPORTS) -> list[str]:
    bad = []
    for imp in imports:
        inside = _under(imp.module, (TRAINER_REMOTE_CODE,))
        if inside and top(imp.target) in LAYERS and not _under(imp.target, (TRAINER_REMOTE_CODE,)):
            bad.append(f"{imp.where()}: {imp.module} imports {imp.target}: an export must load without this project")
        elif not inside and _under(imp.target, (TRAINER_REMOTE_CODE,)):
            bad.append(f"{imp.where()}: {imp.module} imports {imp.target}: it is copied into exports, never imported")
    return bad


def test_trainer_remote_code_is_only_a_resource():
    """trainer/hf_remote/ imports nothing of ours and nothing imports it (the rule itself: both arrows fail)."""
    assert not remote_code_violations(), "\n".join(remote_code_violations())
    remote, path = "trainer.hf_remote.modeling_cocomix", "trainer/hf_remote/modeling_cocomix.py"
    fake = [Import(remote, path, 1, "trainer.model", ()),
            Import("trainer.export", "trainer/export.py", 2, remote, ()),
            Import(remote, path, 3, "trainer.hf_remote.configuration_cocomix", ())]
    assert [b.split(":")[1] for b in remote_code_violations(fake)] == ["1", "2"]


def test_trainer_rule_catches_a_model_class():
    """The rule rejects what it is meant to reject (a model class, a tokenizer outside generate)."""
    fake = [
        Import("trainer.generate", "trainer/generate.py", 1, "transformers", ("AutoModelForCausalLM",)),
        Import("trainer.loop", "trainer/loop.py", 2, "common.teacher", ("tokenizer_fingerprint",)),
        Import("trainer.generate", "trainer/generate.py", 3, "transformers", ()),
        Import("trainer.generate", "trainer/generate.py", 4, "transformers", ("AutoTokenizer",)),
    ]
    bad = trainer_violations(fake)
    assert [b.split(":")[1] for b in bad] == ["1", "2", "3"], bad


def test_no_module_shadows_a_package():
    """`python bench/extract.py` put bench/ first on sys.path, so bench/sae.py was imported as `sae`;
    `pipeline/tokenize.py` hid the standard library's tokenize the same way. No file may be named like
    a standard-library module, one of our packages or a dependency."""
    reserved = set(sys.stdlib_module_names) | set(LAYERS) | {"tests", "scripts", "cocomix"} | set(THIRD_PARTY_SHADOWED)
    bad = []
    for f in MODULES.values():
        stem = f.stem
        if stem in ("__init__", "__main__"):
            continue
        if stem in reserved:
            why = "the standard library" if stem in sys.stdlib_module_names else "a package"
            bad.append(f"{f.relative_to(ROOT).as_posix()}: '{stem}' is also {why}'s name")
    assert not bad, "\n".join(bad)


# The project notes outside the repository; spelled in parts so this file does not cite them itself.
_OUTSIDE_NOTES = re.compile(r"\b(" + "|".join(["DESIGN", "COCOMIX", "NOTES", "STYLE"]) + r")\.md\b")
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh", ".json", ".ini"}


def repo_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
        files = [ROOT / p for p in out if p]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (e.g. an sdist)
        files = [p for p in ROOT.rglob("*") if not any(s.startswith(".") or s in ("runs", "__pycache__")
                                                      for s in p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file() and (p.suffix in _TEXT_SUFFIXES or p.name in ("Makefile", "Dockerfile"))]


def test_every_citation_is_in_the_repo():
    """Comments cite repository files (docs/*.md), never notes a clone does not have."""
    bad = []
    for f in repo_text_files():
        if f.stat().st_size > 2_000_000:
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _OUTSIDE_NOTES.search(line):
                bad.append(f"{f.relative_to(ROOT).as_posix()}:{n}: {line.strip()[:100]}")
    assert not bad, f"{len(bad)} citation(s) of notes outside the repository (cite docs/ instead):\n" + "\n".join(bad)


# A path a document names, e.g. `pipeline/attribution.py` or `docs/data.md` (not OUT/..., not ../shared/...).
_CITED_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join([*LAYERS, "tests", "docs", "manifests", "scripts"])
                         + r")/[\w./-]*\w)")


def test_documents_name_files_that_exist():
    """docs/ and the package READMEs name files of this repository: each must exist, so a move or a
    rename updates them too (a path followed by '*', '{' or '<' is a pattern and skipped)."""
    docs = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "trainer" / "README.md", ROOT / "sae" / "README.md"]
    bad = []
    for doc in docs:
        if not doc.is_file():
            continue
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in _CITED_PATH.finditer(line):
                if line[m.end():m.end() + 1] in ("*", "{", "<"):
                    continue
                if not (ROOT / m.group(1)).exists():
                    bad.append(f"{doc.relative_to(ROOT).as_posix()}:{n}: {m.group(1)} does not exist")
    assert not bad, "\n".join(bad)
