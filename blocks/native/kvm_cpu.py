"""Tensor-level wrappers of the fused KVM kernels in ``kvm_cpu.c`` (fp32, CPU): the state update
and the whole-chunk read.

``library()`` is None where the kernels cannot be built (see ``blocks.native``); blocks/kvm/ then
keeps its PyTorch path. The wrappers check what the C code assumes (dtype, device, unit stride in
a row, contiguous outputs) and raise ValueError otherwise: a wrong pointer would not raise at all.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from blocks.native import load

_I, _F, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "kvm_incoming": [_I] * 6 + [_P, _I, _I, _I] * 3 + [_P, _P, _F, ctypes.c_int, ctypes.c_int, ctypes.c_int]
                    + [_P] * 3,
    "kvm_merge_read": [_I] * 8 + [_P, _P, ctypes.c_int, _P, _P, _P, _P, _F, ctypes.c_int, ctypes.c_int] + [_P] * 3,
    "kvm_route": [_I, _I, _I, _P, _I, _I, ctypes.c_int, _P, _P, _P],
    "kvm_join": [_I] * 5 + [_P] * 10,
    "kvm_attend_chunks": [_P] + [_I] * 6 + [_P] * 6 + [_I] + [_P] * 4 + [_I] + [_P] * 4,
    "kvm_absorb": [_P] + [_I] * 6 + [_P] * 8 + [_F] + [ctypes.c_int] * 3 + [_I, _I] + [ctypes.c_int] * 2
                  + [_I] * 2 + [_P] * 5,
    "kvm_run_chunks": [_P] + [_I] * 8 + [_P, _I] + [_P] * 10 + [_I] + [_P] * 4 + [_F] + [ctypes.c_int] * 3 + [_I]
                      + [ctypes.c_int] * 2 + [_I] + [_P] * 5,
}
_RETURNS_STATUS = ("kvm_merge_read", "kvm_attend_chunks", "kvm_absorb", "kvm_run_chunks")  # 0, or -1 when out of memory


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = load("kvm_cpu")
    if lib is not None:
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int if name in _RETURNS_STATUS else None
    return lib


@functools.cache
def _sgemm() -> int | None:
    """The address of torch's own BLAS sgemm_ (the MKL inside libtorch_cpu), or None where torch
    exports none (builds without MKL): ``blas_kernels`` needs it."""
    try:
        return ctypes.cast(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).sgemm_,
                           ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def blas_kernels() -> bool:
    """Whether the kernels that call torch's sgemm can run here (the library is built and torch has
    a BLAS): the chunk read ``attend_chunk``, the whole update ``absorb`` and both in a row,
    ``run_chunks``. Without them blocks/kvm/native.py reads chunks by flash calls and ``join``,
    and updates with ``incoming``, ``best_slots`` and ``merge_and_read`` (and torch ops for the
    appends)."""
    return library() is not None and _sgemm() is not None


def _ptr(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _check(name: str, x: Tensor, *, contiguous: bool = False, dtype: torch.dtype = torch.float32) -> None:
    if x.dtype != dtype or x.device.type != "cpu" or x.stride(-1) != 1 or (contiguous and not x.is_contiguous()):
        raise ValueError(f"kvm_cpu: {name} must be a CPU {dtype} tensor with unit stride in its last dim"
                         f"{' and contiguous' if contiguous else ''}; got {x.dtype} on {x.device}, "
                         f"strides {x.stride()}")


def _check_chunk(k: Tensor, v: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """What the update kernels assume of a raw chunk and of the state-key norm's parameters."""
    for name, x in (("k", k), ("v", v), ("g", g)):
        _check(name, x)
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None:
            _check(name, x, contiguous=True)


