"""The exact reads of KVM attention, shared by every way of running a call: plain causal attention
before position W, and a chunk's queries in one softmax over [state ; window] ("a tile")."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.kvm.codec import SlotReads
from blocks.kvm.config import KVMConfig
from blocks.kvm.schedule import CallSchedule, ChunkStep
from blocks.kvm.tokens import RawTokens

SMALL_TILE = 16  # tiles of at most this many queries are read by ``attend_small_tile``


class ReadScales(NamedTuple):
    """What multiplies the logits: the softmax scale and the per-query-head temperatures (Hq,) or
    None; and what is added to them: the per-query-head offset (Hq,) or None of the slots from
    ``sinks`` on."""

    scale: float
    window_temp: Tensor | None
    state_temp: Tensor | None
    state_offset: Tensor | None = None
    sinks: int = 0


def read_plain(q: Tensor, out: Tensor, schedule: CallSchedule, raw: RawTokens, scales: ReadScales) -> None:
    """The queries before position W, plain causal attention over every token before them, into
    their rows of ``out`` (B, Hq, T, dv). q (B, Hq, T, d): the call's queries."""
    plain = schedule.plain
    keys, values = raw.keys_values(0, plain.stop)  # the call holds raw tokens from 0 on here
    groups = q.shape[1] // keys.shape[1]
    # (queries, keys): the query at position p sees every key j <= p
    allowed = (torch.arange(plain.stop, device=q.device)[None, :]
               <= torch.arange(plain.start, plain.stop, device=q.device)[:, None])
    out[:, :, schedule.rows(plain)] = F.scaled_dot_product_attention(
        q[:, :, schedule.rows(plain)], per_query_head(keys, groups, scales.window_temp), repeat_heads(values, groups),
        attn_mask=allowed, scale=scales.scale)


class TileMasks:
    """The window masks of a call's tiles, on ``device``: the query at chunk offset i sees the window
    keys j <= (Nb - 1)*C + i. Every whole chunk has the same (C, W) mask, built at the first one and
    kept for the rest of the call; a partial chunk (at most two per call) gets its own rows."""

    def __init__(self, config: KVMConfig, device: torch.device):
        self.config, self.device = config, device
        self.whole: Tensor | None = None

    def of(self, step: ChunkStep) -> Tensor:
        """The mask (queries, window keys) of ``step``'s tile, True where a query may see a key."""
        if step.whole:
            if self.whole is None:
                self.whole = self.rows(0, self.config.chunk_len)
            return self.whole
        first = step.chunk * self.config.chunk_len
        return self.rows(step.queries.start - first, step.queries.stop - first)

    def rows(self, lo: int, hi: int) -> Tensor:
        """The mask of chunk offsets [lo, hi) over the (Nb - 1)*C + hi window keys they read."""
        before = (self.config.n_bswa_chunks - 1) * self.config.chunk_len
        return (torch.arange(before + hi, device=self.device)[None, :]
                <= before + torch.arange(lo, hi, device=self.device)[:, None])


def read_tile(q: Tensor, out: Tensor, schedule: CallSchedule, step: ChunkStep, raw: RawTokens, slots: SlotReads,
              scales: ReadScales, masks: TileMasks) -> None:
    """A chunk's queries read exactly, into their rows of ``out``: against the slots as ``slots``
    reads them and the raw keys of their window, masked by ``masks.of(step)``."""
    keys, values = raw.keys_values(step.window, step.queries.stop)  # (B, Hkv, L, d | dv)
    rows = schedule.rows(step.queries)
    out[:, :, rows] = attend_tile(q[:, :, rows], slots, keys, values, masks.of(step), scales)


