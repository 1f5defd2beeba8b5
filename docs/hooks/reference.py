"""MkDocs hook: the configuration and command-line references, generated from the code at every build.

The configuration reference is read from the schema itself (trainer/config.py): every key of every dataclass,
its type, default and range (the `ranged` metadata that load_config enforces), and its help line (the comments
written next to it, which are the schema's documentation). The command-line reference is argparse's own help of
each sub-command of trainer/cli.py. Nothing is copied by hand, so neither page can drift from the code: a key added
to the schema is on the page at the next build. tests/test_docs.py checks both pages against the schema and the
parser, and builds the site with --strict.

A page asks for a reference with a marker line: `<!-- reference: config -->` or `<!-- reference: cli -->`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import re
import tokenize
import typing
from pathlib import Path

MARKER = re.compile(r"^<!-- reference: (config|cli) -->$", re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs' hook: the page's Markdown, rewritten
    return MARKER.sub(lambda m: config_reference() if m.group(1) == "config" else cli_reference(), markdown)


# ---- configuration: the schema's dataclasses, their fields and the comments beside them ----

def _comments(source: str) -> dict:
    """Line number -> the text of the comment on that line, and the set of lines holding nothing but one."""
    found, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                alone.add(tok.start[0])
    return found, alone


def _field_help(source: str) -> dict:
    """(class name, field name) -> its help: the comment lines directly above the field (up to a blank line or
    code) followed by the comment at the end of its own lines, as the schema writes them."""
    comments, alone = _comments(source)
    lines = source.splitlines()
    helps = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line >= 1 and line in alone and lines[line - 1].strip():
                above.insert(0, comments[line])
                line -= 1
            own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in alone]
            helps[(cls.name, node.target.id)] = " ".join(above + own)
    return helps


def _type_name(hint) -> str:
    """A field's type in words a YAML user reads: `int`, `float or null`, one of `a`, `b`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + (" or null" if len(rest) < len(args) else "")
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, typing.Dict):
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if hint is typing.Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _yaml(value) -> str:
    """A default as it is written in a recipe or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value in ("", " ") else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_rows():
    """(section, its docstring, [(key, type, default, range, help, resume_safe)]) for every dataclass of the
    schema, the top-level keys first, in the schema's order."""
    from trainer import config as schema

    helps = _field_help(Path(schema.__file__).read_text())
    sections = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=False)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                nested.append((hints[f.name], key + "."))
                continue
            rng = f.metadata.get("range")
            rows.append((key, _type_name(hints[f.name]), _yaml(_default(f)), str(rng) if rng else "",
                         helps.get((cls.__name__, f.name), ""), key.startswith(schema.RESUME_SAFE_KEYS)))
        doc = (cls.__doc__ or "") if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""
        if rows:
            sections.append((prefix.rstrip(".") or "top level", " ".join(doc.split()), rows))
        for sub, sub_prefix in nested:
            walk(sub, sub_prefix)

    walk(schema.Config, "")
    return sections


def config_reference() -> str:
    out = []
    for section, doc, rows in config_rows():
        out += [f"## `{section}`" if section != "top level" else "## Top level", ""]
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for key, kind, default, rng, help_, safe in rows:
            note = " *May change on resume.*" if safe else ""
            out.append(f"| `{key}` | {_cell(kind)} | `{_cell(default)}` | {_cell(rng)} | {_cell(help_)}{note} |")
        out.append("")
    return "\n".join(out)


# ---- command line: argparse's help of `trainer` and of each sub-command it lists ----

def cli_commands():
    """(name, its one-line help, its full --help text) of every sub-command `trainer --help` lists, and the top
    level first as ("trainer", description, help)."""
    from trainer.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {choice.dest: choice.help for choice in sub._choices_actions}  # hidden sub-commands have no help
    out = [("trainer", parser.description or "", _help(parser))]
    out += [(name, listed[name], _help(p)) for name, p in sub.choices.items() if name in listed]
    return out


def _help(parser: argparse.ArgumentParser) -> str:
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # the same wrapping wherever the site is built
    try:
        return parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_reference() -> str:
    out = []
    for name, _, text in cli_commands():
        title = "trainer" if name == "trainer" else f"trainer {name}"
        out += [f"## `{title}`", "", "```text", text.rstrip(), "```", ""]  # its help opens with the summary
    return "\n".join(out)
