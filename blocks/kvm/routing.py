"""Where a chunk leaving the window goes: each token's best slot by routing score, the most novel
tokens appended as new slots, the others merged winner-take-all; and the row operations on
(B, H, rows, F) tensors that carry it out (fast index_select / index_add forms for CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from blocks.kvm.codec import Incoming, SlotCodec


class Routed(NamedTuple):
    """A leaving chunk, routed: the tokens that append, and where each other token merges."""

    append_keys: Tensor | None  # (B, Hkv, A, d): the new slots' keys (gated if merge_gate_appends); None: A = 0
    append_values: Tensor | None  # (B, Hkv, A, dv)
    target: Tensor  # (B, Hkv, M): the slot each merging token adds to
    merging: Tensor  # (B, Hkv, M, d + dv): what it adds, its gated key | value
    append_weights: Tensor | None = None  # (B, Hkv, A, 1): the new slots' lens in the mean read (None: lens_of)
    merge_weights: Tensor | None = None  # (B, Hkv, M, 1): what each merging token adds to lens (None: one)


def route_chunk(codec: SlotCodec, incoming: Incoming, novelty: Tensor, best: Tensor, target: Tensor, slots: int,
                appends: int, best_among_new: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Routed:
    """Route a chunk given its scores against the ``slots`` slots before the update: for each token
    (B, Hkv, C), its best score over every slot (``novelty``), and its best score and slot over the
    non-sink ones (``best``, ``target``). The ``appends`` most novel tokens (lowest best similarity
    to any slot) append, in token order; the others merge into their best slot among the slots
    after appending: a new slot wins if strictly better (ties keep the lower slot).
    ``best_among_new``: routing scores (B, Hkv, A, C) -> best score and index over their A rows."""
    weights = incoming.weights
    if not appends:
        return Routed(None, None, target, incoming.gated, merge_weights=weights)
    ranked = novelty.argsort(dim=-1, stable=True)  # (B, Hkv, C)
    append_idx = ranked[..., :appends].sort(dim=-1).values
    merge_idx = ranked[..., appends:].sort(dim=-1).values
    d = incoming.keys.shape[-1]
    append_weights = None  # ungated appends weigh one each
    if codec.config.merge_gate_appends:
        appended = gather_rows(incoming.gated, append_idx)  # (B, Hkv, A, d + dv)
        k_app, v_app = appended[..., :d], appended[..., d:]
        append_weights = None if weights is None else gather_rows(weights, append_idx)
    else:
        k_app, v_app = gather_rows(incoming.keys, append_idx), gather_rows(incoming.values, append_idx)
    with torch.no_grad():
        new_rows = codec.slot_features(codec.norm(k_app)) @ incoming.routing.transpose(-1, -2)  # (B, Hkv, A, C)
        best_new, target_new = best_among_new(new_rows)
        target = torch.where(best_new > best, target_new + slots, target)
    return Routed(k_app, v_app, target.gather(2, merge_idx), gather_rows(incoming.gated, merge_idx), append_weights,
                  None if weights is None else gather_rows(weights, merge_idx))


def new_slot_lens(codec: SlotCodec, routed: Routed) -> Tensor:
    """The lens of the slots a routed chunk appends (B, Hkv, A, 1) fp32: their weights in the mean
    read of gated tokens, else ``codec.lens_of`` their values."""
    return codec.lens_of(routed.append_values) if routed.append_weights is None else routed.append_weights


def merge_increments(routed: Routed, dtype: torch.dtype) -> Tensor:
    """What each merging token adds to its slot's lens when lens count (B, Hkv, M, 1): its weight in
    the mean read of gated tokens, else one."""
    if routed.merge_weights is not None:
        return routed.merge_weights.to(dtype)
    return torch.ones_like(routed.target, dtype=dtype).unsqueeze(-1)


def max_over_slots(x: Tensor, skip: int = 0) -> tuple[Tensor, Tensor, Tensor]:
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


def flat_rows(x: Tensor, index: Tensor) -> Tensor:
    """Slot indices (B, H, M) into x (B, H, S, F) -> row indices (B*H*M,) into x.view(-1, F)."""
    b, h, s, _ = x.shape
    return (index + torch.arange(0, b * h * s, s, device=index.device).view(b, h, 1)).flatten()


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: (B, H, L, F), index: (B, H, M) -> (B, H, M, F): one index_select of flattened rows (several
    times faster than gather with an expanded index on CPU)."""
    (b, h, _, f), m = x.shape, index.shape[-1]
    return x.reshape(-1, f).index_select(0, flat_rows(x, index)).view(b, h, m, f)


def add_rows(x: Tensor, index: Tensor, rows: Tensor, *, inplace: bool = False) -> Tensor:
    """x (B, H, S, F) with rows (B, H, M, F) added at slots index (B, H, M): one index_add over the
    flattened slots, several times faster than scatter_add on CPU. ``inplace``: into x (contiguous)."""
    f = x.shape[-1]
    flat, index, rows = x.view(-1, f) if inplace else x.reshape(-1, f), flat_rows(x, index), rows.reshape(-1, f)
    return (flat.index_add_(0, index, rows) if inplace else flat.index_add(0, index, rows)).view(x.shape)
