"""Text files from users, read strictly: UTF-8 only, and YAML that refuses a key written twice in one
mapping; every problem is an error of one line naming the file, where in it, and the problem.

PyYAML keeps the last of two equal keys and says nothing, so a second ``model:`` block or a
repeated option silently replaces the first. ``StrictLoader`` is PyYAML's ``SafeLoader`` (plain
data only: no Python objects are ever built) with one more rule: the explicit keys of a mapping
are unique. Keys brought in by a merge (``<<: *defaults``) may still be overridden, as YAML intends.

``read_utf8`` (and so ``read_yaml_file``) refuses bytes that are not UTF-8, naming the first one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from blocks.errors import InputError

MERGE_TAG = "tag:yaml.org,2002:merge"


class TextFileError(InputError):
    """Text that is not UTF-8, or not valid YAML; the message names the source, where, and the problem."""


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys in a mapping (see the module docstring)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            seen = key in first_line
        except TypeError:  # an unhashable key: SafeLoader's own error says so
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping, on lines {first_line[key]} and {line}: "
                            "keep one of them", None)
        first_line[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """``text`` read as YAML with ``StrictLoader``; any problem is a ``TextFileError`` of one line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as err:
        raise TextFileError(f"{source}: not valid YAML: {describe_yaml_error(err)}") from None
    except RecursionError:
        raise TextFileError(f"{source}: not valid YAML: nested too deeply") from None


def read_yaml_file(path: Path) -> Any:
    """The YAML document in the file ``path`` (UTF-8 text), read with ``StrictLoader``."""
    return parse_yaml(read_utf8(path), str(path))


def read_utf8(path: Path) -> str:
    """The text of ``path``; bytes that are not UTF-8 are a ``TextFileError`` naming the first one."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TextFileError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}, "
                             f"line {line}); save it as UTF-8") from None


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's error (several lines, with a context) as one line: 'line L, column C: problem'."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(part for part in (err.context, err.problem) if part)
        return where + " ".join(problem.split())
    return " ".join(str(err).split())
