"""Key-Value Means (KVM) attention: block sliding window + a compressed, budgeted memory of the past.

Goldstein & Cheah, "Key-Value Means: Transformers with Expandable Block-Recurrent Compressed
Memory", arXiv 2605.09877. ``../shared/docs/kvm.md`` is the exact algorithm; this file implements it
as the published (v1) code behaves, generalised, with the differences listed at the end.

The sequence is cut into chunks of ``chunk_len`` (C) tokens. A query in chunk c attends, in one
softmax, to (a) the raw keys of a block sliding window of the last ``n_bswa_chunks`` (Nb) chunks up
to itself and (b) every slot of the compressed state, which covers exactly the tokens before the
window. Queries before position W = Nb*C see plain causal attention. The state starts as the first
chunk copied raw (slot 0 = token 0 is the "sink", never merged into). Each time a chunk leaves the
window, its C tokens either *append* (the most novel ones, while the budget allows: ``fixed``,
``power_law`` f*ctx^e, or ``saturation`` N*ctx/(N+ctx)) or *merge* winner-take-all into their most
similar slot. Slots store *sums* of gated keys and values; reads re-normalise them just in time:
keys through ``state_key_norm`` (a LayerNorm, so a sum reads as a mean direction), values as their
direction times the norm of the value that created the slot ("vlens"), or divided by a count.

One code path serves training, prefill, continuing a state by any number of tokens and one-token
decode: the state update for a chunk boundary runs when the first token past it is processed, so
"prefill P tokens, then continue" and "process everything at once" perform the same updates.
Without autograd (no_grad / inference_mode) on CPU, whole chunks read their window and their state
separately and merge the two partial softmaxes by log-sum-exp: the windows of a few chunks at a
time in one flash-attention call over overlapping views of the keys (no tiles are copied), the state
chunk by chunk right after that chunk's update. With autograd, each chunk is one softmax over
[state ; window]. Without autograd the slots also live in buffers sized for the call's final slot
count (key and value sums side by side, their read view, their routing features and a score
buffer), so updates write in place and only the touched slots' views are recomputed. There, on
CPU in fp32 with a LayerNorm as state-key norm, fused C kernels take over (blocks/native/kvm_cpu.c,
compiled on first use; ``KVM_NATIVE=0`` turns them off): a state update, per kv head and in cache,
prepares the leaving tokens, scores them against a block of slots at a time and keeps each token's
best slot, appends the most novel ones, merges the rest and re-reads the slots they touch; a whole
chunk's read is one online softmax over its slots and its window that skips the window's masked
keys. A call's run of whole chunks is one C call for all their updates and reads (a graph of tasks,
per kv head update then reads); partial chunks update and read one at a time. The PyTorch code
stays as the fallback and is what the kernels are tested against. Decode, without autograd, appends
to the raw window in place (blocks/token_buffer.py) and keeps the slots' read view in the state
until an update changes the slots.

Differences from the published v1 code (kvm.md §6), each deliberate:

* Grouped-query attention (fewer key/value heads than query heads); one merge gate per KV head,
  temperatures per query head (as the published v2).
* Count averaging (``use_vlens=False``) keeps a per-slot count of absorbed tokens and divides each
  slot by its own count (v1 adds one to every slot per merge round, or crashes: B2).
* No hidden casts: state values are read in the model dtype (v1 rounds them through bf16 even in
  fp32 runs: B6). ``bf16_state_values=True`` restores that rounding to match the released code.
* Routing and novelty scores are computed in fp32 (v1 uses the model dtype, B7), on the ungated
  prepared keys (the positive gate does not change the argmax).
* ``merge_gate_initial_state=True`` gates the first chunk the same way in prefill and decode
  (v1 gates it only in prefill, breaking their equivalence: B3).
* Continuation by many tokens at once works (v1 asserts on multi-token decode, B11).

Kept on purpose because the released checkpoints depend on it: the state-key LayerNorm runs *after*
zeroing the rotated dims, so its mean-centring and bias re-populate them (B5).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.config import require, require_choice, require_positive
from blocks.native import kvm_cpu
from blocks.projection import ProjectedAttention, ProjectionConfig
from blocks.registry import register_mixer
from blocks.state import LayerState, StateError
from blocks.token_buffer import TokenBuffer, extend

BUDGETS = ("fixed", "power_law", "saturation")

@dataclasses.dataclass(frozen=True)
class KVMConfig(ProjectionConfig):
    """Options of a KVM layer: its projections (see ``ProjectionConfig``) and the KVM algorithm.

    The algorithm defaults are the paper's (kvm.md §4.1); the paper's recipes add
    ``qk_norm: layernorm``, ``rope_partial_dim: 64``, ``rope_style: kvm_paper``, token shift and
    value residual.
    """

    chunk_len: int = 256  # C: tokens per chunk (query block, window block, overflow unit)
    n_bswa_chunks: int = 2  # Nb: window = the last Nb chunks up to the query (W = Nb*C tokens)
    sink_len: int = 1  # leading slots that never receive merges
    budget: str = "fixed"  # how many slots the state may hold: fixed | power_law | saturation
    state_min_len: int = 0  # lower bound on the slot target (fixed: the target itself)
    growth_factor: float = 1.0  # power_law: f in f * ctx**e
    growth_exponent: float = 0.5  # power_law: e
    saturation_n: int | None = None  # saturation: N in N*ctx/(N+ctx)
    round_down: int = 1  # slot targets are rounded down to a multiple of this
    max_state_chunks: int | None = None  # cap slots at chunk_len * this (None: no cap)
    use_vlens: bool = True  # read slot values as direction * creating-value norm (else: mean)
    use_head_temps: bool = True  # per-head temperatures on window and state logits
    merge_gate_keys: bool = True  # weight merged keys by the 1+ELU merge gate
    merge_gate_values: bool = True  # weight merged values by the merge gate
    merge_gate_appends: bool = True  # appended slots also use the gated key/value
    merge_gate_initial_state: bool = False  # the first chunk's slots use the gated key/value
    state_key_zero_dims: int | None = None  # dims zeroed before state_key_norm (None: the RoPE dims)
    bf16_state_values: bool = False  # round state values through bf16 at read (published code, B6)

    def __post_init__(self):
        super().__post_init__()
        require_positive("chunk_len", self.chunk_len)
        require_positive("n_bswa_chunks", self.n_bswa_chunks)
        require(isinstance(self.sink_len, int) and 0 <= self.sink_len < self.chunk_len, "sink_len",
                f"must be in [0, chunk_len={self.chunk_len}) so that merges have a slot to go to, got {self.sink_len}")
        require_choice("budget", self.budget, BUDGETS)
        require(self.growth_factor > 0, "growth_factor", f"must be > 0, got {self.growth_factor}")
        require(0 < self.growth_exponent <= 1, "growth_exponent", f"must be in (0, 1], got {self.growth_exponent}")
        if self.budget == "saturation":
            require(self.saturation_n is not None and self.saturation_n > 0, "saturation_n",
                    f"the saturation budget needs saturation_n > 0, got {self.saturation_n}")
        require_positive("round_down", self.round_down)
        require(self.max_state_chunks is None or self.max_state_chunks > 0, "max_state_chunks",
                f"must be > 0 or null, got {self.max_state_chunks}")
        require(self.state_key_zero_dims is None or self.state_key_zero_dims >= 0, "state_key_zero_dims",
                f"must be >= 0 or null, got {self.state_key_zero_dims}")

    @property
    def window_len(self) -> int:
        return self.chunk_len * self.n_bswa_chunks

    @property
    def uses_merge_gate(self) -> bool:
        return self.merge_gate_keys or self.merge_gate_values

    def zeroed_key_dims(self, head_dim: int) -> int:
        """Leading key dims zeroed before the state-key norm: ``state_key_zero_dims``, else the RoPE dims."""
        if self.state_key_zero_dims is not None:
            return min(self.state_key_zero_dims, head_dim)
        return head_dim if self.rope_partial_dim is None else min(self.rope_partial_dim, head_dim)


# ----------------------------------------------------------------------------- schedule (integers only)

def window_begin(n_tokens: int, config: KVMConfig) -> int:
    """First position of the raw window once ``n_tokens`` tokens are processed (a chunk multiple)."""
    c = config.chunk_len
    return max(0, -(-n_tokens // c) * c - config.window_len)


def coverage(n_tokens: int, config: KVMConfig) -> int:
    """How many leading tokens the compressed state has absorbed after ``n_tokens`` tokens."""
    return max(min(n_tokens, config.chunk_len), window_begin(n_tokens, config))


def target_slots(config: KVMConfig, ctx_len: int, available: int, current: int) -> int:
    """The budget: how many slots the state may hold after an update at context ``ctx_len`` when
    ``available`` tokens have left the window. Never below ``current``: the state never shrinks."""
    if config.budget == "fixed":
        target = config.state_min_len
    else:
        if config.budget == "power_law":
            raw = math.floor(config.growth_factor * ctx_len ** config.growth_exponent)
        else:
            n = config.saturation_n
            raw = math.floor(n * ctx_len / (n + ctx_len))
        target = max(raw // config.round_down * config.round_down, config.state_min_len)
    target = min(target, available)
    if config.max_state_chunks is not None:
        target = min(target, config.chunk_len * config.max_state_chunks)
    return max(target, current)


def boundary_update(c: int, config: KVMConfig) -> tuple[int, int] | None:
    """The update run when token ``c * chunk_len`` arrives: ``(ctx_len, available)``, or None when
    chunk ``c`` starts no update (the first chunks are read with plain attention)."""
    if c <= config.n_bswa_chunks:
        return None
    overflow_chunk = c - config.n_bswa_chunks
    return c * config.chunk_len, (overflow_chunk + 1) * config.chunk_len


def runs_update(n0: int, n1: int, config: KVMConfig) -> bool:
    """Whether processing tokens [n0, n1) runs a state update (a decode step mostly does not)."""
    first = max(-(-n0 // config.chunk_len), config.n_bswa_chunks + 1)  # updates run at chunks > Nb
    return first * config.chunk_len < n1


def slots_after(n_tokens: int, config: KVMConfig) -> int:
    """Number of state slots after processing ``n_tokens`` tokens (no tensors involved)."""
    return _slots_after_chunks(-(-n_tokens // config.chunk_len), min(n_tokens, config.chunk_len), config)


@functools.lru_cache(maxsize=4096)
def _slots_after_chunks(n_chunks: int, first_chunk_tokens: int, config: KVMConfig) -> int:
    """``slots_after`` depends on the tokens only through these two numbers; cached because decode
    asks at every token and the loop runs over every chunk so far."""
    slots = first_chunk_tokens
    for c in range(config.n_bswa_chunks + 1, n_chunks):
        ctx_len, available = boundary_update(c, config)
        slots += min(max(target_slots(config, ctx_len, available, slots) - slots, 0), config.chunk_len)
    return slots


# ----------------------------------------------------------------------------- state

@dataclasses.dataclass
class KVMState(LayerState):
    """A KVM layer's decoding state: compressed slots, the raw window and the token count."""

    kind = "kvm"
    slot_keys: Tensor  # (B, Hkv, S, d): sums of prepared (gated) keys
    slot_values: Tensor  # (B, Hkv, S, dv): sums of (gated) values
    slot_lens: Tensor  # (B, Hkv, S, 1) fp32: creating-value norm (vlens) or count of absorbed tokens
    window_keys: Tensor  # (B, Hkv, L, d): rotated keys of tokens [window_begin(n), n)
    window_values: Tensor  # (B, Hkv, L, dv)
    window_gates: Tensor  # (B, Hkv, L, 1): their merge gates (used when they overflow)
    seq_len: int  # tokens processed so far (n)
    prev_q: Tensor | None = None  # token-shift tails: last projected q/k/v (B, H*d), if token shift is on
    prev_k: Tensor | None = None
    prev_v: Tensor | None = None
    # The buffer the window tensors are views of, where they are (without autograd: decode appends
    # in place, see blocks/token_buffer.py); not a field, so state_dict, select and to drop it.
    window_buffer: ClassVar[TokenBuffer | None] = None
    # The slots' read view as the last step computed it (``_ReadView``), so that decode steps between
    # chunk boundaries, which leave the slots as they are, do not recompute it; not a field either.
    # ``nbytes`` counts neither this view (the slots' size again) nor the buffer's spare room.
    read_view: ClassVar[_ReadView | None] = None

    @property
    def num_slots(self) -> int:
        return self.slot_keys.shape[2]


