"""KVM over packed documents (``kvm_attention_documents``): every document its own chunk schedule.

Each document of a packed batch runs ``kvm_attention`` from an empty state, as if it were the whole
sequence: its chunks, its window, its slots and its budget count from its first token. Documents run
together, as the rows of one call, each padded to the longest of its call by repeating its last
token: the padding comes after every real token, so no real output depends on it, and a repeated
real token keeps every value finite, so the padding's zero gradient stays zero. The outputs go back
to their rows and positions.

A call walks its chunks one after another, so documents are grouped by length in powers of two of
their chunks (1, 2, 3-4, 5-8, ...): a group pads its documents to at most twice their chunks, and the
calls of all groups walk at most twice the chunks of the longest document, where one call per
distinct length would walk their sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.documents import Documents
from blocks.kvm.attention import kvm_attention
from blocks.kvm.config import KVMConfig


def kvm_attention_documents(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, config: KVMConfig,
                            documents: Documents, **read) -> Tensor:
    """``kvm_attention`` (its ``read`` keywords: state_key_norm, temperatures, scale) on each of the packed
    ``documents`` from an empty state: q (B, Hq, T, d), k (B, Hkv, T, d), v (B, Hkv, T, dv), gate
    (B, Hkv, T, 1) or None -> (B, Hq, T, dv), a transposed view of a contiguous (B, T, Hq, dv) tensor
    (what ``kvm_attention`` returns)."""
    b, hq, t, _ = q.shape
    groups: dict[int, list[tuple[int, int]]] = {}  # log2 of chunks -> (first flat token, length) of each document
    for row, begin, end in documents.spans:
        chunks = -(-(end - begin) // config.chunk_len)
        groups.setdefault((chunks - 1).bit_length(), []).append((row * t + begin, end - begin))
    flat = [None if x is None else x.transpose(1, 2).flatten(0, 1) for x in (q, k, v, gate)]  # (B*T, heads, *)
    outs, dest = [], []
    for group in groups.values():
        first, lengths = (torch.tensor(c, device=q.device) for c in zip(*group))  # (n,) each
        steps = torch.arange(int(lengths.max()), device=q.device)  # (L,)
        index = first[:, None] + torch.minimum(steps[None], lengths[:, None] - 1)  # (n, L), the last token repeated
        q_d, k_d, v_d, gate_d = (None if x is None else x[index].transpose(1, 2) for x in flat)  # (n, heads, L, *)
        out, _ = kvm_attention(q_d, k_d, v_d, gate_d, config, None, **read)  # (n, Hq, L, dv)
        real = steps[None] < lengths[:, None]  # (n, L)
        outs.append(out.transpose(1, 2)[real])  # (tokens, Hq, dv)
        dest.append(index[real])
    values = torch.cat(outs)  # (B*T, Hq, dv), in the order of dest
    out = values.new_zeros(b * t, *values.shape[1:]).index_copy(0, torch.cat(dest), values)
    return out.unflatten(0, (b, t)).transpose(1, 2)  # (B, Hq, T, dv)
