"""Softmax attention over packed documents (``document_attention``): a block-diagonal causal mask.

Each query sees only the keys of its own document, and among them those its pattern allows when
the document is taken as a whole sequence: all earlier ones (full attention), or those from a lowest
visible position on (sliding and block sliding windows, whose positions, and so block boundaries,
count from the document's first token), and besides them the document's first ``sink_len`` tokens
(attention sinks). The outputs equal those of every document run alone.
Queries go through in blocks, so the mask of one block is (B, 1, Lq, Lk) booleans.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.documents import Documents

QUERY_BLOCK = 1024  # query rows per attention call (bounds the mask's memory)


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Documents, *, scale: float,
                       lowest_visible: Callable[[Tensor], Tensor] | None = None, sink_len: int = 0) -> Tensor:
    """q (B, H, T, d), k and v (B, Hkv, T, d) of packed ``documents`` -> (B, H, T, dv).

    ``lowest_visible(positions)``: the lowest position a query at each position of its document
    sees (None: the document's first); the document's positions below ``sink_len`` stay visible."""
    length = q.shape[2]
    segments, positions = documents.segments, documents.positions  # (B, T) each
    index = torch.arange(length, device=q.device)
    outs = []
    for lo in range(0, length, QUERY_BLOCK):
        hi = min(length, lo + QUERY_BLOCK)
        k_lo = int((index[lo:hi] - positions[:, lo:hi]).min())  # the first token of the earliest document here
        q_pos, k_pos = positions[:, lo:hi, None], positions[:, None, k_lo:hi]  # (B, Lq, 1), (B, 1, Lk)
        allowed = (segments[:, lo:hi, None] == segments[:, None, k_lo:hi]) & (k_pos <= q_pos)  # (B, Lq, Lk)
        if lowest_visible is not None:
            allowed = allowed & ((k_pos >= lowest_visible(q_pos)) | (k_pos < sink_len))
        outs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, k_lo:hi], v[:, :, k_lo:hi],
                                                   attn_mask=allowed[:, None], scale=scale,
                                                   enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outs, dim=2)
