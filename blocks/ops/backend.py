"""Choosing the engine behind the linear-RNN ops: fla's Triton kernels or the toolkit's torch ops.

``backend="auto"`` (the default in every mixer) picks fla's kernels for CUDA tensors when fla and
Triton import, and the pure-PyTorch ops otherwise. ``"torch"`` forces the torch ops (tests, CPU,
debugging); ``"fla"`` demands the kernels and fails clearly where they cannot run. The CPU path
never imports fla or Triton.
"""

from __future__ import annotations

import functools
import importlib

import torch

from blocks.errors import InputError

BACKENDS = ("auto", "torch", "fla")


class BackendError(InputError, RuntimeError):
    """The requested backend cannot run here."""


@functools.cache
def fla_available() -> bool:
    """True when fla's Triton ops import (needs triton; only useful with a GPU)."""
    try:
        importlib.import_module("fla.ops")
    except Exception:  # ImportError, or Triton failing to initialise a driver
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"fla"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_gpu = device.type == "cuda"
    if backend == "fla":
        if not on_gpu:
            raise BackendError(
                f"backend 'fla' runs fla's Triton kernels, which need a CUDA device; tensors are on {device}. "
                "Use backend: torch (or auto) on CPU."
            )
        if not fla_available():
            raise BackendError("backend 'fla' needs flash-linear-attention with triton: pip install 'fla-core[cuda]'")
        return "fla"
    return "fla" if on_gpu and fla_available() else "torch"
