"""Mamba2 mixer, state-compatible with fla's ``Mamba2`` layer, its SSD run as simple GLA.

Paper: "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality" (Dao & Gu, 2024, https://arxiv.org/abs/2405.21060). One input projection gives a
gate ``z``, the SSM input ``x``, the input/output maps ``B``, ``C`` (shared by the heads of a
group) and a step size ``dt`` per head; ``x, B, C`` pass a short causal convolution + SiLU; then per
head, with ``A = -exp(A_log)`` and ``dt = softplus(dt + dt_bias)``::

    h_t = exp(A·dt_t) h_{t-1} + B_t (x_t·dt_t)ᵀ      y_t = h_tᵀ C_t + D·x_t
    out = out_proj(rmsnorm_groups(y * silu(z)))

The SSD recurrence is exactly simple GLA (one log-gate per head) with q=C, k=B, v=x·dt, g=A·dt,
scale=1, so it runs through ``blocks.ops.gla.gla`` (fla's ``chunk_simple_gla`` on CUDA, the torch
chunked op elsewhere); no ``mamba_ssm`` needed. Parameter names, shapes, defaults and
initialisation follow ``fla.layers.Mamba2`` (fla 0.6): its state_dict loads with ``strict=True``.

Heads map to B/C groups as in ``mamba_ssm`` (head h reads group h // (num_heads / n_groups)); fla
0.6's pure-torch prefill tiles the groups instead (head h reads group h % n_groups), which agrees
only for ``n_groups == 1``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.config import ConfigError, require, require_choice, require_positive
from blocks.conv import ShortConvolution
from blocks.documents import documents_in
from blocks.norm import GatedRMSNorm
from blocks.ops.backend import BACKENDS
from blocks.ops.gla import gla
from blocks.registry import register_mixer
from blocks.state import LayerState, StateError


def _pair(field: str, value) -> tuple[float, float]:
    """A (low, high) pair from a tuple or a YAML list, checked low <= high."""
    require(isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value),
            field, f"must be a pair [low, high] of numbers, got {value!r}")
    low, high = float(value[0]), float(value[1])
    require(low <= high, field, f"low must be <= high, got {value!r}")
    return low, high


@dataclasses.dataclass
class Mamba2Config:
    """Options of the Mamba2 mixer (fla's ``Mamba2`` arguments and defaults).

    ``hidden_size`` is the model width given to the mixer. fla's ``chunk_size`` and conv ``backend``
    select kernels and are replaced by ``backend`` (``auto``: fla's kernels on CUDA, torch ops
    elsewhere; ``torch``; ``fla``). ``hidden_act`` is the convolution's activation and, without
    ``rmsnorm``, the gate's; only SiLU is supported, as in fla's fused kernels.
    """

    num_heads: int | None = None
    head_dim: int = 64
    state_size: int = 128
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    conv_init: float | None = None
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    A_init_range: tuple[float, float] = (1.0, 16.0)
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    use_bias: bool = False
    norm_eps: float = 1e-5
    backend: str = "auto"

    def __post_init__(self):
        if self.num_heads is not None and self.num_heads != 0:
            require_positive("num_heads", self.num_heads)
        require_positive("head_dim", self.head_dim)
        require_positive("state_size", self.state_size)
        require(isinstance(self.expand, int | float) and self.expand > 0, "expand", f"must be > 0, got {self.expand!r}")
        require_positive("n_groups", self.n_groups)
        require_positive("conv_kernel", self.conv_kernel)
        require(self.conv_init is None or (isinstance(self.conv_init, int | float) and self.conv_init > 0),
                "conv_init", f"must be None or > 0, got {self.conv_init!r}")
        require_choice("hidden_act", self.hidden_act, ("silu", "swish"))
        self.A_init_range = _pair("A_init_range", self.A_init_range)
        require(self.A_init_range[0] > 0, "A_init_range", f"must be positive (A = -exp(A_log)), got {self.A_init_range!r}")
        require(isinstance(self.dt_min, int | float) and 0 < self.dt_min <= self.dt_max, "dt_min",
                f"must satisfy 0 < dt_min <= dt_max, got dt_min={self.dt_min!r}, dt_max={self.dt_max!r}")
        require(isinstance(self.dt_init_floor, int | float) and self.dt_init_floor > 0, "dt_init_floor",
                f"must be > 0, got {self.dt_init_floor!r}")
        self.dt_limit = _pair("dt_limit", self.dt_limit)
        require(self.dt_limit[0] >= 0, "dt_limit", f"must be non-negative (dt is a step size), got {self.dt_limit!r}")
        require(isinstance(self.norm_eps, int | float) and self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps!r}")
        require_choice("backend", self.backend, BACKENDS)


@dataclasses.dataclass
class Mamba2State(LayerState):
    """Mamba2 decoding state: the SSM matrices and the convolution's input tail."""

    kind: ClassVar[str] = "recurrent"
    ssm: Tensor         # [B, H, N, P] fp32 (fla's cache holds its transpose [B, H, P, N])
    conv: Tensor        # [B, conv_dim, conv_kernel], last inputs of conv1d (fla's conv_state layout)
    seq_len: int = 0


@register_mixer("mamba2", symbol="M", state=Mamba2State)
class Mamba2(nn.Module):
    """Mamba2 (selective SSM with scalar decay per head), SSD computed as simple GLA (fla-compatible)."""

    Config = Mamba2Config

    def __init__(self, config: Mamba2Config, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.intermediate_size = round(config.expand * d_model)
        if not math.isclose(config.expand * d_model, self.intermediate_size):
            raise ConfigError("expand", f"d_model * expand must be an integer, got {d_model} * {config.expand}")
        if self.intermediate_size % config.head_dim:
            raise ConfigError("head_dim", f"must divide expand * d_model ({self.intermediate_size}), got {config.head_dim}")
        self.num_heads = self.intermediate_size // config.head_dim
        if config.num_heads and config.num_heads != self.num_heads:
            raise ConfigError("num_heads", f"num_heads * head_dim must equal expand * d_model ({self.intermediate_size}), "
                                           f"got {config.num_heads} * {config.head_dim}")
        if self.num_heads % config.n_groups:
            raise ConfigError("n_groups", f"must divide num_heads ({self.num_heads}), got {config.n_groups}")
        self.head_dim = config.head_dim
        self.ssm_state_size = config.state_size
        self.n_groups = config.n_groups
        self.conv_dim = self.intermediate_size + 2 * config.n_groups * config.state_size

        self.conv1d = ShortConvolution(self.conv_dim, config.conv_kernel, bias=config.use_conv_bias, activation="silu")
        if config.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -config.conv_init, config.conv_init)
        self.in_proj = nn.Linear(d_model, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias)
        # dt_bias = softplus⁻¹(dt) for dt log-uniform in [dt_min, dt_max] (floored)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(*config.A_init_range)))
        self.D = nn.Parameter(torch.ones(self.intermediate_size if config.D_has_hdim else self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if config.rmsnorm:
            self.norm = GatedRMSNorm(self.intermediate_size, eps=config.norm_eps, activation="silu",
                                     group_size=self.intermediate_size // config.n_groups,
                                     norm_before_gate=config.norm_before_gate)
        self.out_proj = nn.Linear(self.intermediate_size, d_model, bias=config.use_bias)

    def _check(self, x: Tensor, state: Mamba2State | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"Mamba2 layer {self.layer_idx}: x must be [batch, time >= 1, {self.d_model}], "
                             f"got {tuple(x.shape)}")
        if state is None:
            return
        if not isinstance(state, Mamba2State):
            raise StateError(f"Mamba2 layer {self.layer_idx} got a {type(state).__name__}; it continues only a Mamba2State")
        expected = (x.shape[0], self.num_heads, self.ssm_state_size, self.head_dim)
        if tuple(state.ssm.shape) != expected:
            raise StateError(f"Mamba2 layer {self.layer_idx}: state.ssm has shape {tuple(state.ssm.shape)}, "
                             f"expected {expected} [B, H, N, P] (state of another layer or batch?)")

    def forward(self, x: Tensor, state: Mamba2State | None = None,
                ctx: dict | None = None) -> tuple[Tensor, Mamba2State | None]:
        """``x`` [B, T, d_model] continuing ``state`` (``None``: empty history) -> (y [B, T, d_model], state).
        Mamba2 reads only ``ctx["documents"]`` (packed documents, each from an empty history; the
        state returned is then None)."""
        self._check(x, state)
        documents = documents_in(ctx, x, state, f"Mamba2 layer {self.layer_idx}")
        groups_state = self.n_groups * self.ssm_state_size
        gate, xBC, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xBC, conv = self.conv1d(xBC, state.conv if state is not None else None, documents)  # [B, T, conv_dim]
        xs, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)

        heads_per_group = self.num_heads // self.n_groups
        xs = xs.unflatten(-1, (self.num_heads, self.head_dim)).float()      # [B, T, H, P]
        B, C = (t.unflatten(-1, (self.n_groups, self.ssm_state_size)).float()
                .repeat_interleave(heads_per_group, dim=2) for t in (B, C))  # [B, T, H, N]
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.config.dt_limit)  # [B, T, H]
        A = -torch.exp(self.A_log.float())                                   # [H]

        if documents is not None:  # the rows as one sequence of documents (fla's varlen layout)
            y, _ = gla(*(documents.flat(t) for t in (C, B, xs * dt[..., None], A * dt)), scale=1.0,
                       backend=self.config.backend, cu_seqlens=documents.cu_seqlens)
            y = documents.unflat(y)                                          # [B, T, H, P]
        else:
            y, ssm = gla(C, B, xs * dt[..., None], A * dt, scale=1.0,
                         initial_state=state.ssm if state is not None else None,
                         output_final_state=True, backend=self.config.backend)  # [B, T, H, P], [B, H, N, P]
        D = self.D.float().view(self.num_heads, -1)                          # [H, P] or [H, 1]
        y = (y + xs * D).flatten(-2)                                          # [B, T, d_inner]
        if self.config.rmsnorm:
            y = self.norm(y, gate.float())
        else:
            y = y * F.silu(gate.float())
        if documents is not None:
            return self.out_proj(y.to(x.dtype)), None
        seq_len = (state.seq_len if state is not None else 0) + x.shape[1]
        return self.out_proj(y.to(x.dtype)), Mamba2State(ssm, conv, seq_len)
