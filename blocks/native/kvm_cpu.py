"""Tensor-level wrappers of the fused KVM state-update kernels in ``kvm_cpu.c`` (fp32, CPU).

``library()`` is None where the kernels cannot be built (see ``blocks.native``); blocks/kvm.py then
keeps its PyTorch path. The wrappers check what the C code assumes (dtype, device, unit stride in
a row, contiguous outputs) and raise ValueError otherwise: a wrong pointer would not raise at all.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from blocks.native import load

_I, _F, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "kvm_incoming": [_I] * 6 + [_P, _I, _I, _I] * 3 + [_P, _P, _F, ctypes.c_int, ctypes.c_int, ctypes.c_int]
                    + [_P] * 3,
    "kvm_read_rows": [_I, _P, _I, _I, _I, _P, _P, _P, _P, _F, ctypes.c_int, ctypes.c_int, _P, _P, _P],
    "kvm_route": [_I, _I, _I, _P, _I, _P, _P, _P, _P],
    "kvm_merge_rows": [_I, _I, _I, _I, _P, _P, _P, _P],
}


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = load("kvm_cpu")
    if lib is not None:
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib


def _ptr(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _check(name: str, x: Tensor, *, contiguous: bool = False, dtype: torch.dtype = torch.float32) -> None:
    if x.dtype != dtype or x.device.type != "cpu" or x.stride(-1) != 1 or (contiguous and not x.is_contiguous()):
        raise ValueError(f"kvm_cpu: {name} must be a CPU {dtype} tensor with unit stride in its last dim"
                         f"{' and contiguous' if contiguous else ''}; got {x.dtype} on {x.device}, "
                         f"strides {x.stride()}")


def incoming(k: Tensor, v: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None, eps: float, zero_dims: int,
             gate_keys: bool, gate_values: bool, reduced: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Raw chunk k (B, H, C, d), v (B, H, C, dv), g (B, H, C, 1) -> prepared keys (B, H, C, d), gated
    key | value (B, H, C, d + dv) and routing features (B, H, C, r), as ``_KVMCore.incoming``."""
    (b, h, c, d), dv = k.shape, v.shape[-1]
    for name, x in (("k", k), ("v", v), ("g", g)):
        _check(name, x)
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None:
            _check(name, x, contiguous=True)
    r = d - zero_dims + 2 if reduced else d
    ku, gated, feat = k.new_empty(b, h, c, d), k.new_empty(b, h, c, d + dv), k.new_empty(b, h, c, r)
    library().kvm_incoming(b, h, c, d, dv, zero_dims, _ptr(k), *k.stride()[:3], _ptr(v), *v.stride()[:3],
                           _ptr(g), *g.stride()[:3], _ptr(weight), _ptr(bias), eps, gate_keys, gate_values,
                           reduced, _ptr(ku), _ptr(gated), _ptr(feat))
    return ku, gated, feat


def read_rows(sums: Tensor, lens: Tensor, read_keys: Tensor, read_values: Tensor, features: Tensor,
              rows: Tensor | int, weight: Tensor, bias: Tensor | None, eps: float, zero_dims: int,
              use_vlens: bool, reduced: bool) -> None:
    """Recompute the read view (read_keys, read_values, features: (B, H, R, *)) of a room's sums
    (B, H, R, d + dv) and lens (B, H, R, 1), in place, at ``rows``: flat row indices (M,) into the
    B*H*R rows, or an int n for the first n rows of the flattened room (all of it: B*H*R)."""
    d, dv = read_keys.shape[-1], read_values.shape[-1]
    for name, x in (("sums", sums), ("lens", lens), ("read_keys", read_keys), ("read_values", read_values),
                    ("features", features)):
        _check(name, x, contiguous=True)
    if isinstance(rows, Tensor):
        _check("rows", rows, contiguous=True, dtype=torch.int64)
        count, index = rows.numel(), rows.data_ptr()
    else:
        count, index = rows, None
    library().kvm_read_rows(count, index, d, dv, zero_dims, _ptr(sums), _ptr(lens), _ptr(weight), _ptr(bias),
                            eps, use_vlens, reduced, _ptr(read_keys), _ptr(read_values), _ptr(features))


def route(scores: Tensor, skip: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routing scores (..., S, C), slots by tokens -> every, best, index (..., C), as ``_max_over_slots``."""
    _check("scores", scores, contiguous=True)
    *lead, s, c = scores.shape
    nh = scores.numel() // max(s * c, 1)
    every, best = scores.new_empty(*lead, c), scores.new_empty(*lead, c)
    index = torch.empty(*lead, c, dtype=torch.int64)
    scratch = torch.empty(c, dtype=torch.int32)
    library().kvm_route(nh, s, c, _ptr(scores), skip, _ptr(every), _ptr(best), _ptr(index), _ptr(scratch))
    return every, best, index


def merge_rows(sums: Tensor, target: Tensor, rows: Tensor, counts: Tensor | None) -> None:
    """sums (B, H, R, F) += rows (B, H, M, F) at slots target (B, H, M), in place, in order; counts
    (B, H, R, 1), if given, count one more token per merge."""
    _check("sums", sums, contiguous=True)
    _check("rows", rows, contiguous=True)
    _check("target", target, contiguous=True, dtype=torch.int64)
    if counts is not None:
        _check("counts", counts, contiguous=True)
    b, h, cap, f = sums.shape
    library().kvm_merge_rows(b * h, target.shape[-1], f, cap, _ptr(target), _ptr(rows), _ptr(sums), _ptr(counts))