class _Room(NamedTuple):
    """Inference buffers for R slots, R the call's final slot count: the slot sums, updated in place,
    and their read view, whose rows are recomputed only where an update touched them."""

    sums: Tensor  # (B, Hkv, R, d + dv): key sums | value sums, side by side so that a merge is one index_add
    lens: Tensor  # (B, Hkv, R, 1) fp32
    read_keys: Tensor  # (B, Hkv, R, d): state_key_norm(keys)
    read_values: Tensor  # (B, Hkv, R, dv): the values as attention reads them, in the model dtype
    features: Tensor  # (B, Hkv, R, r) fp32: slot_features(read_keys), the slots as routing reads them
    scores: Tensor  # (B * Hkv * R * C,) fp32 scratch for routing scores: one buffer, not a fresh one per update


class _Slots(NamedTuple):
    """The slots during a call: new tensors at every update (autograd), or, without autograd, views
    of the first S rows of this call's ``room`` (see ``_KVMCore.with_room``)."""

    keys: Tensor  # (B, Hkv, S, d)
    values: Tensor  # (B, Hkv, S, dv)
    lens: Tensor  # (B, Hkv, S, 1) fp32
    room: _Room | None = None


class _ReadView(NamedTuple):
    """``_KVMCore._read`` of some slots, with what it was computed from: the slot tensors
    themselves and a key of everything else it depends on (``_KVMCore._view_key``)."""

    sums: tuple[Tensor, Tensor, Tensor]  # the slots' keys, values and lens
    key: tuple
    keys: Tensor  # (B, Hkv, S, d)
    values: Tensor  # (B, Hkv, S, dv)


