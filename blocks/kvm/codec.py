"""How tokens become slots and slots become attention keys and values (``SlotCodec``).

A token entering the state is *prepared*: its rotated dims zeroed, then the state-key norm (which
re-fills them). Slots hold *sums* of prepared (gated) keys and values; a read re-normalises them just
in time: keys through the state-key norm, values as their direction times the norm of the value that
created the slot ("vlens"), or divided by a count. Routing compares prepared keys with read slot keys
in fp32, over fewer dims where the norm is a LayerNorm (``SlotCodec.fewer_routing_dims``).

The mean read (``state_read: mean``, docs/kvm.md §7) has no state-key norm: prepared keys are the
keys as they are, lens are the slots' weights (the sum of their tokens' merge gates, or their count
without gating), a slot is read as the weighted mean of its tokens (sums divided by the weight) with
log(weight) added to its logits, so that a slot of n equal tokens of gate 1 weighs what those n
tokens would, and routing compares directions (cosine similarity).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.kvm.config import KVMConfig

NO_NORM = nn.Identity()  # the mean read's state-key "norm": keys as they are
MIN_WEIGHT = 1e-6  # the least weight the mean read divides by (gates may underflow to zero)


class Slots(NamedTuple):
    """A state's slots: per kv head, sums of what entered them."""

    keys: Tensor  # (B, Hkv, S, d): sums of prepared (gated) keys
    values: Tensor  # (B, Hkv, S, dv): sums of (gated) values
    lens: Tensor  # (B, Hkv, S, 1) fp32: creating-value norm (vlens), count of absorbed tokens, or their weight (mean)


class SlotReads(NamedTuple):
    """Slots as attention reads them."""

    keys: Tensor  # (..., S, d)
    values: Tensor  # (..., S, dv)
    bias: Tensor | None  # (..., S) fp32 added to the slots' logits (the mean read's log weight), or None


class Incoming(NamedTuple):
    """A chunk of tokens leaving the window, prepared for the state (rows: tokens)."""

    keys: Tensor  # (B, Hkv, C, d): prepared keys (zeroed dims, state-key norm), ungated
    values: Tensor  # (B, Hkv, C, dv)
    gated: Tensor  # (B, Hkv, C, d + dv): what a merge adds, the (gated) key and value side by side
    routing: Tensor  # (B, Hkv, C, r) fp32: the keys as routing scores read them (``SlotCodec.token_features``)
    weights: Tensor | None = None  # (B, Hkv, C, 1) fp32: what each adds to its slot's lens (None: one each)


class SlotCodec:
    """The slot formulas of one layer: its config, state-key norm (none for the mean read) and zeroed key dims."""

    def __init__(self, config: KVMConfig, state_key_norm: nn.Module, zero_dims: int):
        self.config, self.zero_dims = config, zero_dims
        self.norm = NO_NORM if config.reads_mean else state_key_norm

    def prepare_keys(self, k: Tensor) -> Tensor:
        """Keys entering the state: zero the rotated dims, then the state-key norm (which re-fills them)."""
        if self.zero_dims:
            k = torch.cat([torch.zeros_like(k[..., : self.zero_dims]), k[..., self.zero_dims :]], dim=-1)
        return self.norm(k)

    @functools.cached_property
    def fewer_routing_dims(self) -> tuple[Tensor, Tensor] | None:
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
        k_u, wb, z = k_u.detach().float(), self.fewer_routing_dims, self.zero_dims
        if self.config.reads_mean:
            return F.normalize(k_u, dim=-1)
        if wb is None:
            return k_u
        w, b = wb
        a = (k_u[..., :z] - b) @ (w / (w @ w).clamp_min(torch.finfo(w.dtype).tiny))  # (..., C): w = 0 gives a = 0
        return torch.cat([k_u[..., z:], a[..., None], torch.ones_like(a)[..., None]], -1)  # (..., C, d - z + 2)

    @torch.no_grad()
    def slot_features(self, normed: Tensor) -> Tensor:
        """Normed slot keys (..., S, d) -> fp32 (..., S, r), the other side of ``token_features``."""
        normed, wb, z = normed.detach().float(), self.fewer_routing_dims, self.zero_dims
        if self.config.reads_mean:
            return F.normalize(normed, dim=-1)
        if wb is None:
            return normed
        return torch.cat([normed[..., z:], normed[..., :z] @ torch.stack(wb, -1)], -1)  # (..., S, d - z + 2)

    def gated(self, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values times their merge gate g (B, Hkv, L, 1), each where the config gates it."""
        return (k * g if self.config.merge_gate_keys else k), (v * g if self.config.merge_gate_values else v)

    def lens_of(self, v: Tensor) -> Tensor:
        """The lens of new slots with values v (..., dv): their norm (vlens) or a count of one, fp32."""
        if self.config.use_vlens:
            return v.float().norm(dim=-1, keepdim=True)
        return torch.ones(*v.shape[:-1], 1, dtype=torch.float32, device=v.device)

    def token_weights(self, g: Tensor) -> Tensor | None:
        """What tokens of gate g (..., 1) add to their slots' lens: the gate itself for the mean read
        of gated tokens, else None (one each, or nothing with vlens)."""
        return g.float() if self.config.reads_mean and self.config.merge_gate_values else None

    def new_slots(self, k: Tensor, v: Tensor, g: Tensor) -> Slots:
        """Slots for tokens copied straight in (the first chunk)."""
        if self.config.merge_gate_initial_state:
            k_in, v_in = self.gated(self.prepare_keys(k), v, g)
            weights = self.token_weights(g)
        else:
            k_in, v_in, weights = self.prepare_keys(k), v, None
        return Slots(k_in, v_in, self.lens_of(v_in) if weights is None else weights)

    def incoming(self, k: Tensor, v: Tensor, g: Tensor) -> Incoming:
        """A raw chunk leaving the window (k, v: (B, Hkv, C, d | dv); g: (B, Hkv, C, 1)), prepared."""
        k_u = self.prepare_keys(k)
        return Incoming(k_u, v, torch.cat(self.gated(k_u, v, g), -1), self.token_features(k_u), self.token_weights(g))

    def read(self, keys: Tensor, values: Tensor, lens: Tensor, dtype: torch.dtype) -> SlotReads:
        """The read formula, row by row: (..., d) key sums, (..., dv) value sums, (..., 1) lens ->
        attention keys (the next update routes against them too), values in ``dtype`` and the logit
        bias. Normed: keys through the state-key norm, no bias; mean: the sums over the slot's weight
        (at least ``MIN_WEIGHT``), bias log(weight)."""
        if self.config.reads_mean:
            weight = lens.clamp_min(MIN_WEIGHT)
            return SlotReads((keys.float() / weight).to(dtype), (values.float() / weight).to(dtype),
                             weight.log().squeeze(-1))
        if self.config.use_vlens:  # direction times length: F.normalize(values) * lens in one pass over the values
            values = values.float() * (lens / values.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
        else:
            values = values.float() / lens
        if self.config.bf16_state_values:
            values = values.bfloat16()
        return SlotReads(self.norm(keys), values.to(dtype), None)