def attend_tile(q: Tensor, slots: SlotReads, keys: Tensor, values: Tensor, mask: Tensor, scales: ReadScales) -> Tensor:
    """The exact read of one tile: one softmax per query over [state ; window] keys.

    q (B, Hq, Lq, d); slots: keys/values (B, Hkv, S, d | dv) as the slots are read and their logit
    bias (B, Hkv, S) or None; keys/values (B, Hkv, L, d) the raw window; mask (Lq, L) True where a
    query may see a window key. -> (B, Hq, Lq, dv)"""
    if q.shape[2] <= SMALL_TILE:
        return attend_small_tile(q, slots, keys, values, mask, scales)
    groups = q.shape[1] // keys.shape[1]
    slot_keys, slot_values, _ = slots
    bias = slot_bias(slots, q.shape[1], scales)
    keys = torch.cat([per_query_head(slot_keys, groups, scales.state_temp),
                      per_query_head(keys, groups, scales.window_temp)], 2)  # (B, Hq, S + L, d)
    values = repeat_heads(torch.cat([slot_values, values], 2), groups)
    if bias is None:
        mask = torch.cat([mask.new_ones(mask.shape[0], slot_keys.shape[2]), mask], 1)  # (Lq, S + L)
    else:  # additive: the slots' bias, then 0 / -inf over the window
        window = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -torch.inf)  # (Lq, L)
        b, _, lq, _ = q.shape
        mask = torch.cat([bias[:, :, None, :].to(q.dtype).expand(b, -1, lq, -1),
                          window.expand(b, q.shape[1], -1, -1)], -1)  # (B, Hq, Lq, S + L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scales.scale)


def attend_small_tile(q: Tensor, slots: SlotReads, keys: Tensor, values: Tensor, mask: Tensor,
                      scales: ReadScales) -> Tensor:
    """``attend_tile`` for a few queries (decode): the temperatures scale the queries, not the S + L
    keys, and the state and the window are read by products of their own, so no key or value is
    copied; the logits (a few rows) are joined for one softmax in fp32."""
    b, hq, lq, _ = q.shape
    slot_keys, slot_values, _ = slots
    hkv, num = keys.shape[1], slot_keys.shape[2]
    groups = hq // hkv

    def logits(temp: Tensor | None, k: Tensor) -> Tensor:  # (B, Hkv, g*Lq, n): a kv head's g query heads as rows
        rows = times_head_temp(q, temp).reshape(b, hkv, groups * lq, -1)
        return (rows @ k.transpose(-1, -2)).float() * scales.scale

    window_logits = logits(scales.window_temp, keys).masked_fill(~mask.repeat(groups, 1), -torch.inf)
    state_logits = logits(scales.state_temp, slot_keys)
    bias = slot_bias(slots, hq, scales)  # (B | 1, Hq, S): a row's bias is its query head's
    if bias is not None:
        state_logits = (state_logits.view(b, hkv, groups, lq, num)
                        + bias.view(-1, hkv, groups, 1, num)).view(b, hkv, groups * lq, num)
    weights = torch.cat([state_logits, window_logits], -1).softmax(-1).to(values.dtype)
    out = weights[..., :num] @ slot_values + weights[..., num:] @ values  # (B, Hkv, g*Lq, dv)
    return out.view(b, hq, lq, -1)


def slot_bias(slots: SlotReads, hq: int, scales: ReadScales) -> Tensor | None:
    """What is added to the slots' logits, per query head: (B | 1, Hq, S) fp32, the read's bias (B,
    Hkv, S) repeated over each kv head's query heads plus the learned offset of the slots from
    ``scales.sinks`` on; None when there is neither."""
    bias = None if slots.bias is None else repeat_heads(slots.bias, hq // slots.keys.shape[1])  # (B, Hq, S)
    offset = scales.state_offset
    if offset is None:
        return bias
    past_sinks = torch.arange(slots.keys.shape[2], device=offset.device) >= scales.sinks  # (S,)
    shift = torch.where(past_sinks, offset.float()[:, None], 0.0)[None]  # (1, Hq, S): 0 for the sinks, even at -inf
    return shift if bias is None else bias + shift


def per_query_head(keys: Tensor, groups: int, temp: Tensor | None) -> Tensor:
    """(B, Hkv, L, d) keys -> (B, Hq, L, d), times the per-query-head temperature if any."""
    return times_head_temp(repeat_heads(keys, groups), temp)


def times_head_temp(x: Tensor, temp: Tensor | None) -> Tensor:
    """(B, H, L, d) times a per-head temperature (H,); x itself when there is none."""
    return x if temp is None else x * temp.to(x.dtype).view(1, -1, 1, 1)


def repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, ...) -> (B, Hkv * groups, ...): each kv head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
