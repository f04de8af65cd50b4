"""Query/key/value projections shared by every softmax-style mixer (KVM and the attention baselines).

``ProjectedAttention`` owns what turns the block input into rotated per-head ``q, k, v`` and what
turns the per-head output back into the residual stream, so the mixers only differ in how they
attend. Everything the two families need is an option here:

* the Llama family (conversion teachers): biases on q/k/v (Qwen2), per-head q/k RMSNorm (Qwen3),
  grouped-query attention, full "llama"-style RoPE;
* the KVM paper's backbone (docs/kvm.md §2): per-head q/k LayerNorm, partial "kvm_paper" RoPE, token
  shift on the projected q/k/v (the first token's previous value is itself), and the RWKV-style
  value residual ``v <- v + (v_first - v) * sigmoid(v_residual_bias + up(down(x)))`` where
  ``v_first`` is the raw value projection of the first value-residual layer of its group in this
  forward, passed between layers through the per-forward ``ctx`` dict. (The model computes it as the
  published backbone does: that first layer's ``v_proj`` on the embedding stream; see hybrid/model/model.py.)
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from blocks.config import check_heads, require, require_choice
from blocks.documents import CONTEXT_KEY, Documents
from blocks.rope import ROPE_STYLES, RotaryEmbedding

QK_NORMS = ("none", "layernorm", "rmsnorm")


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """Options of the q/k/v/o projections (shared by KVM and the attention baselines)."""

    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as many as num_heads; fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // num_heads
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # per-head norm of q and k before RoPE
    norm_eps: float = 1e-5
    rope_partial_dim: int | None = None  # rotated dims per head; None: all of them; 0: no RoPE
    rope_theta: float = 10000.0
    rope_style: str = "llama"
    rope_round_bf16: bool = False  # reproduce the published KVM code's bf16 cos/sin
    token_shift: bool = False
    value_residual: bool = False
    value_residual_rank: int = 32
    value_residual_group: str = "attn_v_first"  # ctx key: layers sharing a group mix towards one v_first
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)

    def __post_init__(self):
        require_choice("qk_norm", self.qk_norm, QK_NORMS)
        require_choice("rope_style", self.rope_style, ROPE_STYLES)
        require(self.rope_partial_dim is None or (self.rope_partial_dim >= 0 and self.rope_partial_dim % 2 == 0),
                "rope_partial_dim", f"must be an even number >= 0 (0: no RoPE), got {self.rope_partial_dim}")
        require(self.value_residual_rank > 0, "value_residual_rank", f"must be > 0, got {self.value_residual_rank}")
        require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")


def _make_norm(kind: str, dim: int, eps: float) -> nn.Module | None:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return None


class ProjectedAttention(nn.Module):
    """Base of the softmax-style mixers: ``project`` gives rotated per-head q/k/v, ``o_proj`` maps back."""

    def __init__(self, config: ProjectionConfig, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__()
        self.config, self.d_model, self.layer_idx = config, d_model, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = check_heads(
            d_model, config.num_heads, config.num_kv_heads, config.head_dim)
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        rope_dim = d if config.rope_partial_dim is None else config.rope_partial_dim
        require(rope_dim <= d, "rope_partial_dim", f"must be <= head_dim ({d}), got {rope_dim}")
        require(rope_dim % 2 == 0, "rope_partial_dim", f"RoPE rotates pairs of dims, and it is null: all {d} dims of "
                                                       "an odd head_dim; set it to an even number (0: no RoPE)")
        self.rope_dim = rope_dim
        self.scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(d)

        self.q_proj = nn.Linear(d_model, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d_model, hkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d_model, hkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * d, d_model, bias=config.o_bias)
        self.q_norm = _make_norm(config.qk_norm, d, config.norm_eps)
        self.k_norm = _make_norm(config.qk_norm, d, config.norm_eps)
        self.rotary = (RotaryEmbedding(d, rope_dim, config.rope_theta, config.rope_style, config.rope_round_bf16)
                       if rope_dim > 0 else None)
        if config.token_shift:
            # Mix towards the previous token, decaying with channel index; deeper layers shift less.
            depth = 1.0 - layer_idx / max(n_layers or layer_idx + 1, 1)
            self.shift_q = nn.Parameter(1 - (torch.arange(h * d) / (h * d)) ** (0.2 * depth))
            self.shift_k = nn.Parameter(1 - (torch.arange(hkv * d) / (hkv * d)) ** (0.7 * depth))
            self.shift_v = nn.Parameter(1 - (torch.arange(hkv * d) / (hkv * d)) ** (0.7 * depth))
        if config.value_residual:
            width = hkv * d
            self.v_residual_bias = nn.Parameter(0.73 - 0.4 * torch.linspace(-0.5, 0.5, width))
            self.v_residual_down = nn.Linear(d_model, config.value_residual_rank, bias=False)
            self.v_residual_up = nn.Linear(config.value_residual_rank, width, bias=False)
            nn.init.zeros_(self.v_residual_down.weight)
            nn.init.orthogonal_(self.v_residual_up.weight, gain=0.1)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects x of shape (batch, time, {self.d_model}), "
                             f"got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{type(self).__name__} got an empty sequence (time = 0)")

    @staticmethod
    def shift_tails(state) -> tuple[Tensor, Tensor, Tensor] | None:
        """The token-shift tails (last projected q, k, v) a state carries, or None."""
        return None if state is None or state.prev_q is None else (state.prev_q, state.prev_k, state.prev_v)

    @staticmethod
    def store_shift_tails(state, tails: tuple[Tensor, Tensor, Tensor] | None) -> None:
        if tails is not None:
            state.prev_q, state.prev_k, state.prev_v = tails

    def _shift(self, proj: Tensor, prev: Tensor | None, mix: Tensor, documents: Documents | None) -> Tensor:
        """proj: (B, T, F); prev: (B, F) last projection of the previous call, or None (first token: itself);
        the first token of each of the ``documents`` is a first token too."""
        before = torch.cat([proj[:, :1] if prev is None else prev[:, None].to(proj.dtype), proj[:, :-1]], dim=1)
        if documents is not None:
            before = documents.restart(before, proj)
        return proj + mix * (before - proj)

    def project(self, x: Tensor, start: int, tails: tuple[Tensor, Tensor, Tensor] | None, ctx: dict | None
                ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """x: (B, T, d_model) at positions [start, start+T) ->
        q (B, H, T, d), k (B, Hkv, T, d), v (B, Hkv, T, d) rotated, and the new token-shift tails.
        With ``ctx["documents"]`` (packed documents, start 0) positions and token shift restart at
        each document's first token."""
        b, t, _ = x.shape
        documents = None if ctx is None else ctx.get(CONTEXT_KEY)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*d), (B, T, Hkv*d) x2
        if self.config.value_residual:
            if ctx is None:
                raise ValueError("value_residual needs the per-forward ctx dict (pass ctx={} from the model)")
            key = self.config.value_residual_group
            if key in ctx:
                mix = torch.sigmoid(self.v_residual_bias + self.v_residual_up(self.v_residual_down(x)))
                v = v + (ctx[key] - v) * mix
            else:
                ctx[key] = v
        new_tails = None
        if self.config.token_shift:
            prev_q, prev_k, prev_v = tails if tails is not None else (None, None, None)
            new_tails = (q[:, -1], k[:, -1], v[:, -1])
            q = self._shift(q, prev_q, self.shift_q, documents)
            k = self._shift(k, prev_k, self.shift_k, documents)
            v = self._shift(v, prev_v, self.shift_v, documents)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if self.rotary is not None:
            angles = (self.rotary.angles(start, t, x.device) if documents is None
                      else self.rotary.angles_at(documents.positions[:, None]))  # (T, R/2) or (B, 1, T, R/2)
            if torch.is_grad_enabled():
                q, k = self.rotary(q, start, angles), self.rotary(k, start, angles)
            else:  # q and k are this call's own tensors here: rotate them in place
                q, k = self.rotary.rotate_(q, angles), self.rotary.rotate_(k, angles)
        return q, k, v, new_tails

    def output(self, o: Tensor) -> Tensor:
        """o: (B, H, T, d) -> (B, T, d_model)."""
        return self.o_proj(o.transpose(1, 2).flatten(2))
