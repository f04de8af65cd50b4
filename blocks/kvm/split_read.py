"""The split read of whole chunks on CPU without autograd: a chunk's window and its state read
apart, each with its log-sum-exp, then joined into the one softmax over [state ; window].

The windows of a few chunks at a time are one flash-attention call over overlapping views of the
raw keys (no tile is copied); the state part is one call per chunk against the slots as that
chunk's update left them. The join, o_w + sigmoid(lse_s - lse_w) * (o_s - o_w), is the joint
softmax up to float rounding. The flash op's log-sum-exp has no gradient: with autograd every
chunk is a tile (``reads.attend_tile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.kvm.codec import SlotReads
from blocks.kvm.reads import ReadScales, slot_bias, times_head_temp

WINDOW_CALL_BYTES = 4 << 20  # queries per window flash call (see ``window_group``)
flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # -> (output, log-sum-exp); lse has no grad


def window_group(chunk_bytes: int) -> int:
    """Whole chunks whose windows one flash call reads, given the bytes of one chunk's queries: about
    4 MiB of queries per call. The call's scaled queries and outputs then take a few MiB instead of
    two tensors the size of all queries (a 32k prefill of 6 heads x 128: 134 MiB peak instead of
    220, the output itself 96), at the same speed as one call for all chunks (measured)."""
    return max(1, WINDOW_CALL_BYTES // chunk_bytes)


def window_mask(groups: int, chunk: int, window: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The additive mask (g*C, W) of every chunk's window read: query row i of a chunk sees window
    keys j <= W - C + i, for each of the g query heads of a kv head."""
    visible = (torch.arange(window, device=device)[None, :]
               <= window - chunk + torch.arange(chunk, device=device)[:, None])  # (C, W)
    mask = torch.zeros(chunk, window, dtype=dtype, device=device).masked_fill_(~visible, -torch.inf)
    return mask.repeat(groups, 1)


def attend_windows(q: Tensor, keys: Tensor, values: Tensor, chunk: int, window: int, mask: Tensor,
                   scales: ReadScales) -> tuple[Tensor, Tensor]:
    """The window part of a split read for n whole query chunks, in one call.

    q (B, Hq, n*C, d): the chunks' queries; keys/values (B, Hkv, (n + Nb - 1)*C, d): the raw
    tokens from the first chunk's window start. Chunk i sees the W keys from row i*C, lower-right
    causal; these windows are overlapping views of keys/values, never copies. mask: ``window_mask``.
    -> output (B, Hkv, n, g, C, dv) and log-sum-exp (B, Hkv, n, g, C) fp32, g = Hq / Hkv query
    heads per kv head (chunk i of query head h*g + j is [:, h, i, j])."""
    b, hq, length, d = q.shape
    hkv = keys.shape[1]
    groups, n = hq // hkv, length // chunk
    q = q.unflatten(1, (hkv, groups)).unflatten(3, (n, chunk))  # (B, Hkv, g, n, C, d)
    if scales.window_temp is not None:  # on q: the keys are shared by the g query heads
        q = q * scales.window_temp.to(q.dtype).view(1, hkv, groups, 1, 1, 1)
    # A batch entry is (row, kv head) and a "head" is a chunk; a kv head's g query heads are extra query rows.
    q = q.transpose(2, 3).reshape(b * hkv, n, groups * chunk, d)  # (B*Hkv, n, g*C, d)
    tiles = lambda x: x.flatten(0, 1).unfold(1, window, chunk).transpose(-1, -2)  # noqa: E731  (B*Hkv, n, W, d)
    out, lse = flash_cpu(q, tiles(keys), tiles(values), attn_mask=mask, scale=scales.scale)
    return out.view(b, hkv, n, groups, chunk, -1), lse.view(b, hkv, n, groups, chunk)


def attend_slots(q: Tensor, slots: SlotReads, scales: ReadScales) -> tuple[Tensor, Tensor]:
    """The state part of a split read: q (B, Hq, Lq, d) against every slot (keys (B, Hkv, S, d),
    with their logit bias (B, Hkv, S) if any). -> output (B, Hq, Lq, dv) and its log-sum-exp
    (B, Hq, Lq) fp32."""
    q = times_head_temp(q, scales.state_temp)  # (q t) . k == q . (k t): scale the fewer rows
    b, hq, lq, _ = q.shape
    bias = slot_bias(slots, hq, scales)  # (B | 1, Hq, S) or None
    mask = None if bias is None else bias[:, :, None, :].to(q.dtype).expand(b, hq, lq, -1)
    return flash_cpu(q, slots.keys, slots.values, attn_mask=mask, scale=scales.scale)


def join(o_w: Tensor, lse_w: Tensor, o_s: Tensor, lse_s: Tensor, out: Tensor) -> None:
    """The joint softmax of a window read and a state read, into out: o_w, o_s, out (B, Hkv, g, C, dv)
    with their log-sum-exps lse_w, lse_s (B, Hkv, g, C)."""
    weight = torch.sigmoid(lse_s - lse_w).unsqueeze(-1).to(o_w.dtype)  # the state's share
    torch.lerp(o_w, o_s, weight, out=out)
