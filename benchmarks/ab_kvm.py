"""KVM prefill time of two or more versions of KVM (blocks/kvm/), interleaved in one process.

On a shared machine the time of the same prefill drifts by tens of percent within minutes, so two
runs of bench_kvm.py at different times cannot tell a 5 % change from noise. This loads each
version (a git revision, or "work" for the working tree) as its own module and times them in
turn, round after round, on the same inputs; it also compares every version's output with the
first's: "equal to" is the position where they first differ by more than 1e-3 ("all": nowhere).
Routing is discrete, so float rounding that differs between versions (a kernel that sums in
another order) can rank two near-tied tokens or slots the other way; from that chunk on the states,
and the outputs, go apart, both equally valid evaluations of the algorithm.

    python benchmarks/ab_kvm.py HEAD~1 work                       # fixed-256 at 32k
    python benchmarks/ab_kvm.py 623ab1a work --budget power_law --length 8192 --rounds 5
    python benchmarks/ab_kvm.py work:torch work                   # without / with the C kernels

Each version brings its own fused C kernels (blocks/native/kvm_cpu.py and .c at that revision,
compiled apart) where it has them; a revision followed by ":torch" runs without them, as where they
cannot be built. A version is the package blocks/kvm/, or at older revisions the single file
blocks/kvm.py; either loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import blocks.native
import blocks.native.kvm_cpu
import blocks.registry
from bench_kvm import CHUNK, HEAD_DIM, HEADS, VARIANTS  # the same shapes and the same two KVM variants

ROOT = Path(__file__).resolve().parent.parent


def source_at(revision: str, relative: str, folder: Path) -> Path | None:
    """``relative`` (a file or a folder of the repository) at ``revision``, written into ``folder``
    under the same relative path, or the working tree's for "work"; None if the revision has none."""
    if revision == "work":
        return ROOT / relative if (ROOT / relative).exists() else None
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "--", relative], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode or not listed.stdout.strip():
        return None
    for name in listed.stdout.splitlines():
        shown = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT, capture_output=True, text=True,
                               check=True)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(shown.stdout)
    return folder / relative


def import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_package(folder: Path) -> list[types.ModuleType]:
    """The package in ``folder`` imported as blocks.kvm, with every module it imports of its own, in
    place of the real blocks.kvm only while it loads: its modules keep the objects they imported,
    and the real ones are put back. -> the package, then its modules."""
    def ours(name: str) -> bool:
        return name == "blocks.kvm" or name.startswith("blocks.kvm.")

    real = {name: sys.modules.pop(name) for name in [name for name in sys.modules if ours(name)]}
    real_attribute = getattr(blocks, "kvm", None)
    try:
        spec = importlib.util.spec_from_file_location("blocks.kvm", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["blocks.kvm"] = package
        spec.loader.exec_module(package)
        return [module for name, module in sys.modules.items() if ours(name)]
    finally:
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(real)
        blocks.kvm = real_attribute


def load_version(spec_text: str, folder: Path):
    """KVM at a revision (or the working tree for "work") as modules of their own, with that
    revision's C kernels, or none with ":torch" appended -> the module with ``kvm_attention`` and
    ``KVMConfig``. Its mixer registration is skipped: the real blocks.kvm registered that name already."""
    revision, _, mode = spec_text.partition(":")
    if mode not in ("", "torch"):
        raise SystemExit(f"ab_kvm: unknown mode {mode!r} in {spec_text!r} (use REV or REV:torch)")
    tag = f"{revision.replace('~', '_').replace('^', '_')}_{mode}"
    here = folder / tag
    register = blocks.registry.register_mixer
    blocks.registry.register_mixer = lambda *args, **kwargs: (lambda cls: cls)
    try:
        single_file = source_at(revision, "blocks/kvm.py", here)
        if single_file is not None:
            modules = [import_file(f"kvm_version_{tag}", single_file)]
        else:
            modules = import_package(source_at(revision, "blocks/kvm", here))
    finally:
        blocks.registry.register_mixer = register
    wrapper = source_at(revision, "blocks/native/kvm_cpu.py", here)
    kernels = blocks.native.kvm_cpu
    if mode == "torch" or wrapper is None:
        kernels = types.SimpleNamespace(library=lambda: None)
    elif revision != "work":  # that revision's wrappers, building that revision's C source
        kernels = import_file(f"kvm_cpu_{tag}", wrapper)
        kernels.load = functools.partial(blocks.native.load,
                                         folder=source_at(revision, "blocks/native/kvm_cpu.c", here).parent)
    for module in modules:
        if hasattr(module, "kvm_cpu"):
            module.kvm_cpu = kernels
    return modules[0]


def variant_options(budget: str) -> dict:
    """bench_kvm.py's variant with this budget, as the options it sets (the non-default fields), so
    that each version's own KVMConfig builds it."""
    config = next(cfg for cfg in VARIANTS.values() if cfg.budget == budget)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != f.default}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="+", help='git revisions of KVM, or "work"; REV:torch without the C kernels')
    parser.add_argument("--budget", choices=["fixed", "power_law"], default="fixed",
                        help="fixed: 256 slots; power_law: 16 * sqrt(T) slots (bench_kvm.py's two variants)")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, args.length, HEAD_DIM) for _ in range(3))
    gate = 1 + F.elu(torch.randn(1, HEADS, args.length, 1))
    norm, temps = torch.nn.LayerNorm(HEAD_DIM), torch.rand(HEADS) + 0.5
    options = variant_options(args.budget)
    with tempfile.TemporaryDirectory() as folder:
        modules = {rev: load_version(rev, Path(folder)) for rev in args.revisions}
        times = {rev: [] for rev in modules}
        outputs = {}
        with torch.inference_mode():
            for round_ in range(args.rounds + 1):  # round 0 warms up and keeps the outputs
                for rev, module in modules.items():
                    start = time.perf_counter()
                    out, _ = module.kvm_attention(q, k, v, gate, module.KVMConfig(**options), state_key_norm=norm,
                                                  window_temp=temps, state_temp=temps)
                    if round_:
                        times[rev].append(time.perf_counter() - start)
                    else:
                        outputs[rev] = out
    first = args.revisions[0]
    print(f"# torch {torch.__version__}, {args.threads} threads, T={args.length}, {args.budget}, "
          f"B=1 H={HEADS} d={HEAD_DIM} C={CHUNK}, {args.rounds} interleaved rounds")
    print(f"{'version':>12} {'best s':>8} {'median s':>9} {'vs first':>9} {'max |diff|':>11} {'equal to':>8}")
    best_first = min(times[first])
    for rev in modules:
        ordered = sorted(times[rev])
        diff = (outputs[rev] - outputs[first]).abs().amax(dim=(0, 1, 3))  # (T,) per position
        apart = (diff > 1e-3).nonzero()
        print(f"{rev:>12} {ordered[0]:>8.3f} {ordered[len(ordered) // 2]:>9.3f} {ordered[0] / best_first:>8.2f}x "
              f"{diff.max().item():>11.2e} {'all' if not len(apart) else int(apart[0]):>8}")


if __name__ == "__main__":
    main()
