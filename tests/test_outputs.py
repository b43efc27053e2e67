"""pipeline/outputs.py, the output-place rules both stages share: the command a refusal prints, the
writable-directory check, and removal that touches only what the caller owns. Stage 1 runs through
them end to end in tests/test_stage1_ops.py; these pin the pieces stage 2 adopts too."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

import pytest

from pipeline.outputs import (
    check_writable_dir,
    command_line,
    inspect_file_target,
    is_run_log,
    remove_temporaries_of,
    shown_names,
)
from shards.runlog import append_run


@dataclass
class Cfg:
    corpus: list[str]
    out: str
    seed: int = 0
    manifest: str | None = None
    overwrite: bool = False
    verify: bool = True
    extra: list[str] = field(default_factory=list)


def test_command_line_lists_only_what_differs_from_the_defaults():
    cfg = Cfg(corpus=["a b.txt", "c.txt"], out="o")
    assert command_line(("python", "-m", "x"), cfg) == "python -m x --corpus 'a b.txt' c.txt --out o"
    got = command_line(("python", "-m", "x"), cfg, seed=3, overwrite=True, verify=False, manifest="m.json")
    assert shlex.split(got) == ["python", "-m", "x", "--corpus", "a b.txt", "c.txt", "--out", "o", "--seed", "3",
                                "--manifest", "m.json", "--overwrite", "--no-verify"]
    assert cfg.seed == 0 and not cfg.overwrite  # the changes apply to a copy


def test_check_writable_dir(tmp_path):
    check_writable_dir(tmp_path / "new" / "deeper", "--out")  # to be made: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_writable_dir(tmp_path / "f", "--out")
    with pytest.raises(ValueError, match="is a file, so no directory can be made under it"):
        check_writable_dir(tmp_path / "f" / "sub", "--out")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable by this user"):
            check_writable_dir(locked / "out", "--out")


def test_inspect_file_target(tmp_path):
    assert inspect_file_target(str(tmp_path / "m.json"), "--manifest").kind == "absent"
    (tmp_path / "m.json").write_text("hello")
    assert inspect_file_target(str(tmp_path / "m.json"), "--manifest").kind == "other"
    with pytest.raises(ValueError, match="is a directory: pass a file path"):
        inspect_file_target(str(tmp_path), "--manifest")


def test_remove_temporaries_of_touches_only_its_own(tmp_path):
    target = tmp_path / "m.json"
    names = [".m.json.tmp-0123abcd", ".m.json.tmp-mine", ".m.json.tmp-0123abcdX", ".n.json.tmp-0123abcd", "m.json"]
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / ".m.json.tmp-89abcdef").mkdir()  # a Zarr shard's temporary is a directory
    remove_temporaries_of(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_is_run_log_and_shown_names(tmp_path):
    append_run(tmp_path, {"command": "pipeline.stage1", "outcome": "wrote"})
    assert is_run_log(tmp_path / "runs.jsonl", "pipeline.stage1")
    assert not is_run_log(tmp_path / "runs.jsonl", "pipeline.extract")
    (tmp_path / "notes.txt").write_text("mine\n")
    assert not is_run_log(tmp_path / "notes.txt", "pipeline.stage1")
    assert shown_names(["a", "b"]) == "a, b"
    assert shown_names([str(i) for i in range(10)], limit=3) == "0, 1, 2, ... (10 in all)"