class _Incoming(NamedTuple):
    """A chunk of tokens leaving the window, prepared for the state (rows: tokens)."""

    keys: Tensor  # (B, Hkv, C, d): prepared keys (zeroed dims, state-key norm), ungated
    values: Tensor  # (B, Hkv, C, dv)
    gated: Tensor  # (B, Hkv, C, d + dv): what a merge adds, the (gated) key and value side by side
    routing: Tensor  # (B, Hkv, C, r) fp32: the keys as routing scores read them (``_KVMCore.token_features``)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: (B, H, L, F), index: (B, H, M) -> (B, H, M, F): one index_select of flattened rows (several
    times faster than gather with an expanded index on CPU)."""
    (b, h, _, f), m = x.shape, index.shape[-1]
    return x.reshape(-1, f).index_select(0, _flat_rows(x, index)).view(b, h, m, f)


def _max_over_slots(x: Tensor, skip: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Routing scores x (..., S, C), slots by tokens -> for each token (..., C): its best score over
    every slot, then the best score and first index over slots ``skip`` on (x[..., :skip, :] is
    overwritten with -inf). The same values and indices as ``amax(-2)`` and ``max(-2)``, several times
    faster on CPU for many slots, in one pass over x: the max of each block of 32 or 64 slots first
    (a reduction vectorised across tokens), then the max and its index inside each token's first best
    block."""
    s, tokens = x.shape[-2:]
    block = 32 if s < 1024 else 64
    n = s // block
    if n < 2 or skip > n * block:
        every = x.amax(-2)
        x[..., :skip, :] = -torch.inf
        return every, *x.max(-2)
    blocks = x[..., : n * block, :].unflatten(-2, (n, block))  # (..., n, block, C)
    block_max = blocks.amax(-2)  # (..., n, C)
    every = block_max.amax(-2)
    if skip:
        x[..., :skip, :] = -torch.inf
        touched = -(-skip // block)
        block_max[..., :touched, :] = blocks[..., :touched, :, :].amax(-2)
    best_block = block_max.max(-2).indices  # (..., C)
    by_token = blocks.flatten(0, -4).permute(0, 3, 1, 2)  # (N, C, n, block) view, N the leading dims
    rows, cols = torch.arange(by_token.shape[0], device=x.device)[:, None], torch.arange(tokens, device=x.device)
    inside = by_token[rows, cols, best_block.reshape(-1, tokens)]  # (N, C, block): faster than gather on CPU
    best, index = (y.view_as(best_block) for y in inside.max(-1))
    index = best_block * block + index
    if n * block < s:  # the ragged tail wins only if strictly larger: ties keep the first index
        tail_best, tail_index = x[..., n * block:, :].max(-2)
        index = torch.where(tail_best > best, tail_index + n * block, index)
        best, every = torch.maximum(best, tail_best), torch.maximum(every, tail_best)
    return every, best, index


def _flat_rows(x: Tensor, index: Tensor) -> Tensor:
    """Slot indices (B, H, M) into x (B, H, S, F) -> row indices (B*H*M,) into x.view(-1, F)."""
    b, h, s, _ = x.shape
    return (index + torch.arange(0, b * h * s, s, device=index.device).view(b, h, 1)).flatten()


def _add_rows(x: Tensor, index: Tensor, rows: Tensor, *, inplace: bool = False) -> Tensor:
    """x (B, H, S, F) with rows (B, H, M, F) added at slots index (B, H, M): one index_add over the
    flattened slots, several times faster than scatter_add on CPU. ``inplace``: into x (contiguous)."""
    f = x.shape[-1]
    flat, index, rows = x.view(-1, f) if inplace else x.reshape(-1, f), _flat_rows(x, index), rows.reshape(-1, f)
    return (flat.index_add_(0, index, rows) if inplace else flat.index_add(0, index, rows)).view(x.shape)


def _in_room(room: _Room, num: int) -> _Slots:
    """The first ``num`` slots of a room, as views."""
    d = room.read_keys.shape[-1]
    return _Slots(room.sums[:, :, :num, :d], room.sums[:, :, :num, d:], room.lens[:, :, :num], room)


class _KVMCore:
    """The algorithm for one call, bound to a layer's config and KVM parameters."""

    def __init__(self, config: KVMConfig, state_key_norm: nn.Module, zero_dims: int,
                 window_temp: Tensor | None, state_temp: Tensor | None, scale: float):
        self.config, self.norm, self.zero_dims = config, state_key_norm, zero_dims
        self.window_temp, self.state_temp, self.scale = window_temp, state_temp, scale
        self.native = False  # set by ``use_native_kernels``
        self.read_view: _ReadView | None = None  # the last read of slots outside a room (``read_slots``)
        self._incoming_buffers: tuple[Tensor, Tensor, Tensor] | None = None  # native ``incoming``'s outputs
        self._window_masks: dict = {}  # ``attend_windows``' additive masks by (groups, dtype, device)

    def use_native_kernels(self, *tensors: Tensor) -> None:
        """Run state updates and whole-chunk reads with the fused C kernels (blocks/native/kvm_cpu.c)
        where they apply: without autograd, fp32 CPU tensors, a LayerNorm as state-key norm, no
        bf16 rounding of state values, and the kernels built on this machine."""
        norm = self.norm
        self.native = (not torch.is_grad_enabled() and not self.config.bf16_state_values
                       and type(norm) is nn.LayerNorm and norm.weight is not None
                       and norm.weight.dtype == torch.float32
                       and (norm.bias is None or norm.bias.dtype == torch.float32)
                       and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
                       and kvm_cpu.library() is not None)

    @functools.cached_property
    def _norm_args(self) -> tuple[Tensor, Tensor | None, float]:
        """The state-key LayerNorm's weight, bias and eps, as the kernels take them (once per call)."""
        return self.norm.weight.detach(), None if self.norm.bias is None else self.norm.bias.detach(), self.norm.eps

    def prepare_keys(self, k: Tensor) -> Tensor:
        """Keys entering the state: zero the rotated dims, then the state-key norm (which re-fills them)."""
        if self.zero_dims:
            k = torch.cat([torch.zeros_like(k[..., : self.zero_dims]), k[..., self.zero_dims :]], dim=-1)
        return self.norm(k)

    @functools.cached_property
    def _fewer_routing_dims(self) -> tuple[Tensor, Tensor] | None:
        """fp32 (w, b) of the state-key LayerNorm over the zeroed dims, when routing can skip them.

        With a LayerNorm as state-key norm, the first z (zeroed) dims of every prepared key are
        a*w + b: w, b the norm's weight and bias there, a one number per token. Their share of a
        score is a * (slot[:z] . w) + slot[:z] . b, so the product runs over d - z + 2 dims instead
        of d (66 instead of 128 in the paper's layers): the same scores up to float rounding, for
        about half the multiply-adds."""
        z = self.zero_dims
        if not (isinstance(self.norm, nn.LayerNorm) and self.norm.weight is not None and z > 2):
            return None
        w = self.norm.weight[:z].detach().float()
        return w, torch.zeros_like(w) if self.norm.bias is None else self.norm.bias[:z].detach().float()

    @torch.no_grad()
    def token_features(self, k_u: Tensor) -> Tensor:
        """Prepared keys (..., C, d) -> fp32 (..., C, r): their routing score against a slot is the
        product with the slot's ``slot_features``."""
        k_u, wb, z = k_u.detach().float(), self._fewer_routing_dims, self.zero_dims
        if wb is None:
            return k_u
        w, b = wb
        a = (k_u[..., :z] - b) @ (w / (w @ w).clamp_min(torch.finfo(w.dtype).tiny))  # (..., C): w = 0 gives a = 0
        return torch.cat([k_u[..., z:], a[..., None], torch.ones_like(a)[..., None]], -1)  # (..., C, d - z + 2)

    @torch.no_grad()
    def slot_features(self, normed: Tensor) -> Tensor:
        """Normed slot keys (..., S, d) -> fp32 (..., S, r), the other side of ``token_features``."""
        normed, wb, z = normed.detach().float(), self._fewer_routing_dims, self.zero_dims
        if wb is None:
            return normed
        return torch.cat([normed[..., z:], normed[..., :z] @ torch.stack(wb, -1)], -1)  # (..., S, d - z + 2)

    def incoming(self, k: Tensor, v: Tensor, g: Tensor) -> _Incoming:
        """A raw overflow chunk (k, v: (B, Hkv, C, d); g: (B, Hkv, C, 1)) prepared for ``absorb``."""
        if self.native:  # into the same buffers every chunk: they are consumed by the update that follows
            cfg = self.config
            self._incoming_buffers = kvm_cpu.incoming(
                k, v, g, *self._norm_args, self.zero_dims, cfg.merge_gate_keys, cfg.merge_gate_values,
                self._fewer_routing_dims is not None, out=self._incoming_buffers)
            return _Incoming(self._incoming_buffers[0], v, *self._incoming_buffers[1:])
        k_u = self.prepare_keys(k)
        return _Incoming(k_u, v, torch.cat(self._gated(k_u, v, g), -1), self.token_features(k_u))

    def new_slots(self, k: Tensor, v: Tensor, g: Tensor) -> _Slots:
        """Slots for tokens copied straight in (the first chunk)."""
        if self.config.merge_gate_initial_state:
            k_in, v_in = self._gated(self.prepare_keys(k), v, g)
        else:
            k_in, v_in = self.prepare_keys(k), v
        return _Slots(k_in, v_in, self._lens_of(v_in))

    def _lens_of(self, v: Tensor) -> Tensor:
        if self.config.use_vlens:
            return v.float().norm(dim=-1, keepdim=True)
        return torch.ones(*v.shape[:-1], 1, dtype=torch.float32, device=v.device)

    def _gated(self, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        return (k * g if self.config.merge_gate_keys else k), (v * g if self.config.merge_gate_values else v)

    def with_room(self, slots: _Slots, rows: int, dtype: torch.dtype) -> _Slots:
        """A copy of the slots at the start of inference buffers for ``rows`` slots (see ``_Room``),
        so that updates write in place; ``dtype``: the dtype the attention reads values in."""
        (b, h, num, d), dv = slots.keys.shape, slots.values.shape[-1]
        sums = slots.keys.new_empty(b, h, rows, d + dv, dtype=torch.promote_types(slots.keys.dtype, slots.values.dtype))
        sums[:, :, :num, :d], sums[:, :, :num, d:] = slots.keys, slots.values
        lens = slots.lens.new_empty(b, h, rows, 1)
        lens[:, :, :num] = slots.lens
        read_keys, read_values = sums.new_empty(b, h, rows, d), sums.new_empty(b, h, rows, dv, dtype=dtype)
        read_keys[:, :, :num], read_values[:, :, :num] = self._read(*slots[:3], dtype)
        features = self.slot_features(read_keys[:, :, :num])
        room_features = features.new_empty(b, h, rows, features.shape[-1])
        room_features[:, :, :num] = features
        scores = features.new_empty(b * h * self.config.chunk_len * rows)
        return _in_room(_Room(sums, lens, read_keys, read_values, room_features, scores), num)

    def update(self, slots: _Slots, k: Tensor, v: Tensor, g: Tensor, ctx_len: int, available: int,
               normed_keys: Tensor | None = None) -> _Slots:
        """One boundary update: the raw chunk leaving the window (k, v: (B, Hkv, C, d | dv); g:
        (B, Hkv, C, 1)) folded into the slots. On a room with the BLAS kernels one C call does it
        all (``kvm_cpu.absorb``); otherwise ``incoming`` then ``absorb``.
        ``normed_keys``: ``state_key_norm(slots.keys)`` if the caller has it already."""
        if not (self.native and slots.room is not None and kvm_cpu.blas_kernels()):
            return self.absorb(slots, self.incoming(k, v, g), ctx_len, available, normed_keys)
        cfg, room, num = self.config, slots.room, slots.keys.shape[2]
        n_append = self._appending(ctx_len, available, num, k.shape[2])
        kvm_cpu.absorb(k, v, g, *self._norm_args, self.zero_dims, cfg.merge_gate_keys, cfg.merge_gate_values,
                       self._fewer_routing_dims is not None, cfg.sink_len, n_append, cfg.merge_gate_appends,
                       cfg.use_vlens, room.sums, room.lens, room.read_keys, room.read_values, room.features, num)
        return _in_room(room, num + n_append)

    def run_chunks(self, slots: _Slots, chunks: range, q: Tensor, out: Tensor, k: Tensor, v: Tensor, g: Tensor,
                   scales: tuple[Tensor, Tensor]) -> _Slots:
        """Whole chunks in a row, all of their tokens queries, in one C call (``kvm_cpu.run_chunks``):
        each chunk's boundary update, then its read into ``out``. Needs a room and the BLAS kernels.

        q (B, Hq, n*C, d), out (B, Hq, n*C, dv): the chunks' queries and outputs; k, v, g (B, Hkv,
        (n + Nb)*C, *): the raw tokens from one chunk before the first chunk's window to the end
        of the last one's; scales: the state's and the window's logit scales (Hq,) fp32."""
        cfg, num = self.config, slots.keys.shape[2]
        appends = []  # per chunk: the tokens its update appends, -1 where it runs none
        for c in chunks:
            update = boundary_update(c, cfg)
            appends.append(-1 if update is None else self._appending(*update, num, cfg.chunk_len))
            num += max(appends[-1], 0)
        room = slots.room
        kvm_cpu.run_chunks(q, out, k, v, g, appends, slots.keys.shape[2], *scales, *self._norm_args, self.zero_dims,
                           cfg.merge_gate_keys, cfg.merge_gate_values, self._fewer_routing_dims is not None,
                           cfg.sink_len, cfg.merge_gate_appends, cfg.use_vlens, room.sums, room.lens, room.read_keys,
                           room.read_values, room.features)
        return _in_room(room, num)

    def _appending(self, ctx_len: int, available: int, num: int, size: int) -> int:
        """How many of ``size`` tokens leaving the window become new slots: what the budget allows."""
        return min(max(target_slots(self.config, ctx_len, available, num) - num, 0), size)

    def absorb(self, slots: _Slots, incoming: _Incoming, ctx_len: int, available: int,
               normed_keys: Tensor | None = None) -> _Slots:
        """Fold one overflow chunk, prepared by ``incoming``, into the slots (there is at least one).
        ``normed_keys``: ``state_key_norm(slots.keys)`` if the caller has it already."""
        cfg = self.config
        (b, h, size, d), num = incoming.keys.shape, slots.keys.shape[2]
        n_append = self._appending(ctx_len, available, num, size)
        # The best slot of each token, by its score against every slot: over all (novelty), and over
        # the non-sink slots (its winner). (B, Hkv, C) each.
        native = self.native and slots.room is not None  # the kernels update a room in place
        if native:  # the scores a block of slots at a time, each block reduced while in cache
            novelty, best, target = kvm_cpu.best_slots(slots.room.features[:, :, :num], incoming.routing,
                                                       cfg.sink_len, slots.room.scores)
        else:  # every slot against every token, (B, Hkv, S, C) fp32
            if slots.room is not None:
                scores = torch.matmul(slots.room.features[:, :, :num], incoming.routing.transpose(-1, -2),
                                      out=slots.room.scores[: b * h * num * size].view(b, h, num, size))
            else:
                features = self.slot_features(self.norm(slots.keys) if normed_keys is None else normed_keys)
                scores = features @ incoming.routing.transpose(-1, -2)
            with torch.no_grad():
                novelty, best, target = _max_over_slots(scores, cfg.sink_len)
        if n_append:  # the most novel tokens (lowest best similarity to any slot) append, in token order
            ranked = novelty.argsort(dim=-1, stable=True)  # (B, Hkv, C)
            append_idx = ranked[..., :n_append].sort(dim=-1).values
            merge_idx = ranked[..., n_append:].sort(dim=-1).values
            if cfg.merge_gate_appends:
                appended = _gather_rows(incoming.gated, append_idx)  # (B, Hkv, A, d + dv)
                k_app, v_app = appended[..., :d], appended[..., d:]
            else:
                k_app, v_app = _gather_rows(incoming.keys, append_idx), _gather_rows(incoming.values, append_idx)
            slots = self._appended(slots, k_app, v_app, self._lens_of(v_app))
            with torch.no_grad():  # merges route against the post-append slots: the new ones win if strictly better
                new_rows = self.slot_features(self.norm(k_app)) @ incoming.routing.transpose(-1, -2)  # (B, Hkv, A, C)
                best_new, target_new = (kvm_cpu.route(new_rows, 0) if native else _max_over_slots(new_rows))[1:]
                target = torch.where(best_new > best, target_new + num, target)  # ties keep the lower slot
        merging = incoming.gated  # (B, Hkv, M, d + dv)
        if n_append:
            target = target.gather(2, merge_idx)  # (B, Hkv, M): only the merging tokens
            merging = _gather_rows(merging, merge_idx)
        counts = None if cfg.use_vlens else torch.ones_like(target, dtype=slots.lens.dtype).unsqueeze(-1)
        room = slots.room
        if room is None:
            lens = slots.lens if counts is None else _add_rows(slots.lens, target, counts)
            return _Slots(_add_rows(slots.keys, target, merging[..., :d]), _add_rows(slots.values, target, merging[..., d:]),
                          lens)
        if native:
            kvm_cpu.merge_and_read(room.sums, room.lens, *room[2:5], target.contiguous(), merging.contiguous(),
                                   counts is not None, num + n_append, num, *self._norm_args, self.zero_dims,
                                   cfg.use_vlens, self._fewer_routing_dims is not None)
            return slots
        _add_rows(room.sums, target, merging, inplace=True)
        if counts is not None:
            _add_rows(room.lens, target, counts, inplace=True)
        return self._refresh(slots, torch.cat([target, torch.arange(num, num + n_append, device=target.device)
                                               .expand(b, h, -1)], 2))

    def _refresh(self, slots: _Slots, touched: Tensor) -> _Slots:
        """Recompute the room's read view where an update touched the slots (B, Hkv, M), repeats
        allowed; the whole view when that is most of it (gathering rows costs more than it saves)."""
        room, num, d = slots.room, slots.keys.shape[2], slots.keys.shape[-1]
        if 2 * touched.shape[2] >= num:
            read_keys, read_values = self._read(*slots[:3], room.read_values.dtype)
            features = self.slot_features(read_keys)
            if num == room.sums.shape[2]:  # the view spans the whole room: keep the new tensors as they are
                return slots._replace(room=room._replace(read_keys=read_keys, read_values=read_values, features=features))
            room.read_keys[:, :, :num], room.read_values[:, :, :num], room.features[:, :, :num] = (
                read_keys, read_values, features)
            return slots
        flat = _flat_rows(room.sums, touched)  # (B*Hkv*M,)
        rows = lambda buf: buf.view(-1, buf.shape[-1]).index_select(0, flat)  # noqa: E731
        sums = rows(room.sums)  # (B*Hkv*M, d + dv)
        read_keys, read_values = self._read(sums[:, :d], sums[:, d:], rows(room.lens), room.read_values.dtype)
        for view, new in zip(room[2:], (read_keys, read_values, self.slot_features(read_keys))):
            view.view(-1, view.shape[-1]).index_copy_(0, flat, new)
        return slots

    def _appended(self, slots: _Slots, keys: Tensor, values: Tensor, lens: Tensor) -> _Slots:
        """The slots followed by new ones (B, Hkv, M, *); written into the room if there is one."""
        room = slots.room
        if room is None:
            return _Slots(*(torch.cat([old, new], 2) for old, new in zip(slots[:3], (keys, values, lens))))
        (num, d), end = slots.keys.shape[2:], slots.keys.shape[2] + keys.shape[2]
        room.sums[:, :, num:end, :d], room.sums[:, :, num:end, d:], room.lens[:, :, num:end] = keys, values, lens
        return _in_room(room, end)

    def read_slots(self, slots: _Slots, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Slots as attention keys and values per kv head, (B, Hkv, S, d) each: keys through the
        state-key norm (the next update routes against them too), values re-normalised just in time.
        Without autograd, the view of slots outside a room is kept in ``read_view`` and reused while
        they, the norm's parameters and the dtype are unchanged."""
        if slots.room is not None:
            num = slots.keys.shape[2]
            return slots.room.read_keys[:, :, :num], slots.room.read_values[:, :, :num]
        if torch.is_grad_enabled():
            return self._read(*slots[:3], dtype)
        key, view = self._view_key(slots[:3], dtype), self.read_view
        if view is None or view.key != key or any(a is not b for a, b in zip(view.sums, slots[:3])):
            view = self.read_view = _ReadView(tuple(slots[:3]), key, *self._read(*slots[:3], dtype))
        return view.keys, view.values

    def _view_key(self, sums: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype) -> tuple:
        """What a read view depends on besides the slot tensors' identity: their versions (in-place
        changes; inference tensors have none, and this code never changes a state's slots in
        place), the norm and its parameters' versions, and the dtype read in."""
        version = lambda x: None if x.is_inference() else x._version  # noqa: E731
        return (tuple(map(version, sums)), id(self.norm), tuple(map(version, self.norm.parameters())), dtype,
                self.config.use_vlens, self.config.bf16_state_values)

    def _read(self, keys: Tensor, values: Tensor, lens: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The read formula, row by row: (..., d) sums, (..., 1) lens -> read keys and values."""
        if self.config.use_vlens:  # direction times length: F.normalize(values) * lens in one pass over the values
            values = values.float() * (lens / values.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
        else:
            values = values.float() / lens
        if self.config.bf16_state_values:
            values = values.bfloat16()
        return self.norm(keys), values.to(dtype)

    def attend_tile(self, q: Tensor, slot_keys: Tensor, slot_values: Tensor, keys: Tensor, values: Tensor,
                    mask: Tensor) -> Tensor:
        """The exact read of one tile: one softmax per query over [state ; window] keys.

        q (B, Hq, Lq, d); slot_keys/slot_values (B, Hkv, S, d) from ``read_slots``; keys/values
        (B, Hkv, L, d) the raw window; mask (Lq, L) True where a query may see a window key.
        -> (B, Hq, Lq, dv)"""
        if q.shape[2] <= SMALL_TILE:
            return self._attend_small_tile(q, slot_keys, slot_values, keys, values, mask)
        groups = q.shape[1] // keys.shape[1]
        keys = torch.cat([_per_query_head(slot_keys, groups, self.state_temp),
                          _per_query_head(keys, groups, self.window_temp)], 2)  # (B, Hq, S + L, d)
        values = repeat_heads(torch.cat([slot_values, values], 2), groups)
        mask = torch.cat([mask.new_ones(mask.shape[0], slot_keys.shape[2]), mask], 1)  # (Lq, S + L)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)

    def _attend_small_tile(self, q: Tensor, slot_keys: Tensor, slot_values: Tensor, keys: Tensor, values: Tensor,
                           mask: Tensor) -> Tensor:
        """``attend_tile`` for a few queries (decode): the temperatures scale the queries, not the S + L
        keys, and the state and the window are read by products of their own, so no key or value is
        copied; the logits (a few rows) are joined for one softmax in fp32."""
        b, hq, lq, _ = q.shape
        hkv, num = keys.shape[1], slot_keys.shape[2]
        groups = hq // hkv

        def logits(temp: Tensor | None, k: Tensor) -> Tensor:  # (B, Hkv, g*Lq, n): a kv head's g query heads as rows
            rows = _times_head_temp(q, temp).reshape(b, hkv, groups * lq, -1)
            return (rows @ k.transpose(-1, -2)).float() * self.scale

        window_logits = logits(self.window_temp, keys).masked_fill(~mask.repeat(groups, 1), -torch.inf)
        weights = torch.cat([logits(self.state_temp, slot_keys), window_logits], -1).softmax(-1).to(values.dtype)
        out = weights[..., :num] @ slot_values + weights[..., num:] @ values  # (B, Hkv, g*Lq, dv)
        return out.view(b, hq, lq, -1)

    def attend_slots(self, q: Tensor, slot_keys: Tensor, slot_values: Tensor) -> tuple[Tensor, Tensor]:
        """The state part of a split read: q (B, Hq, Lq, d) against every slot (B, Hkv, S, d).
        -> output (B, Hq, Lq, dv) and its log-sum-exp (B, Hq, Lq) fp32."""
        q = _times_head_temp(q, self.state_temp)  # (q t) . k == q . (k t): scale the fewer rows
        return _flash_cpu(q, slot_keys, slot_values, attn_mask=None, scale=self.scale)

    def attend_windows(self, q: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The window part of a split read for n whole query chunks, in one call.

        q (B, Hq, n*C, d): the chunks' queries; keys/values (B, Hkv, (n + Nb - 1)*C, d): the raw
        tokens from the first chunk's window start. Chunk i sees the W keys from row i*C, lower-right
        causal; these windows are overlapping views of keys/values, never copies.
        -> output (B, Hkv, n, g, C, dv) and log-sum-exp (B, Hkv, n, g, C) fp32, g = Hq / Hkv query
        heads per kv head (chunk i of query head h*g + j is [:, h, i, j])."""
        chunk, window = self.config.chunk_len, self.config.window_len
        b, hq, length, d = q.shape
        hkv = keys.shape[1]
        groups, n = hq // hkv, length // chunk
        q = q.unflatten(1, (hkv, groups)).unflatten(3, (n, chunk))  # (B, Hkv, g, n, C, d)
        if self.window_temp is not None:  # on q: the keys are shared by the g query heads
            q = q * self.window_temp.to(q.dtype).view(1, hkv, groups, 1, 1, 1)
        # A batch entry is (row, kv head) and a "head" is a chunk; a kv head's g query heads are extra query rows.
        q = q.transpose(2, 3).reshape(b * hkv, n, groups * chunk, d)  # (B*Hkv, n, g*C, d)
        tiles = lambda x: x.flatten(0, 1).unfold(1, window, chunk).transpose(-1, -2)  # noqa: E731  (B*Hkv, n, W, d)
        key = (groups, q.dtype, q.device)
        if key not in self._window_masks:  # (g*C, W), the same for every call
            visible = (torch.arange(window, device=q.device)[None, :]
                       <= window - chunk + torch.arange(chunk, device=q.device)[:, None])  # (C, W)
            mask = torch.zeros(chunk, window, dtype=q.dtype, device=q.device).masked_fill_(~visible, -torch.inf)
            self._window_masks[key] = mask.repeat(groups, 1)
        out, lse = _flash_cpu(q, tiles(keys), tiles(values), attn_mask=self._window_masks[key], scale=self.scale)
        return out.view(b, hkv, n, groups, chunk, -1), lse.view(b, hkv, n, groups, chunk)


SMALL_TILE = 16  # tiles of at most this many queries are read by ``_attend_small_tile``
WINDOW_CALL_BYTES = 4 << 20  # queries per window flash call in a split read (see ``_window_group``)
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # -> (output, log-sum-exp); lse has no grad


def _per_query_head(keys: Tensor, groups: int, temp: Tensor | None) -> Tensor:
    """(B, Hkv, L, d) keys -> (B, Hq, L, d), times the per-query-head temperature if any."""
    return _times_head_temp(repeat_heads(keys, groups), temp)


def _times_head_temp(x: Tensor, temp: Tensor | None) -> Tensor:
    """(B, H, L, d) times a per-head temperature (H,); x itself when there is none."""
    return x if temp is None else x * temp.to(x.dtype).view(1, -1, 1, 1)


def repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, ...) -> (B, Hkv * groups, ...): each kv head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def kvm_attention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, config: KVMConfig,
                  state: KVMState | None = None, *, state_key_norm: nn.Module,
                  window_temp: Tensor | None = None, state_temp: Tensor | None = None,
                  scale: float | None = None) -> tuple[Tensor, KVMState]:
    """KVM attention over projected, rotated heads, continuing ``state`` (None: an empty history).

    q: (B, Hq, T, d); k: (B, Hkv, T, d); v: (B, Hkv, T, dv); gate: (B, Hkv, T, 1) positive merge
    gate, or None for no gating; ``state_key_norm`` maps (..., d) keys to state keys;
    ``window_temp``/``state_temp``: (Hq,) logit temperatures or None.
    Returns the output (B, Hq, T, dv) before the output projection (a transposed view of a
    contiguous (B, T, Hq, dv) tensor, which that projection reads without a copy), and the new state.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if k.shape[:3] != (b, hkv, t) or v.shape[:3] != (b, hkv, t) or k.shape[-1] != d or hq % hkv:
        raise ValueError(f"kvm_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         "fit (B, Hq, T, d) / (B, Hkv, T, d) / (B, Hkv, T, dv) with Hkv dividing Hq")
    if gate is None:
        gate = q.new_ones(b, hkv, t, 1)
    elif gate.shape != (b, hkv, t, 1):
        raise ValueError(f"kvm_attention: gate must be (B, Hkv, T, 1) = {(b, hkv, t, 1)}, got {tuple(gate.shape)}")
    cfg = config
    chunk, window = cfg.chunk_len, cfg.window_len
    core = _KVMCore(cfg, state_key_norm, cfg.zeroed_key_dims(d), window_temp, state_temp, scale or 1.0 / math.sqrt(d))
    core.use_native_kernels(q, k, v, gate)

    n0 = 0 if state is None else state.seq_len
    n1 = n0 + t
    start = window_begin(n0, cfg)  # the buffer below holds raw tokens [start, n1)
    window_buffer = None  # where buf_* are views of a TokenBuffer (None: with autograd, or no state yet)
    if state is None:
        empty = k.new_zeros(b, hkv, 0, d)
        slots = _Slots(empty, v.new_zeros(b, hkv, 0, v.shape[-1]), k.new_zeros(b, hkv, 0, 1, dtype=torch.float32))
        buf_k, buf_v, buf_g = k, v, gate
    else:
        _check_state(state, b, hkv, d, v.shape[-1], n0, cfg)
        slots = _Slots(state.slot_keys, state.slot_values, state.slot_lens)
        core.read_view = state.read_view  # checked where it is used
        held = state.window_keys, state.window_values, state.window_gates
        window_buffer, (buf_k, buf_v, buf_g) = extend(state.window_buffer, held, (k, v, gate),
                                                      spare=window + chunk)  # a new buffer lasts a window and a chunk

    direct_end = min(n1, chunk)  # the first chunk goes into the state as it arrives
    if n0 < direct_end:
        fresh = core.new_slots(k[:, :, : direct_end - n0], v[:, :, : direct_end - n0], gate[:, :, : direct_end - n0])
        slots = _Slots(*(torch.cat([old, new], 2) for old, new in zip(slots[:3], fresh[:3])))
    if not torch.is_grad_enabled() and runs_update(n0, n1, cfg):  # updates write in place, never into the caller's state
        slots = core.with_room(slots, slots_after(n1, cfg), q.dtype)

    # (B, Hq, T, dv), rows filled region by region; laid out as (B, T, Hq, dv), so that the output
    # projection reads it as (B, T, Hq*dv) without a copy
    out = q.new_empty(b, t, hq, v.shape[-1]).transpose(1, 2)
    front_end = min(n1, window)
    if n0 < front_end:  # plain causal attention before position W (the buffer starts at 0 here)
        keys, values = buf_k[:, :, :front_end], buf_v[:, :, :front_end]
        groups = hq // hkv
        allowed = torch.arange(front_end, device=q.device)[None, :] <= torch.arange(n0, front_end, device=q.device)[:, None]
        out[:, :, : front_end - n0] = F.scaled_dot_product_attention(
            q[:, :, : front_end - n0], _per_query_head(keys, groups, window_temp), repeat_heads(values, groups),
            attn_mask=allowed, scale=core.scale)
    if n1 > window:
        slots = _joint_region(core, q, buf_k, buf_v, buf_g, slots, n0, start, out)

    keep = window_begin(n1, cfg) - start
    slot_keys, slot_values = slots.keys.contiguous(), slots.values.contiguous()  # a room's are views of its sums
    new_state = KVMState(slot_keys, slot_values, slots.lens, buf_k[:, :, keep:n1 - start],
                         buf_v[:, :, keep:n1 - start], buf_g[:, :, keep:n1 - start], n1)
    new_state.window_buffer = window_buffer
    view = core.read_view
    if view is not None and all(a is b for a, b in zip(view.sums, (slot_keys, slot_values, slots.lens))):
        new_state.read_view = view
    return out, new_state


def _joint_region(core: _KVMCore, q: Tensor, buf_k: Tensor, buf_v: Tensor, buf_g: Tensor, slots: _Slots,
                  n0: int, start: int, out: Tensor) -> _Slots:
    """Queries at positions >= W, a chunk at a time: run the chunk's boundary update, then read its
    queries against the state as it now is and against their window. Returns the final slots.

    buf_* hold raw tokens [start, n0 + T); q holds the queries [n0, n0 + T); their outputs go to the
    same rows of ``out`` (B, Hq, T, dv). Three reads, equal up to float rounding:

    * exact tile: one softmax over [state ; window] keys concatenated per chunk. Used with autograd
      on (training: the flash op's log-sum-exp has no gradient), off CPU, and for partial chunks
      (decode, continuations that start or stop inside a chunk).
    * fused (the C kernels, see the module docstring): a whole chunk's slots and window in one
      online softmax, straight into ``out``; with a room, all the whole chunks' updates and reads
      in one call (``_KVMCore.run_chunks``).
    * split (under no_grad / inference_mode, CPU, whole chunks): the window part of a few whole
      chunks at a time (``_window_group``) in one flash attention call over overlapping views of the
      buffer, the state part per chunk against its slots as they are, each with its log-sum-exp;
      their merge is the joint softmax, o_w + sigmoid(lse_s - lse_w) * (o_s - o_w). Nothing is
      copied into tiles.
    """
    cfg = core.config
    chunk, nb, window = cfg.chunk_len, cfg.n_bswa_chunks, cfg.window_len
    n1 = n0 + q.shape[2]
    first_chunk, last_chunk = max(n0, window) // chunk, (n1 - 1) // chunk
    whole_lo, whole_hi = -(-max(n0, window) // chunk), n1 // chunk  # chunks [whole_lo, whole_hi) are all queries
    split = whole_lo < whole_hi and q.device.type == "cpu" and not torch.is_grad_enabled()
    group = _window_group(q.shape[0] * q.shape[1] * chunk * q.shape[-1] * q.element_size()) if split else 0
    fused = split and core.native and kvm_cpu.blas_kernels()
    if fused:  # each query head's logit scales, fp32: (Hq,) for the state and (Hq,) for the window
        scales = tuple((core.scale * (torch.ones(q.shape[1]) if t is None else t.detach().float())).contiguous()
                       for t in (core.state_temp, core.window_temp))
    one_call = fused and slots.room is not None  # the whole chunks' updates and reads in one C call
    normed = None  # state_key_norm(slots.keys) while the slots are unchanged since it was computed
    for c in range(first_chunk, last_chunk + 1):
        if one_call and whole_lo <= c < whole_hi:
            if c == whole_lo:
                rows, lo = slice(whole_lo * chunk - n0, whole_hi * chunk - n0), (whole_lo - nb) * chunk - start
                raw = tuple(x[:, :, lo:whole_hi * chunk - start] for x in (buf_k, buf_v, buf_g))
                slots = core.run_chunks(slots, range(whole_lo, whole_hi), q[:, :, rows], out[:, :, rows], *raw, scales)
            continue
        update = boundary_update(c, cfg)
        if update is not None and c * chunk >= n0:  # this boundary's first token is new: update now
            lo = (c - nb) * chunk - start
            slots = core.update(slots, buf_k[:, :, lo:lo + chunk], buf_v[:, :, lo:lo + chunk], buf_g[:, :, lo:lo + chunk],
                                *update, normed_keys=normed)
        normed, slot_values = core.read_slots(slots, q.dtype)
        q_lo, q_hi = max(n0, c * chunk), min(n1, (c + 1) * chunk)  # absolute query range of the chunk
        rows = slice(q_lo - n0, q_hi - n0)
        if fused and whole_lo <= c < whole_hi:  # one C kernel: slots and window in one softmax, into out
            win_lo = (c + 1 - nb) * chunk - start
            kvm_cpu.attend_chunk(q[:, :, rows], normed, slot_values, buf_k[:, :, win_lo:win_lo + window],
                                 buf_v[:, :, win_lo:win_lo + window], *scales, out[:, :, rows])
        elif split and whole_lo <= c < whole_hi:
            if (c - whole_lo) % group == 0:  # the windows of the next few whole chunks, in one call
                group_hi, win_lo = min(c + group, whole_hi), (c + 1 - nb) * chunk - start
                win_out, win_lse = core.attend_windows(q[:, :, c * chunk - n0:group_hi * chunk - n0],
                                                       buf_k[:, :, win_lo:group_hi * chunk - start],
                                                       buf_v[:, :, win_lo:group_hi * chunk - start])
                group_lo = c
            o_s, lse_s = core.attend_slots(q[:, :, rows], normed, slot_values)  # (B, Hq, C, dv), (B, Hq, C)
            o_w, lse_w = win_out[:, :, c - group_lo], win_lse[:, :, c - group_lo]  # (B, Hkv, g, C, dv), (B, Hkv, g, C)
            if core.native:
                kvm_cpu.join(o_w, lse_w, o_s.view_as(o_w), lse_s.view_as(lse_w), out[:, :, rows].view_as(o_w))
            else:
                weight = torch.sigmoid(lse_s.view_as(lse_w) - lse_w).unsqueeze(-1).to(o_w.dtype)  # share of the state
                torch.lerp(o_w, o_s.view_as(o_w), weight, out=out[:, :, rows].view_as(o_w))
        else:
            win_lo = (c + 1 - nb) * chunk - start  # buffer index of the chunk's window start
            # (q_hi - q_lo, keys): the query at chunk offset i sees window keys j <= (Nb - 1)*C + i
            mask = (torch.arange(q_hi - start - win_lo, device=q.device)[None, :]
                    <= (nb - 1) * chunk + torch.arange(q_lo - c * chunk, q_hi - c * chunk, device=q.device)[:, None])
            out[:, :, rows] = core.attend_tile(q[:, :, rows], normed, slot_values, buf_k[:, :, win_lo:q_hi - start],
                                               buf_v[:, :, win_lo:q_hi - start], mask)
    return slots


def _window_group(chunk_bytes: int) -> int:
    """Whole chunks whose windows one flash call reads, given the bytes of one chunk's queries: about
    4 MiB of queries per call. The call's scaled queries and outputs then take a few MiB instead of
    two tensors the size of all queries (a 32k prefill of 6 heads x 128: 134 MiB peak instead of
    220, the output itself 96), at the same speed as one call for all chunks (measured)."""
    return max(1, WINDOW_CALL_BYTES // chunk_bytes)


def _check_state(state: KVMState, b: int, hkv: int, d: int, dv: int, n0: int, cfg: KVMConfig) -> None:
    expected_window = n0 - window_begin(n0, cfg)
    problems = []
    if state.slot_keys.shape[:2] != (b, hkv) or state.slot_keys.shape[-1] != d:
        problems.append(f"slot_keys {tuple(state.slot_keys.shape)} vs batch {b}, {hkv} kv heads, head_dim {d}")
    if state.slot_values.shape[-1] != dv or state.window_values.shape[-1] != dv:
        problems.append(f"value dim {state.slot_values.shape[-1]} vs {dv}")
    if state.window_keys.shape[2] != expected_window:
        problems.append(f"window holds {state.window_keys.shape[2]} tokens, expected {expected_window} "
                        f"for {n0} tokens with chunk_len {cfg.chunk_len} x {cfg.n_bswa_chunks} chunks")
    if state.num_slots != slots_after(n0, cfg):
        problems.append(f"{state.num_slots} slots, but this layer's budget gives {slots_after(n0, cfg)} after {n0} tokens")
    if problems:
        raise StateError("KVM state does not belong to this layer (different model, config or batch?): "
                         + "; ".join(problems))


@register_mixer("kvm", symbol="K", state=KVMState)
class KVMAttention(ProjectedAttention):
    """Key-Value Means attention: block sliding window + a compressed, budgeted memory."""

    Config = KVMConfig

    def __init__(self, config: KVMConfig, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__(config, d_model, layer_idx, n_layers)
        if config.uses_merge_gate:
            self.merge_gate_proj = nn.Linear(d_model, self.num_kv_heads, bias=False)
        if config.use_head_temps:
            self.window_temp = nn.Parameter(torch.ones(self.num_heads))
            self.state_temp = nn.Parameter(torch.ones(self.num_heads))
        self.state_key_norm = nn.LayerNorm(self.head_dim, eps=config.norm_eps)

    def forward(self, x: Tensor, state: KVMState | None = None, ctx: dict | None = None) -> tuple[Tensor, KVMState]:
        """x: (B, T, d_model) -> y (B, T, d_model), the state after these T tokens."""
        self._check_input(x)
        if state is not None and not isinstance(state, KVMState):
            raise StateError(f"KVMAttention got a {type(state).__name__}, expected a KVMState")
        q, k, v, new_tails = self.project(x, 0 if state is None else state.seq_len, self.shift_tails(state), ctx)
        gate = None
        if self.config.uses_merge_gate:
            gate = (1 + F.elu(self.merge_gate_proj(x))).transpose(1, 2).unsqueeze(-1)  # (B, Hkv, T, 1)
        o, new_state = kvm_attention(
            q, k, v, gate, self.config, state, state_key_norm=self.state_key_norm,
            window_temp=getattr(self, "window_temp", None), state_temp=getattr(self, "state_temp", None),
            scale=self.scale)
        self.store_shift_tails(new_state, new_tails)
        return self.output(o), new_state
