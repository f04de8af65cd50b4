"""What the command modules share: the options several commands take (declared here once), the
argument types, the ``--set KEY=VALUE`` reader, and the error of a command used the wrong way.

``--threads`` takes effect in ``hybrid.cli.main`` before any command runs; ``--device``,
``--dtype`` and ``--seed`` are passed on by each command to the code that uses them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from hybrid.formats.model_source import DTYPES


class UsageError(ValueError):
    """A command used the wrong way (no prompt, a multi-token stop string, a malformed --set...)."""


# ----------------------------------------------------------------------------- argument types

def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def count(text: str) -> int:
    """A count that may be 0."""
    return 0 if text == "0" else positive_int(text)


def token_count(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576)."""
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 4096 or 4k, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def token_count_or_zero(text: str) -> int:
    """A token count (``token_count``), or 0."""
    return 0 if text == "0" else token_count(text)


# ----------------------------------------------------------------------------- shared options

def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")


def add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and compute dtype (default: as saved)")


def add_threads(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help=help)


def add_seed(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--seed", type=int, default=0, help=help)


# ----------------------------------------------------------------------------- --set and outputs

def parse_set(items: Sequence[str], syntax: str,
              key_problem: Callable[[list[str]], str | None] = lambda parts: None) -> list[tuple[list[str], Any]]:
    """``--set KEY=VALUE`` items -> ``[(KEY split at its dots, VALUE read as YAML)]``, in order.

    ``syntax`` says in errors what an item looks like; ``key_problem(parts)`` says why a key is
    refused, or None. Each command gives the pairs its own meaning."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item}: expected {syntax}")
        parts = key.strip().split(".")
        problem = key_problem(parts)
        if problem is not None:
            raise UsageError(f"--set {item}: {problem}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"--set {item}: the value is not valid YAML: {err}") from None
        pairs.append((parts, value))
    return pairs


def default_output_dir(root: str, name: str) -> Path:
    """``root/<name as a folder name>``: where bench and eval write when no --out is given."""
    return Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_.")
