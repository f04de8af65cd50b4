"""What the command modules share: the options several commands take (declared here once), the
argument types, the ``--set KEY=VALUE`` reader, and the error of a command used the wrong way.

``--threads`` takes effect in ``hybrid.cli.main`` before any command runs; ``--device``,
``--dtype`` and ``--seed`` are passed on by each command to the code that uses them.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from blocks.errors import InputError
from hybrid.formats.model_source import DTYPES
from hybrid.formats.text_files import TextFileError, parse_yaml
from hybrid.model.device import DeviceError, resolve_device
from hybrid.model.limits import MAX_CONTEXT

MAX_INT = 2 ** 63 - 1
"""The largest integer an argument may be: what torch and the recipes' 64-bit integers hold."""
MAX_THREADS = 1024


class UsageError(InputError):
    """A command used the wrong way (no prompt, a multi-token stop string, a malformed --set...)."""


# ----------------------------------------------------------------------------- the parser

class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (no usage block): the command, the argument, the
    problem and where to look, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- argument types
# Every type checks its range when the command line is parsed, so a bad value never reaches the work.

def integer(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argument type: an integer in [low, high], described as ``what`` in errors."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip()) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = integer(1, MAX_INT, "a positive integer")
count = integer(0, MAX_INT, "an integer >= 0")
seed = integer(0, MAX_INT, f"a seed in [0, {MAX_INT}]")
threads = integer(1, MAX_THREADS, f"a thread count in [1, {MAX_THREADS}]")


def number(low: float, high: float, what: str, low_open: bool = False) -> Callable[[str], float]:
    """An argument type: a finite number in [low, high] (``low_open``: (low, high]), described as ``what``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}")
        return value

    parse.__name__ = what
    return parse


def token_count(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576): a positive count of tokens, at most ``MAX_CONTEXT``."""
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:].lower(), 1)
    try:
        amount = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 4096 or 4k, got {text[:40]!r}") from None
    if not (math.isfinite(amount) and 1 <= amount <= MAX_CONTEXT):
        raise argparse.ArgumentTypeError(f"expected a token count in [1, {MAX_CONTEXT}] ({MAX_CONTEXT >> 20}m), "
                                         f"got {text[:40]!r}")
    return int(amount)


def token_count_or_zero(text: str) -> int:
    """A token count (``token_count``), or 0."""
    return 0 if text.strip() == "0" else token_count(text)


def utf8_text(value: str) -> str:
    """Text given on the command line: it must be UTF-8 (the shell passes undecodable bytes through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value[err.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise argparse.ArgumentTypeError(f"not UTF-8 text ({byte} at character {err.start}); pass UTF-8 text") from None
    return value


def device(name: str) -> str:
    """A device this torch build can use (``hybrid.model.device``); kept as written."""
    try:
        resolve_device(name, "device")
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def output_file(path: str) -> str:
    """A file a command will write: not a folder, in a folder that can be written (made now if it is
    missing). Checked before the work, so no result is lost at the end."""
    target = Path(path)
    if not path.strip() or target.is_dir():
        raise argparse.ArgumentTypeError(f"{path!r} is a folder: name the file to write")
    try:
        check_writable_folder(target.parent, path)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return path


def output_folder(path: str) -> str:
    """A folder a command will write into: a folder or nothing yet, in a folder that can be written
    (made now if it is missing)."""
    try:
        check_output_folder(Path(path))
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return path


def check_output_folder(folder: Path) -> Path:
    """``output_folder`` for a folder a command chose itself (a default): a ``UsageError`` if it cannot be written."""
    if not str(folder).strip() or (folder.exists() and not folder.is_dir()):
        raise UsageError(f"{str(folder)!r} is a file: name a folder to write into")
    check_writable_folder(folder if folder.is_dir() else folder.parent, str(folder))
    return folder


def check_writable_folder(folder: Path, path: str) -> None:
    """Make ``folder`` (and those above it) if missing, then write and remove a probe file in it; a
    ``UsageError`` says why ``path`` cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (folder, *folder.parents) if p.exists())
        raise UsageError(f"cannot write {path!r}: {blocker} is a file, not a folder") from None
    except OSError as err:
        raise UsageError(f"cannot write {path!r}: {err.strerror} ({err.filename or folder})") from None


# ----------------------------------------------------------------------------- shared options

def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")


def add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and compute dtype (default: as saved)")


def add_threads(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--threads", type=threads, default=None, help=help)


def add_seed(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--seed", type=seed, default=0, help=help)


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
            value = parse_yaml(text, f"--set {item}")
        except TextFileError as err:
            raise UsageError(str(err)) from None
        pairs.append((parts, value))
    return pairs


def default_output_dir(root: str, name: str) -> Path:
    """``root/<name as a folder name>``: where bench and eval write when no --out is given."""
    return Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_.")
