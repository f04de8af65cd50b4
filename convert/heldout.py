"""Held-out text for the conversion report: kinds of text the distillation never sees, all offline.

``DOMAINS`` are the report's default: the play kept out of the built-in corpus (the distillation
data's own kind of text), and three kinds that no default data contains, all from Python's own
standard library (present wherever Python 3.11 is): its licence, the release notes of IDLE, and
the language reference's topics (technical documentation, as ``pydoc`` shows them).
"""

from __future__ import annotations

import dataclasses
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

from convert.distill import HELD_OUT
from convert.errors import TeacherError
from hybrid.training import data as datalib


@dataclasses.dataclass(frozen=True)
class Domain:
    """One kind of held-out text: its name, where it comes from, and how to read it."""

    name: str
    source: str  # where the text comes from, for the report
    path: Path  # the file the text is read from (the distillation data must not contain it)
    read: Callable[[Path], str] = dataclasses.field(default=lambda path: path.read_text(encoding="utf-8"))

    def text(self) -> str:
        return self.read(self.path)


def reference_topics(path: Path) -> str:
    """The language reference's topics (``pydoc_data.topics``, the module at ``path``), in the order of
    their names."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def default_domains() -> list[Domain]:
    """The report's four held-out kinds of text (see the module docstring); each file must exist."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    domains = [
        Domain("play", f"Hamlet ({HELD_OUT[0]} of the built-in corpus, kept out of the distillation data)",
               datalib.builtin_corpus() / HELD_OUT[0]),
        Domain("licence", "Python's licence text (LICENSE.txt of the standard library)", stdlib / "LICENSE.txt"),
        Domain("release notes", "IDLE's release notes (idlelib/NEWS2x.txt of the standard library)",
               stdlib / "idlelib" / "NEWS2x.txt"),
        Domain("technical docs", "the Python language reference's topics (pydoc_data/topics.py)",
               stdlib / "pydoc_data" / "topics.py", reference_topics),
    ]
    missing = [str(d.path) for d in domains if not d.path.is_file()]
    if missing:
        raise TeacherError(f"held-out text {', '.join(missing)} is missing from this Python installation: "
                           "pass your own held-out files with --eval-text")
    return domains


def file_domains(files: Sequence[str | Path]) -> list[Domain]:
    """One domain per user-given text file, named by its file name."""
    domains = []
    for f in map(Path, files):
        if not f.is_file():
            raise TeacherError(f"held-out text {f} is not a file: pass text files with --eval-text")
        domains.append(Domain(f.name, str(f), f))
    return domains
