"""The command-line contract every command shares: flags from a config dataclass, and one-line errors.

Flags: ``--field-name`` per field, its docstring as the help text; ``X | None`` takes an X;
``list[X]`` takes one or more values; ``Literal[...]`` gives choices; ``bool`` gives ``--flag`` /
``--no-flag``; a field without a default is required.

Errors (README, "Safe to operate"): a user mistake, whether argparse's, a ``ValueError`` from a check
or an ``OSError`` from a user's path (disk full, read-only), is one line ``error: ...`` on stderr and
exit status 2; Ctrl-C is exit 130 with what was kept. Standard library only, like the rest of ``shards``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import re
import sys
import textwrap
import typing
from collections.abc import Callable
from typing import Any, Literal, NoReturn, get_args, get_origin

# Disk-full family: the command can be rerun once there is room (whole outputs only were kept).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


class Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes (unknown flag, bad value) are one ``error: ...`` line and exit 2,
    like every other refusal, instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def one_line(e: BaseException | str) -> str:
    """A message on one line: checks that list several problems ("  - item" lines) and libraries whose
    errors span lines (transformers, torch) are joined with "; "."""
    text = str(e) or type(e).__name__
    lines = (re.sub(r"^\s*-\s+", "", line).strip() for line in text.splitlines())
    return "; ".join(line for line in lines if line).replace(":; ", ": ")


def describe_os_error(e: OSError) -> str:
    """``FILE: what went wrong[: what to do]`` for an OSError on a user's path."""
    where = f"{e.filename}: " if e.filename else ""
    hint = ""
    if e.errno in NO_SPACE:
        hint = ": free some space (or choose another output place) and rerun the same command"
    elif e.errno in _NO_WRITE:
        hint = ": choose a place you can write"
    return one_line(f"{where}{e.strerror or e}{hint}")


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None,
            interrupted: str = "interrupted; rerun the same command to continue") -> int:
    """Run a command's ``main`` under the error contract above; returns the exit status (``main``'s own
    when it returns an int). A KeyboardInterrupt that carries a message (what was saved) prints it."""
    try:
        result = main(argv)
    except ValueError as e:  # a check refused the input: its message says what to do
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a user's path: unreadable, not writable, disk full
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{one_line(e) if str(e) else interrupted}", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass (attribute docstrings), its
    dataclass bases' included (a subclass's own docstring wins for a field it redeclares)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    # argparse formats help
                    docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs


def _unwrap(tp: Any) -> Any:
    """The inner type of ``X | None``."""
    args = get_args(tp)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        shown = has_default and default not in ("", None, [])
        kw: dict[str, Any] = {"dest": f.name, "help": help_ + (f" (default: {default})" if shown else "")}
        if has_default:
            kw["default"] = default
        if not has_default or f.name in required:
            kw["required"] = True
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = str
        elif get_origin(tp) is list:
            kw["nargs"] = "+"
            kw["type"] = get_args(tp)[0]
        else:
            kw["type"] = tp
        parser.add_argument(flag, **kw)


def dataclass_from_args(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def config_flags(cfg: Any) -> list[str]:
    """The flags that give the dataclass config ``cfg``: every field whose value differs from its default
    (``--no-X`` for a false boolean whose default is true); what a refusal quotes as the command to run."""
    words: list[str] = []
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, f.name)
        if value is None or value == default:  # a required field (default MISSING) is always written
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return words
