"""Gated DeltaNet: Mamba2-style gating on a delta-rule memory (the linear-RNN layer of Qwen3-Next).

Paper: Gated Delta Networks: Improving Mamba2 with Delta Rule, https://arxiv.org/abs/2412.06464.
The module mirrors ``fla.layers.GatedDeltaNet`` (fla 0.6): same parameter names and shapes, so an
fla state_dict loads with ``strict=True`` and gives the same outputs; same defaults. Per token::

    q, k, v = silu(short_conv(q_proj(x))), ...            (or silu(proj(x)) without short convs)
    q, k    = l2norm(q), l2norm(k)                         per head, x / sqrt(sum x^2 + 1e-6)
    beta    = sigmoid(b_proj(x))                           (x 2 with allow_neg_eigval)
    g       = -exp(A_log) * softplus(a_proj(x) + dt_bias)  per value head, log-space decay
    o       = gated_delta_rule(q, k, v, g, beta)           blocks.ops.delta_rule, scale head_dim^-1/2
    y       = o_proj(rmsnorm(o) * weight * act(g_proj(x)))  (plain RMSNorm without use_gate)

fla computes the gate, beta's sigmoid and the L2 norm inside its kernels; here they are explicit,
and the op receives the finished q, k, v, g, beta on either backend, so both run the same math.

State (:class:`GatedDeltaNetState`): the [B, HV, K, V] fp32 recurrent matrix (fla's layer caches it
V-first, [B, HV, V, K]; transpose when importing an fla cache), the three short-convolution tails
([B, D, conv_size], fla's layout) and ``seq_len``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.config import require, require_choice, require_positive
from blocks.conv import ShortConvolution
from blocks.documents import documents_in
from blocks.norm import GATE_ACTIVATIONS, GatedRMSNorm, RMSNorm
from blocks.ops.backend import BACKENDS
from blocks.ops.delta_rule import DEFAULT_CHUNK_SIZE, gated_delta_rule
from blocks.registry import register_mixer
from blocks.state import LayerState, StateError


@dataclasses.dataclass
class GatedDeltaNetState(LayerState):
    """Gated DeltaNet decoding state: recurrent matrix, short-conv tails (None without convs), tokens seen."""

    kind: ClassVar[str] = "recurrent"

    recurrent: Tensor  # [B, HV, K, V] fp32
    q_conv: Tensor | None = None  # [B, key_dim, conv_size] last inputs of q_conv1d
    k_conv: Tensor | None = None  # [B, key_dim, conv_size]
    v_conv: Tensor | None = None  # [B, value_dim, conv_size]
    seq_len: int = 0


@dataclasses.dataclass
class GatedDeltaNetConfig:
    """Options of :class:`GatedDeltaNet` (fla's names and defaults; fla sizes heads independently of d_model).

    head_dim: key (and query) width per head.
    num_heads: query/key heads.
    num_v_heads: value heads (``None``: num_heads); a multiple of num_heads (grouped value heads).
    expand_v: value head width = ``head_dim * expand_v`` (must be an integer).
    use_gate: gate the output norm with ``g_proj(x)`` (else a plain RMSNorm).
    use_short_conv: short causal convolutions on q, k, v (fla warns against turning them off).
    allow_neg_eigval: beta in (0, 2) instead of (0, 1), allowing negative transition eigenvalues.
    conv_size / conv_bias: width and bias of the short convolutions.
    norm_eps: eps of the output RMSNorm.
    output_gate_activation: ``swish`` / ``silu`` (same) or ``sigmoid``.
    chunk_size: tokens per chunk of the torch op.
    backend: ``auto`` (fla kernels on CUDA, torch ops elsewhere), ``torch`` or ``fla``.
    """

    head_dim: int = 256
    num_heads: int = 6
    num_v_heads: int | None = None
    expand_v: float = 2.0
    use_gate: bool = True
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    norm_eps: float = 1e-5
    output_gate_activation: str = "swish"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    backend: str = "auto"

    def __post_init__(self):
        require_positive("head_dim", self.head_dim)
        require_positive("num_heads", self.num_heads)
        if self.num_v_heads is not None:
            require_positive("num_v_heads", self.num_v_heads)
            require(self.num_v_heads % self.num_heads == 0, "num_v_heads",
                    f"must be a multiple of num_heads ({self.num_heads}), got {self.num_v_heads}")
        require(isinstance(self.expand_v, (int, float)) and self.expand_v > 0, "expand_v",
                f"must be a number > 0, got {self.expand_v!r}")
        head_v_dim = self.head_dim * self.expand_v
        require(math.isclose(head_v_dim, round(head_v_dim), rel_tol=1e-5), "expand_v",
                f"head_dim * expand_v must be an integer, got {self.head_dim} * {self.expand_v} = {head_v_dim}")
        require_positive("conv_size", self.conv_size)
        require(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, "norm_eps",
                f"must be a number > 0, got {self.norm_eps!r}")
        require_choice("output_gate_activation", self.output_gate_activation, GATE_ACTIVATIONS)
        require_positive("chunk_size", self.chunk_size)
        require_choice("backend", self.backend, BACKENDS)


@register_mixer("gated_deltanet", symbol="D", state=GatedDeltaNetState)
class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (fla.layers.GatedDeltaNet): gated delta-rule memory with short convs and a gated norm."""

    Config = GatedDeltaNetConfig

    def __init__(self, config: GatedDeltaNetConfig, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__()
        require_positive("d_model", d_model)
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_v_heads = config.num_v_heads or config.num_heads
        self.head_k_dim = config.head_dim
        self.head_v_dim = int(round(config.head_dim * config.expand_v))
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(d_model, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        if config.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, config.conv_size, bias=config.conv_bias, activation="silu")
            self.k_conv1d = ShortConvolution(self.key_dim, config.conv_size, bias=config.conv_bias, activation="silu")
            self.v_conv1d = ShortConvolution(self.value_dim, config.conv_size, bias=config.conv_bias, activation="silu")
        if config.use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps, activation=config.output_gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """fla's (Mamba2's) gate init: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1] stored as softplus^-1(dt)."""
        self.A_log.copy_(torch.empty(self.num_v_heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(self.num_v_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def empty_state(self, batch_size: int, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> GatedDeltaNetState:
        """The state before any token: zero matrix, zero convolution tails."""
        device = device or self.q_proj.weight.device
        recurrent = torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device)
        if not self.config.use_short_conv:
            return GatedDeltaNetState(recurrent=recurrent)
        dtype = dtype or self.q_proj.weight.dtype
        return GatedDeltaNetState(
            recurrent=recurrent,
            q_conv=self.q_conv1d.initial_cache(batch_size, dtype=dtype).to(device),
            k_conv=self.k_conv1d.initial_cache(batch_size, dtype=dtype).to(device),
            v_conv=self.v_conv1d.initial_cache(batch_size, dtype=dtype).to(device),
        )

    def _check_state(self, state: GatedDeltaNetState, batch: int) -> None:
        if not isinstance(state, GatedDeltaNetState):
            raise StateError(f"Gated DeltaNet layer {self.layer_idx} got a {type(state).__name__}, "
                             "expected GatedDeltaNetState")
        want = {"recurrent": (batch, self.num_v_heads, self.head_k_dim, self.head_v_dim)}
        if self.config.use_short_conv:
            width = self.config.conv_size
            want.update(q_conv=(batch, self.key_dim, width), k_conv=(batch, self.key_dim, width),
                        v_conv=(batch, self.value_dim, width))
        for name, shape in want.items():
            value = getattr(state, name)
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise StateError(f"GatedDeltaNetState.{name} is {got}, this layer needs shape {shape}")

    def forward(self, x: Tensor, state: GatedDeltaNetState | None = None,
                ctx: dict | None = None) -> tuple[Tensor, GatedDeltaNetState | None]:
        """``x`` [B, T, d_model] -> ``(y [B, T, d_model], state)``; ``ctx`` is read only for
        ``ctx["documents"]`` (packed documents, each from an empty history; the state returned is then None)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"Gated DeltaNet expects x of shape [B, T>0, {self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        documents = documents_in(ctx, x, state, f"Gated DeltaNet layer {self.layer_idx}")
        if state is None:
            state = self.empty_state(B, x.device, x.dtype)
        self._check_state(state, B)

        tails = {}
        if self.config.use_short_conv:
            cache = (None, None, None) if documents is not None else (state.q_conv, state.k_conv, state.v_conv)
            q, tails["q_conv"] = self.q_conv1d(self.q_proj(x), cache[0], documents)  # [B, T, key_dim]
            k, tails["k_conv"] = self.k_conv1d(self.k_proj(x), cache[1], documents)  # [B, T, key_dim]
            v, tails["v_conv"] = self.v_conv1d(self.v_proj(x), cache[2], documents)  # [B, T, value_dim]
        else:
            q, k, v = F.silu(self.q_proj(x)), F.silu(self.k_proj(x)), F.silu(self.v_proj(x))
        q, k = (_l2norm(t.unflatten(-1, (self.num_heads, self.head_k_dim))) for t in (q, k))  # [B, T, H, K]
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))  # [B, T, HV, V]

        beta = self.b_proj(x).float().sigmoid()  # [B, T, HV]
        if self.config.allow_neg_eigval:
            beta = beta * 2
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())  # [B, T, HV]

        if documents is not None:  # the rows as one sequence of documents (fla's varlen layout)
            o, _ = gated_delta_rule(*(documents.flat(t) for t in (q, k, v, g, beta)), scale=self.head_k_dim**-0.5,
                                    chunk_size=self.config.chunk_size, backend=self.config.backend,
                                    cu_seqlens=documents.cu_seqlens)
            o = documents.unflat(o)  # [B, T, HV, V]
        else:
            o, recurrent = gated_delta_rule(
                q, k, v, g, beta, scale=self.head_k_dim**-0.5, initial_state=state.recurrent, output_final_state=True,
                chunk_size=self.config.chunk_size, backend=self.config.backend,
            )  # o [B, T, HV, V]

        if self.config.use_gate:
            o = self.o_norm(o, self.g_proj(x).unflatten(-1, (self.num_v_heads, self.head_v_dim)))
        else:
            o = self.o_norm(o)
        y = self.o_proj(o.flatten(-2))  # [B, T, d_model]
        if documents is not None:
            return y, None
        return y, GatedDeltaNetState(recurrent=recurrent, seq_len=state.seq_len + T, **tails)


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim in fp32 (fla's in-kernel q/k norm), back in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)
