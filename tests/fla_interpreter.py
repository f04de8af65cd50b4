"""Run fla's real Triton kernels on CPU, through Triton's interpreter, in a child process.

Parity tests compare our torch mixers with fla's own layers. fla's layers are Triton-only, and
Triton runs on CPU only under ``TRITON_INTERPRET=1`` plus a small patch (tested with triton 3.8 and 3.9): the
autotuner benchmarks on a GPU driver (we make the first config win), loop variables are Python
ints without ``.to()`` (we wrap them), and module-level aliases of Triton builtins (``gather =
tl.gather``) are not patched for the interpreter (we patch them too). The variable must be set
before Triton compiles fla's kernels, and interpreting changes every later ``triton.jit``, so each
case runs in a fresh Python process and the rest of the test session never sees the interpreter.

Usage in a test module (the case function must be defined at module level)::

    from fla_interpreter import requires_fla_interpreter, run_with_fla_kernels

    def _fla_case(seed):                       # runs in the child: may import fla freely
        import fla.layers
        ...
        return {"state_dict": layer.state_dict(), "x": x, "y": y}   # tensors, dicts, lists

    @requires_fla_interpreter
    @pytest.mark.parity
    @pytest.mark.slow
    def test_parity():
        out = run_with_fla_kernels(_fla_case, seed=0)

The shim touches Triton internals: it is tested with triton 3.8 and 3.9 (fla 0.6); other versions
skip with a reason rather than fail obscurely. fp32 only (the interpreter mishandles bf16).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SUPPORTED_TRITON = ("3.8.", "3.9.")
REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 600


def interpreter_skip_reason() -> str | None:
    """Why fla's kernels cannot run here through the interpreter, or ``None`` when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fla-core[cpu]==0.6.0'); fla's kernels need it even on CPU"
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed"
    version = importlib.metadata.version("triton")
    if not version.startswith(SUPPORTED_TRITON):
        return f"the Triton-interpreter shim is tested with triton {'/'.join(SUPPORTED_TRITON)}x, found {version}"
    return None


requires_fla_interpreter = pytest.mark.skipif(interpreter_skip_reason() is not None,
                                              reason=interpreter_skip_reason() or "")
"""Skip a test (with the reason) where fla's kernels cannot run through the interpreter."""

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="fla's naive references import triton, which is not installed "
                                            "(pip install 'fla-core[cpu]==0.6.0')")
"""Skip a test that imports fla's pure-torch naive references (importing them needs triton)."""


def install_shim() -> None:
    """Make Triton's interpreter run fla 0.6's kernels on CPU. Call before anything imports fla."""
    if "fla" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("install_shim() must run before fla is imported (its kernels are already compiled)")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interp

    # the autotuner times configs on a GPU; report every config as equally fast so the first wins
    autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None, **kw: [0.0, 0.0, 0.0])

    class LoopInt(int):
        """A loop counter that supports ``.to(dtype)`` like a compiled Triton scalar."""

        def to(self, dtype, *args, **kwargs):
            return interp.interpreter_semantic.to_tensor(int(self), False).to(dtype, *args, **kwargs)

    interp._fla_loop_int = LoopInt

    class WrapLoopCounters(interp.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name):
                name = node.target.id
                wrap = f"{name} = _fla_loop_int({name}) if type({name}) is int else {name}"
                node.body.insert(0, ast.parse(wrap).body[0])
            return node

    interp.FunctionRewriter.ast_transformer = WrapLoopCounters()

    patch_lang = interp._patch_lang

    def patch_lang_and_aliases(fn):
        scope = patch_lang(fn)
        module = sys.modules.get(fn.__module__)
        for name, value in list(vars(module).items()):
            if tl.core.is_builtin(value):
                interp._patch_attr(module, name, value, interp.interpreter_builder, scope)
        return scope

    interp._patch_lang = patch_lang_and_aliases


def run_with_fla_kernels(case: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run ``case(**kwargs)`` in a child Python with the interpreter shim installed; return its result.

    ``case`` must be a module-level function; its module is imported in the child from its file.
    Arguments and the result travel through ``torch.save`` (tensors, numbers, dicts, lists).
    A failure in the child raises ``AssertionError`` carrying the child's output.
    """
    import torch

    source = Path(inspect.getfile(case)).resolve()
    with tempfile.TemporaryDirectory(prefix="fla_interp_") as tmp:
        args_path, result_path = Path(tmp, "args.pt"), Path(tmp, "result.pt")
        torch.save(kwargs, args_path)
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, str(Path(__file__).resolve()), str(source), case.__name__,
                   str(args_path), str(result_path)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if done.returncode != 0:
            raise AssertionError(f"{case.__name__} failed under the Triton interpreter "
                                 f"(exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
        return torch.load(result_path, weights_only=False)


def _child_main(source: str, case_name: str, args_path: str, result_path: str) -> None:
    install_shim()
    import warnings

    warnings.filterwarnings("ignore")  # fla's CPU / missing-kernel warnings would bury real errors
    import torch

    spec = importlib.util.spec_from_file_location(Path(source).stem, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look classes up by module name
    spec.loader.exec_module(module)
    result = getattr(module, case_name)(**torch.load(args_path, weights_only=False))
    torch.save(result, result_path)


if __name__ == "__main__":
    _child_main(*sys.argv[1:5])