def incoming(k: Tensor, v: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None, eps: float, zero_dims: int,
             gate_keys: bool, gate_values: bool, reduced: bool,
             out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Raw chunk k (B, H, C, d), v (B, H, C, dv), g (B, H, C, 1) -> prepared keys (B, H, C, d), gated
    key | value (B, H, C, d + dv) and routing features (B, H, C, r), as ``SlotCodec.incoming``;
    into ``out`` if given (buffers of the same shapes, reused from chunk to chunk: fresh memory costs
    a page fault per 4 KiB on first touch)."""
    (b, h, c, d), dv = k.shape, v.shape[-1]
    _check_chunk(k, v, g, weight, bias)
    r = d - zero_dims + 2 if reduced else d
    shapes = ((b, h, c, d), (b, h, c, d + dv), (b, h, c, r))
    if out is None:
        out = tuple(k.new_empty(shape) for shape in shapes)
    for x, shape in zip(out, shapes):
        _check("out", x, contiguous=True)
        if x.shape != shape:
            raise ValueError(f"kvm_cpu: incoming out buffer {tuple(x.shape)}, expected {shape}")
    ku, gated, feat = out
    library().kvm_incoming(b, h, c, d, dv, zero_dims, _ptr(k), *k.stride()[:3], _ptr(v), *v.stride()[:3],
                           _ptr(g), *g.stride()[:3], _ptr(weight), _ptr(bias), eps, gate_keys, gate_values,
                           reduced, _ptr(ku), _ptr(gated), _ptr(feat))
    return ku, gated, feat


def merge_and_read(sums: Tensor, lens: Tensor, read_keys: Tensor, read_values: Tensor, features: Tensor,
                   target: Tensor, rows: Tensor, count_merges: bool, num: int, first_new: int, weight: Tensor,
                   bias: Tensor | None, eps: float, zero_dims: int, use_vlens: bool, reduced: bool) -> None:
    """A boundary update's merges into a room, in place: rows (B, H, M, d + dv) added to sums
    (B, H, R, d + dv) at slots target (B, H, M), counted in lens (B, H, R, 1) if ``count_merges``;
    then the read view (read_keys, read_values, features: (B, H, R, *)) recomputed for the touched
    slots and the appended ones [first_new, num), and only for them."""
    for name, x in (("sums", sums), ("lens", lens), ("read_keys", read_keys), ("read_values", read_values),
                    ("features", features), ("rows", rows)):
        _check(name, x, contiguous=True)
    _check("target", target, contiguous=True, dtype=torch.int64)
    b, h, cap, _ = sums.shape
    status = library().kvm_merge_read(b * h, target.shape[-1], cap, num, first_new, read_keys.shape[-1], read_values.shape[-1],
                             zero_dims, _ptr(target), _ptr(rows), count_merges, _ptr(sums), _ptr(lens), _ptr(weight),
                             _ptr(bias), eps, use_vlens, reduced, _ptr(read_keys), _ptr(read_values), _ptr(features))
    if status:
        raise MemoryError(f"kvm_cpu: no memory for the merge order of {target.shape[-1]} tokens")


def absorb(k: Tensor, v: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None, eps: float, zero_dims: int,
           gate_keys: bool, gate_values: bool, reduced: bool, skip: int, n_append: int, gate_appends: bool,
           use_vlens: bool, sums: Tensor, lens: Tensor, read_keys: Tensor, read_values: Tensor, features: Tensor,
           num: int) -> None:
    """A whole boundary update of a room holding ``num`` slots, in place, as the PyTorch update
    (blocks/kvm/inference.py): the raw chunk k (B, H, C, d), v (B, H, C, dv), g (B, H, C, 1) prepared, routed
    (winners among slots >= ``skip``), its ``n_append`` most novel tokens appended (gated if
    ``gate_appends``), the others merged and every slot they touch re-read. One call, each head's
    chunk kept in cache from start to end. Needs ``blas_kernels()``."""
    (b, h, c, d), dv = k.shape, v.shape[-1]
    _check_chunk(k, v, g, weight, bias)
    for name, x in (("sums", sums), ("lens", lens), ("read_keys", read_keys), ("read_values", read_values),
                    ("features", features)):
        _check(name, x, contiguous=True)
    if not 0 <= n_append <= c or num + n_append > sums.shape[2] or num < 1:
        raise ValueError(f"kvm_cpu: absorb of {c} tokens ({n_append} appending) into {num} slots of a room of "
                         f"{sums.shape[2]}")
    rows = functools.partial(_strides, dims=3)  # strides over (batch, head, token)
    if library().kvm_absorb(_sgemm(), b, h, c, d, dv, zero_dims, _ptr(k), rows(k), _ptr(v), rows(v), _ptr(g), rows(g),
                            _ptr(weight), _ptr(bias), eps, gate_keys, gate_values, reduced, skip, n_append,
                            gate_appends, use_vlens, sums.shape[2], num, _ptr(sums), _ptr(lens), _ptr(read_keys),
                            _ptr(read_values), _ptr(features)):
        raise MemoryError(f"kvm_cpu: no memory for the update scratch of {c} tokens")


ROUTE_BLOCK = 512  # slot rows per block of routing scores (6 heads x 512 x 256 tokens: 3 MiB)


def route(scores: Tensor, skip: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routing scores (..., S, C), slots by tokens -> every, best, index (..., C), as ``routing.max_over_slots``."""
    _check("scores", scores, contiguous=True)
    *lead, s, c = scores.shape
    every, best = scores.new_empty(*lead, c), scores.new_empty(*lead, c)
    index = torch.empty(*lead, c, dtype=torch.int32)
    library().kvm_route(every.numel() // max(c, 1), s, c, _ptr(scores), 0, skip, True, _ptr(every), _ptr(best),
                        _ptr(index))
    return every, best, index.long()


def best_slots(slot_features: Tensor, token_features: Tensor, skip: int, scratch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The routing of tokens (B, H, C, r) among slots (B, H, S, r), by routing features -> every,
    best, index (B, H, C), as ``route`` of their scores (B, H, S, C), without that matrix: torch.matmul
    scores ``ROUTE_BLOCK`` slots at a time into ``scratch`` (fp32, at least B*H*ROUTE_BLOCK*C), each
    block reduced by ``kvm_route`` while it is in cache."""
    _check("scratch", scratch, contiguous=True)
    b, h, s, _ = slot_features.shape
    c = token_features.shape[2]
    every, best = token_features.new_empty(b, h, c), token_features.new_empty(b, h, c)
    index = torch.empty(b, h, c, dtype=torch.int32)
    tokens = token_features.transpose(-1, -2)  # (B, H, r, C)
    for lo in range(0, s, ROUTE_BLOCK):
        rows = min(s, lo + ROUTE_BLOCK) - lo
        block = torch.matmul(slot_features[:, :, lo:lo + rows], tokens, out=scratch[: b * h * rows * c].view(b, h, rows, c))
        library().kvm_route(b * h, rows, c, _ptr(block), lo, skip, lo == 0, _ptr(every), _ptr(best), _ptr(index))
    return every, best, index.long()


def _strides(x: Tensor, dims: int) -> ctypes.Array:
    """x's strides over its first ``dims`` dims, as a C array."""
    return (_I * dims)(*x.stride()[:dims])


def join(o_w: Tensor, lse_w: Tensor, o_s: Tensor, lse_s: Tensor, out: Tensor) -> None:
    """The joint softmax of a window read and a state read, into out: o_w, o_s, out (B, Hkv, g, C, dv)
    outputs with their log-sum-exps lse_w, lse_s (B, Hkv, g, C), any strides but unit ones in dv."""
    for name, x in (("o_w", o_w), ("o_s", o_s), ("out", out)):
        _check(name, x)
        if x.shape != o_w.shape:
            raise ValueError(f"kvm_cpu: {name} {tuple(x.shape)} differs from o_w {tuple(o_w.shape)}")
    for name, x in (("lse_w", lse_w), ("lse_s", lse_s)):
        if x.dtype != torch.float32 or x.shape != o_w.shape[:4]:
            raise ValueError(f"kvm_cpu: {name} must be float32 {tuple(o_w.shape[:4])}, got {x.dtype} {tuple(x.shape)}")
    library().kvm_join(*o_w.shape, _ptr(o_w), _strides(o_w, 4), _ptr(lse_w), _strides(lse_w, 4), _ptr(o_s),
                       _strides(o_s, 4), _ptr(lse_s), _strides(lse_s, 4), _ptr(out), _strides(out, 4))


def attend_chunk(q: Tensor, slot_keys: Tensor, slot_values: Tensor, window_keys: Tensor, window_values: Tensor,
                 state_scale: Tensor, window_scale: Tensor, out: Tensor) -> None:
    """The exact read of one whole chunk, into out: queries q (B, Hq, C, d) against the slots
    (B, Hkv, S, d | dv) and their window (B, Hkv, W, d | dv; the query at chunk row i sees window
    keys j <= W - C + i), one softmax per query, logits times state_scale / window_scale (Hq,) fp32
    -> out (B, Hq, C, dv). Any strides with unit ones in the last dim."""
    (b, hq, c, d), hkv, dv = q.shape, slot_keys.shape[1], slot_values.shape[-1]
    for name, x in (("q", q), ("slot_keys", slot_keys), ("slot_values", slot_values), ("window_keys", window_keys),
                    ("window_values", window_values), ("out", out)):
        _check(name, x)
    for name, x in (("state_scale", state_scale), ("window_scale", window_scale)):
        _check(name, x, contiguous=True)
        if x.shape != (hq,):
            raise ValueError(f"kvm_cpu: {name} must have one scale per query head ({hq}), got {tuple(x.shape)}")
    if hq % hkv or out.shape != (b, hq, c, dv) or window_keys.shape[2] < c:
        raise ValueError(f"kvm_cpu: attend_chunk shapes do not fit: q {tuple(q.shape)}, slots {tuple(slot_keys.shape)}, "
                         f"window {tuple(window_keys.shape)}, out {tuple(out.shape)}")
    rows = functools.partial(_strides, dims=3)  # strides over (batch, head, row)
    status = library().kvm_attend_chunks(
        _sgemm(), b, hq, hq // hkv, c, d, dv, _ptr(q), rows(q), _ptr(slot_keys), rows(slot_keys), _ptr(slot_values),
        rows(slot_values), slot_keys.shape[2], _ptr(window_keys), rows(window_keys), _ptr(window_values),
        rows(window_values), window_keys.shape[2], _ptr(state_scale), _ptr(window_scale), _ptr(out), rows(out))
    if status:
        raise MemoryError("kvm_cpu: no memory for the chunk read's scratch")


def run_chunks(q: Tensor, out: Tensor, k: Tensor, v: Tensor, g: Tensor, appends: list[int], num: int,
               state_scale: Tensor, window_scale: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
               zero_dims: int, gate_keys: bool, gate_values: bool, reduced: bool, skip: int, gate_appends: bool,
               use_vlens: bool, sums: Tensor, lens: Tensor, read_keys: Tensor, read_values: Tensor,
               features: Tensor) -> None:
    """``len(appends)`` whole chunks in a row in one call, in place: for chunk j, its boundary
    update as ``absorb`` (``appends[j]`` tokens appended; none runs where it is negative), then its
    read as ``attend_chunk`` into its rows of ``out``, against the room as it then is.

    q (B, Hq, n*C, d), out (B, Hq, n*C, dv): the chunks' queries and outputs; k (B, Hkv, (n + Nb - 1)*C
    + C, d), v (..., dv), g (..., 1): the raw tokens from one chunk before the first chunk's window,
    so that chunk j's leaving tokens are rows j*C.. and its window the W = Nb*C rows after them;
    num: the room's slots before the first update. Needs ``blas_kernels()``."""
    n, (b, hq, t, d), (hkv, c) = len(appends), q.shape, (k.shape[1], q.shape[2] // max(len(appends), 1))
    window = k.shape[2] - (n - 1) * c - c if n else 0
    for name, x in (("q", q), ("out", out), ("k", k), ("v", v), ("g", g)):
        _check(name, x)
    for name, x in (("sums", sums), ("lens", lens), ("read_keys", read_keys), ("read_values", read_values),
                    ("features", features), ("state_scale", state_scale), ("window_scale", window_scale)):
        _check(name, x, contiguous=True)
    _check_chunk(k, v, g, weight, bias)
    cap = sums.shape[2]
    if (n == 0 or t != n * c or hq % hkv or window < c or window % c or out.shape[:3] != (b, hq, t)
            or state_scale.shape != (hq,) or window_scale.shape != (hq,)):
        raise ValueError(f"kvm_cpu: run_chunks shapes do not fit: {n} chunks, q {tuple(q.shape)}, out "
                         f"{tuple(out.shape)}, k {tuple(k.shape)}, scales {tuple(state_scale.shape)}")
    if num < 1 or num + sum(max(a, 0) for a in appends) > cap or max(appends) > c:
        raise ValueError(f"kvm_cpu: run_chunks appends {appends} do not fit {num} slots in a room of {cap}")
    rows = functools.partial(_strides, dims=3)  # strides over (batch, head, row)
    status = library().kvm_run_chunks(
        _sgemm(), b, hq, hkv, c, d, v.shape[-1], zero_dims, n, (_I * n)(*appends), num, _ptr(q), rows(q), _ptr(out),
        rows(out), _ptr(k[:, :, c:]), rows(k), _ptr(v[:, :, c:]), rows(v), _ptr(g[:, :, c:]), rows(g), window,
        _ptr(state_scale), _ptr(window_scale), _ptr(weight), _ptr(bias), eps, gate_keys, gate_values, reduced, skip,
        gate_appends, use_vlens, cap, _ptr(sums), _ptr(lens), _ptr(read_keys), _ptr(read_values), _ptr(features))
    if status:
        raise MemoryError("kvm_cpu: no memory for the scratch of a run of chunks")
