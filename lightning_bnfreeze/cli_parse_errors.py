"""jsonargparse's parse errors read as one line: where (config key and class), the argument, what is wrong.

jsonargparse reports a wrong value as a tree of ``Parser key "k":`` and ``Problem with given
class_path 'c':`` lines, with the alternatives of a Union as ``- `` items, around the line that says
what is wrong. :func:`parse_error` finds that line and the path to it, and says it in one line::

    trainer.callbacks (lightning_bnfreeze.GradualUnfreeze): `lr_scale` must be a number, got 'fast'.

:class:`lightning_bnfreeze.cli.ClearErrorsParser` prints it instead of the message and the usage.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from lightning_bnfreeze.names import closest_names

__all__ = ["import_object", "parse_error"]

# The lines of jsonargparse's parse errors: the tree's nodes, and what is said in them.
_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":')
_CLASS = re.compile(r"Problem with given class_path '(?P<class_path>[\w.]+)':")
_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value( type)?: |tip: |Subclass types"
)
_DEAD_END = re.compile(  # alternatives that were not meant: their lines, and those under them, say nothing
    r"Not a valid subclass of |Expected a <class 'NoneType'>|Import path \S+ does not correspond to a subclass of "
)
_EXPECTED = re.compile(
    r"Expected a (?:<class '(?P<type>\w+)'>(\. Got value: (?P<value>.*))?"
    r"|typing\.Literal\[(?P<literal>.*)\]|dot import path string: (?P<path>.*))"
)
_GIVEN = re.compile(r"\s*Given value: (?P<value>.*)")
_REQUIRED = re.compile(r"the following arguments are required: (?P<names>.+)")
_NOT_ACCEPTED = re.compile(r"Option '(?P<key>\w+)' is not accepted")
_YAML_ERROR = "Problems parsing config"
_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
_CLASS_HINT = (
    " (a config written for LightningCLI(MyModel, MyDataModule) names no class: name them first,"
    " `--model my_project.MyModel --data my_project.MyDataModule --config config.yaml`)"
)


def parse_error(message: str) -> str | None:
    """jsonargparse's error ``message`` as one line: where (config key and class), the argument, what is wrong.

    ``None`` for an empty message. Examples::

        >>> parse_error('Parser key "trainer.max_epochs":\\n  Expected a <class \\'int\\'>. Got value: ten')
        "`trainer.max_epochs` must be an integer, got 'ten'."
    """
    if message.startswith(_YAML_ERROR):  # a config that is no YAML: where, as the last mark YAML names
        lines = re.findall(r"line (\d+), column (\d+)", message)
        return message.splitlines()[0] + (f" (line {lines[-1][0]}, column {lines[-1][1]})" if lines else "")
    found = _first_cause(message)
    if found is None:
        return None
    path, leaf, types, value = found
    where: list[str] = []
    argument = None
    for kind, name in path:
        if kind == "class":
            where.append(f"{argument} ({name})" if argument else name)
            argument = None
        else:
            argument = name if argument is None else f"{argument}.{name}"
    if _EXPECTED.fullmatch(leaf) and argument:
        what = f"`{argument}` must be {' or '.join(types)}, got {value!r}."
    elif required := _REQUIRED.fullmatch(leaf):
        names = ", ".join(f"`{name.strip()}`" for name in required["names"].split(","))
        what = f"{names} is required (no default): give it{_CLASS_HINT if names in ('`model`', '`data`') else ''}."
    elif (unknown := _NOT_ACCEPTED.fullmatch(leaf)) and path and path[-1][0] == "class":
        what = _unknown_argument(unknown["key"], path[-1][1], message)
    else:
        what = f"`{argument}`: {leaf}" if argument else leaf
    return f"{', '.join(where)}: {what}" if where else what


def _first_cause(message: str) -> tuple[list[tuple[str, str]], str, list[str], str] | None:
    """The path (``("key", k)``, ``("class", c)``) to the first line of ``message`` that says what is wrong, that
    line, the types its sibling ``Expected a <class 'T'>`` lines name (a value matching none of a Union's), and the
    value given there."""
    stack: list[tuple[int, str, str]] = []
    dead_end: int | None = None
    leaf: tuple[list[tuple[str, str]], str, int] | None = None
    types: list[str] = []
    value = ""
    for raw in message.splitlines():
        text = raw.strip().removeprefix("- ")
        indent = len(raw) - len(raw.lstrip())
        if leaf is not None and not value and (given := _GIVEN.fullmatch(raw)) and indent < leaf[2]:
            value = given["value"]  # a Union's alternatives leave the value out
        if not text or (dead_end is not None and indent > dead_end):
            continue
        dead_end = None
        if _DEAD_END.match(text):
            dead_end = indent
            continue
        if _NOISE.match(text):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [(kind, name) for _, kind, name in stack]
        if leaf is not None:
            if (expected := _EXPECTED.fullmatch(text)) and path == leaf[0] and indent == leaf[2]:
                types.append(_kind(expected))
        elif key := _KEY.fullmatch(text):
            stack.append((indent, "key", key["key"]))
        elif class_path := _CLASS.fullmatch(text):
            stack.append((indent, "class", class_path["class_path"]))
        else:
            leaf = (path, text, indent)
            expected = _EXPECTED.fullmatch(text)
            types, value = ([_kind(expected)], expected["value"] or expected["path"] or "") if expected else ([], "")
    return None if leaf is None else (leaf[0], leaf[1], types, value)


def _kind(expected: re.Match[str]) -> str:
    """What an ``Expected a ...`` line asks for, in words: ``a number``, ``one of 'auto', 'released'``, ..."""
    if expected["literal"] is not None:
        return f"one of {expected['literal']}" if "," in expected["literal"] else expected["literal"]
    if expected["type"] is None:
        return "a class ({class_path: ..., init_args: {...}})"
    return _TYPES.get(expected["type"], f"a {expected['type']}")


def _unknown_argument(key: str, class_path: str, message: str) -> str:
    """``no argument `key` (given value); did you mean `closest`?`` for ``class_path``'s arguments."""
    cls = import_object(class_path)
    try:
        parameters = inspect.signature(cls).parameters.values() if callable(cls) else ()
    except (TypeError, ValueError):
        parameters = ()
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    given = re.search(rf"(?:{key}=|'{key}': )'?([^',)}}]*)", message)
    value = f" (given {given[1]})" if given else ""
    close = closest_names(key, names, count=1)
    if close:
        return f"no argument `{key}`{value}; did you mean `{close[0]}`?"
    if not names:
        return f"no argument `{key}`{value}; {class_path} takes none{_CLASS_HINT}."
    return f"no argument `{key}`{value}; its arguments are {', '.join(f'`{name}`' for name in names)}."


def import_object(path: str) -> Any:
    """The object a dotted ``module.name`` path names, or ``None``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):
        return None
