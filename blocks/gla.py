"""Gated Linear Attention (GLA) mixer, state-compatible with fla's ``GatedLinearAttention``.

Paper: "Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et al., 2023,
https://arxiv.org/abs/2312.06635). Per head, a [K, V] state decays per key dimension by a
data-dependent gate and accumulates ``k vᵀ``; the output reads it with ``q``:

    gk_t = logsigmoid(gk_proj(x_t)) / gate_logit_normalizer           (log decay, <= 0)
    S_t  = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t / sqrt(K)
    y_t  = o_proj(rmsnorm(o_t) * swish(g_proj(x_t)))

Parameter names, shapes and defaults are those of ``fla.layers.GatedLinearAttention`` (fla 0.6), so
its state_dict loads with ``strict=True`` and gives the same outputs. The recurrence runs through
``blocks.ops.gla.gla``: fla's Triton kernels on CUDA, the chunked torch op elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.config import ConfigError, require, require_choice, require_positive
from blocks.conv import ShortConvolution
from blocks.documents import documents_in
from blocks.norm import GatedRMSNorm, RMSNorm
from blocks.ops.backend import BACKENDS
from blocks.ops.gla import gla
from blocks.registry import register_mixer
from blocks.state import LayerState, StateError

ACTIVATIONS = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
    "gelu": partial(F.gelu, approximate="tanh"),
}
"""The activations fla's ``ACT2FN`` offers for ``feature_map`` and ``gate_fn`` (fla's gelu is the tanh form)."""


@dataclasses.dataclass
class GLAConfig:
    """Options of the GLA mixer (fla's ``GatedLinearAttention`` arguments and defaults).

    ``hidden_size`` is the model width given to the mixer; ``mode`` is replaced by ``backend``
    (``auto``: fla's kernels on CUDA, torch ops elsewhere; ``torch``; ``fla``).
    """

    expand_k: float = 0.5
    expand_v: float = 1.0
    num_heads: int = 4
    num_kv_heads: int | None = None
    feature_map: str | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    use_output_gate: bool = True
    gate_fn: str = "swish"
    elementwise_affine: bool = True
    norm_eps: float = 1e-5
    gate_logit_normalizer: float = 16
    gate_low_rank_dim: int = 16
    clamp_min: float | None = None
    fuse_norm: bool = True
    backend: str = "auto"

    def __post_init__(self):
        require(isinstance(self.expand_k, int | float) and self.expand_k > 0, "expand_k", f"must be > 0, got {self.expand_k!r}")
        require(isinstance(self.expand_v, int | float) and self.expand_v > 0, "expand_v", f"must be > 0, got {self.expand_v!r}")
        require_positive("num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            require_positive("num_kv_heads", self.num_kv_heads)
            require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                    f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        if self.feature_map is not None:
            require_choice("feature_map", self.feature_map, tuple(ACTIVATIONS))
        require_choice("gate_fn", self.gate_fn, tuple(ACTIVATIONS))
        require_positive("conv_size", self.conv_size)
        require_positive("gate_low_rank_dim", self.gate_low_rank_dim)
        require(isinstance(self.norm_eps, int | float) and self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps!r}")
        require(isinstance(self.gate_logit_normalizer, int | float) and self.gate_logit_normalizer > 0,
                "gate_logit_normalizer", f"must be > 0, got {self.gate_logit_normalizer!r}")
        require(self.clamp_min is None or (isinstance(self.clamp_min, int | float) and self.clamp_min <= 0), "clamp_min",
                f"must be None or <= 0 (gates are log decays, never positive), got {self.clamp_min!r}")
        require_choice("backend", self.backend, BACKENDS)


@dataclasses.dataclass
class GLAState(LayerState):
    """GLA decoding state: the recurrent matrices and, with short convolutions, their input tails."""

    kind: ClassVar[str] = "recurrent"
    recurrent: Tensor                 # [B, H, K, V] fp32
    conv_q: Tensor | None = None      # [B, key_dim, conv_size], last inputs of q_conv1d
    conv_k: Tensor | None = None      # [B, key_dim / groups, conv_size]
    conv_v: Tensor | None = None      # [B, value_dim / groups, conv_size]
    seq_len: int = 0


@register_mixer("gla", symbol="G", state=GLAState)
class GatedLinearAttention(nn.Module):
    """Gated Linear Attention: a linear RNN with per-key data-dependent decay (fla-compatible)."""

    Config = GLAConfig

    def __init__(self, config: GLAConfig, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx
        key_dim, value_dim = d_model * config.expand_k, d_model * config.expand_v
        self.key_dim, self.value_dim = round(key_dim), round(value_dim)
        if not math.isclose(key_dim, self.key_dim):
            raise ConfigError("expand_k", f"d_model * expand_k must be an integer, got {d_model} * {config.expand_k}")
        if not math.isclose(value_dim, self.value_dim):
            raise ConfigError("expand_v", f"d_model * expand_v must be an integer, got {d_model} * {config.expand_v}")
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % self.num_heads:
                raise ConfigError("num_heads", f"must divide the {name} dim ({dim}), got {self.num_heads}")
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads
        key_dim_per_group = self.key_dim // self.num_kv_groups
        value_dim_per_group = self.value_dim // self.num_kv_groups
        self.feature_map_fn = ACTIVATIONS[config.feature_map] if config.feature_map else None

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim_per_group, bias=False)
        if config.use_output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        if config.use_short_conv:
            conv = partial(ShortConvolution, kernel_size=config.conv_size, bias=config.conv_bias, activation="silu")
            self.q_conv1d = conv(self.key_dim)
            self.k_conv1d = conv(key_dim_per_group)
            self.v_conv1d = conv(value_dim_per_group)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, config.gate_low_rank_dim, bias=False),
                                     nn.Linear(config.gate_low_rank_dim, key_dim_per_group, bias=True))
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.fuse_norm_and_gate = config.gate_fn == "swish" and config.fuse_norm and config.use_output_gate
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps,
                                                  elementwise_affine=config.elementwise_affine, activation="swish")
        else:
            self.g_norm = RMSNorm(self.head_v_dim, elementwise_affine=config.elementwise_affine, eps=config.norm_eps)
            self.gate_fn = ACTIVATIONS[config.gate_fn]

    def _check(self, x: Tensor, state: GLAState | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"GLA layer {self.layer_idx}: x must be [batch, time >= 1, {self.d_model}], got {tuple(x.shape)}")
        if state is None:
            return
        if not isinstance(state, GLAState):
            raise StateError(f"GLA layer {self.layer_idx} got a {type(state).__name__}; it continues only a GLAState")
        expected = (x.shape[0], self.num_heads, self.head_k_dim, self.head_v_dim)
        if tuple(state.recurrent.shape) != expected:
            raise StateError(f"GLA layer {self.layer_idx}: state.recurrent has shape {tuple(state.recurrent.shape)}, "
                             f"expected {expected} [B, H, K, V] (state of another layer or batch?)")
        if self.config.use_short_conv != (state.conv_q is not None):
            has = "uses short convolutions but the state has no" if self.config.use_short_conv else \
                "has no short convolutions but the state has"
            raise StateError(f"GLA layer {self.layer_idx} {has} convolution tails (state of another layer?)")

    def forward(self, x: Tensor, state: GLAState | None = None,
                ctx: dict | None = None) -> tuple[Tensor, GLAState | None]:
        """``x`` [B, T, d_model] continuing ``state`` (``None``: empty history) -> (y [B, T, d_model], state).
        GLA reads only ``ctx["documents"]`` (packed documents, each from an empty history; the state
        returned is then None)."""
        self._check(x, state)
        documents = documents_in(ctx, x, state, f"GLA layer {self.layer_idx}")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, key_dim], [B, T, key_dim/G], [B, T, value_dim/G]
        conv_q = conv_k = conv_v = None
        if self.config.use_short_conv:
            q, conv_q = self.q_conv1d(q, state.conv_q if state is not None else None, documents)
            k, conv_k = self.k_conv1d(k, state.conv_k if state is not None else None, documents)
            v, conv_v = self.v_conv1d(v, state.conv_v if state is not None else None, documents)
        gk = self.gk_proj(x)                                        # [B, T, key_dim/G]

        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))     # [B, T, H, K]
        k, gk = (t.unflatten(-1, (self.num_kv_heads, self.head_k_dim)) for t in (k, gk))  # [B, T, H/G, K]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_v_dim))  # [B, T, H/G, V]
        if self.num_kv_groups > 1:                                  # each kv head serves G consecutive heads
            k, gk, v = (t.repeat_interleave(self.num_kv_groups, dim=2) for t in (k, gk, v))
        gk = F.logsigmoid(gk) / self.config.gate_logit_normalizer
        if self.config.clamp_min is not None:
            gk = gk.clamp_min(self.config.clamp_min)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)

        if documents is not None:  # the rows as one sequence of documents (fla's varlen layout)
            o, _ = gla(*(documents.flat(t) for t in (q, k, v, gk)), scale=self.head_k_dim ** -0.5,
                       backend=self.config.backend, cu_seqlens=documents.cu_seqlens)
            o = documents.unflat(o)                                  # [B, T, H, V]
        else:
            o, recurrent = gla(q, k, v, gk, scale=self.head_k_dim ** -0.5,
                               initial_state=state.recurrent if state is not None else None,
                               output_final_state=True, backend=self.config.backend)  # [B, T, H, V], [B, H, K, V]

        if self.fuse_norm_and_gate:
            g = self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim))  # [B, T, H, V]
            o = self.g_norm_swish_gate(o, g).flatten(-2)
        elif self.config.use_output_gate:
            o = self.g_norm(o).flatten(-2) * self.gate_fn(self.g_proj(x))
        else:
            o = self.g_norm(o).flatten(-2)                          # [B, T, value_dim]
        if documents is not None:
            return self.o_proj(o), None
        seq_len = (state.seq_len if state is not None else 0) + x.shape[1]
        return self.o_proj(o), GLAState(recurrent, conv_q, conv_k, conv_v, seq_len)
