"""Native CPU kernels: C sources in this folder, compiled on first use with the system C compiler.

A kernel library is built once per source, compiler and CPU (``-march=native``) into the user's
cache (``$XDG_CACHE_HOME/kvm-hybrid``, or ``$KVM_NATIVE_CACHE``) and loaded with ctypes: no build
step at install time and no torch headers, so a build takes about a second. Where there is no C
compiler, or ``KVM_NATIVE=0`` is set, ``load`` returns None and callers keep their PyTorch path.

The cache is checked before anything in it is loaded: a library's file name is the hash of its
source, compiler flags, compiler version and CPU flags (``<name>-<hash>.so``), so a changed source
or flag never loads an old build; it is built aside and renamed into place (never half written);
and the sha256 of its bytes is recorded beside it (``<name>-<hash>.so.sha256``). A library whose
bytes do not match that record (damaged, replaced, or without a record) is rebuilt, not loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")
# OpenMP threads where the compiler has OpenMP (the kernels then share torch's runtime: same
# soname, already loaded); else serial kernels, still vectorised.
THREADING = (("-fopenmp",), ("-fopenmp-simd",))


def enabled() -> bool:
    """False when the user turned native kernels off with KVM_NATIVE=0."""
    return os.environ.get("KVM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("KVM_NATIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvm-hybrid")
    return Path(root)


def _machine_key(compiler: str) -> str:
    """What a -march=native build depends on besides its source: the compiler and this CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = os.uname().machine
    return version + cpu


@functools.cache
def load(name: str, folder: Path | None = None) -> ctypes.CDLL | None:
    """The compiled library of ``<name>.c`` in this folder (or ``folder``), or None (warned once) if
    it cannot be built."""
    if not enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(f"no C compiler found: {name} kernels run in PyTorch (slower); install gcc to build them",
                      stacklevel=2)
        return None
    source = (folder or Path(__file__).parent) / f"{name}.c"
    failure: Exception | None = None
    for threading in THREADING:
        try:
            return ctypes.CDLL(str(_build(compiler, source, (*FLAGS, *threading))))
        except (OSError, subprocess.SubprocessError) as err:
            failure = failure or err
    detail = getattr(failure, "stderr", "") or failure
    warnings.warn(f"building native {name} kernels failed, using PyTorch (slower): {detail}", stacklevel=2)
    return None


def _build(compiler: str, source: Path, flags: tuple[str, ...]) -> Path:
    """The cached library of ``source`` built with ``flags``, building it first if there is none
    whose bytes match the hash recorded beside it."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()
                            + _machine_key(compiler).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: atomic
        built, record = Path(tmp) / target.name, Path(tmp) / "sha256"
        subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        record.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
        os.replace(built, target)
        os.replace(record, record_of(target))
    return target


def record_of(library: Path) -> Path:
    """Where the sha256 of a cached library's bytes is kept: beside it, ``<library>.sha256``."""
    return library.with_name(library.name + ".sha256")


def verified(library: Path) -> bool:
    """Whether ``library`` exists and its bytes match the sha256 recorded beside it."""
    try:
        recorded = record_of(library).read_text().strip()
        return recorded == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False
