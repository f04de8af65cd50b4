"""What the chunked delta-rule ops (``delta_rule``, ``dplr``) share: the dtype they compute in,
cutting a sequence into zero-padded chunks, and their sequential part, the affine state map
``S_next = F S + Gm`` carried from one chunk to the next and read by every token of each."""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.ops.varlen import ChunkLayout, scan_chunks


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs (states are always kept at least fp32); fp64 stays fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def to_chunks(x: Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, *] -> [B, H, N, C, *] in ``dtype``, with zero tokens after the last one to fill N chunks."""
    B, T, H = x.shape[:3]
    pad = n_chunks * chunk - T
    x = x.to(dtype)
    if pad:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.transpose(1, 2).reshape(B, H, n_chunks, chunk, *x.shape[3:])


def across_chunks(F: Tensor, Gm: Tensor, state: Tensor, q_start: Tensor, o_intra: Tensor, length: int,
                  layout: ChunkLayout | None = None, final_states: bool = False) -> tuple[Tensor, Tensor | None]:
    """The state entering each chunk, from ``state`` through each chunk's ``S_next = F @ S + Gm``, and
    every token's output ``o_intra + q_start @ S_start`` (the part inside its chunk plus its read of
    the state the chunk began with).

    F: [B, H, N, K, K]; Gm: [B, H, N, K, V]; state: [B, H, K, V]; q_start: [B, H, N, C, K]; o_intra:
    [B, H, N, C, V], in the compute dtype. Returns the outputs of the first ``length`` tokens
    [B, length, H, V] and the final state in the compute dtype: after the last chunk [B, H, K, V], or
    with a ``layout`` (packed sequences in lanes, blocks/ops/varlen.py) each sequence's own when
    ``final_states``, else None."""
    B, H, N, C, V = o_intra.shape
    starts, state = scan_chunks(state.to(o_intra.dtype), lambda s, n: F[:, :, n] @ s + Gm[:, :, n], N,
                                layout, final_states)  # starts: [B, H, N, K, V]
    o = o_intra + q_start @ starts  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :length].transpose(1, 2)  # [B, T, H, V]
    return o, state
