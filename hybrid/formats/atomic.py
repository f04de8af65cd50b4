"""Atomic writes: a reader, or the next run after a crash, finds the old file or folder or the new one,
never half of one.

A file is written under a hidden temporary name in its own folder (``.<name>.<random><suffix>``)
and renamed over its path: ``os.replace`` is atomic within a filesystem. A folder is assembled
under a temporary name, flushed to disk (``fsync_folder``) and swapped into place
(``swap_into_place``), the folder it replaces kept aside until the new one is in place.

What ends up in place is readable as the umask allows (``share``), like a file written with ``open``:
the temporary names come from ``tempfile``, which creates them private (0600 files, 0700 folders),
and safetensors writes its files 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def replace_file(path: Path, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Create or replace ``path`` with the file ``write(temporary path)`` writes. The temporary file
    ends in ``suffix`` (for writers that choose the format by the name), is readable by all like any
    result file, and is removed if ``write`` fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    replace_file(path, lambda tmp: Path(tmp).write_text(text))


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file of ``tensors`` with ``metadata``, written atomically."""
    replace_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def process_umask() -> int:
    """The umask of this process (read from /proc where it says, so nothing changes it meanwhile)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(folder: Path) -> None:
    """Give ``folder`` and the files in it the modes ``mkdir`` and ``open`` would have given them
    (0777 and 0666 less the umask)."""
    mask = process_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def fsync_folder(folder: Path) -> None:
    """Flush the files and the folder entry to disk, so a rename never publishes unwritten data."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to fill in the ``with`` block; when the block ends without
    an error it is made readable (``share``), flushed and swapped into place, and when it fails it is
    deleted: ``folder`` is then as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        share(tmp)
        fsync_folder(tmp)
        swap_into_place(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def swap_into_place(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` is moved aside first (as ``.<name>.old-*``),
    restored on failure, and deleted once ``new`` is in place."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    try:
        os.replace(folder, old)  # a directory may replace an empty one, atomically
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old)
