"""argparse from a config dataclass: one flag per field, its docstring as the help text.

Shared by every command (stage 1, stage 2, SAE training, the trainer) so their flags behave alike:
``--field-name`` per field; ``X | None`` takes an X; ``list[X]`` takes one or more values;
``Literal[...]`` gives choices; ``bool`` gives ``--flag`` / ``--no-flag``; a field without a default
is required. Standard library only, like the rest of ``shards``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Literal, get_args, get_origin


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")  # argparse formats help
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
