"""RMS normalisations used by the mixers, in plain PyTorch, with fla's parameter names.

* ``RMSNorm``: ``x / rms(x) * weight (+ bias)`` over the last dim (fla.modules.RMSNorm).
* ``GatedRMSNorm``: an RMSNorm fused with a multiplicative gate ``act(g)``. It covers the two gated
  norms of fla's layers with one set of semantics:

  - fla's ``FusedRMSNormGated`` (GLA / GatedDeltaNet output norm, per head):
    ``rmsnorm(x) * weight * act(g)``, ``act`` = swish (default) or sigmoid, i.e.
    ``norm_before_gate=True, group_size=None``;
  - fla's ``RMSNormGated`` (Mamba2's ``norm``): ``rmsnorm_groups(x * silu(z)) * weight``, i.e.
    ``norm_before_gate=False`` with ``group_size = d_inner // n_groups`` (the mean square is taken
    over each group of ``group_size`` channels); a ``None`` gate is a plain (grouped) RMSNorm.

Both compute in fp32 and return the input dtype, as fla's kernels do, and both hold only ``weight``
(and ``bias`` where fla has one), so fla state_dicts load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")


def _rms_normalize(x: Tensor, eps: float, group_size: int | None) -> Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dim, or over consecutive groups of ``group_size``."""
    if group_size is None or group_size == x.shape[-1]:
        return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    groups = x.unflatten(-1, (-1, group_size))  # [..., G, group_size]
    groups = groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
    return groups.flatten(-2)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim (fla.modules.RMSNorm semantics and names)."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.hidden_size = hidden_size
        self.elementwise_affine = elementwise_affine
        self.eps = eps
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size))
            if bias:
                self.bias = nn.Parameter(torch.zeros(hidden_size))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm({self.hidden_size}) got input with last dim {x.shape[-1]}")
        y = _rms_normalize(x.float(), self.eps, None)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a multiplicative gate: fla's ``FusedRMSNormGated`` and Mamba2's ``RMSNormGated``.

    Args:
        hidden_size: channels of ``x`` (last dim).
        eps: added to the mean square.
        elementwise_affine: learn a per-channel ``weight`` (fla's name).
        activation: gate nonlinearity, ``swish``/``silu`` or ``sigmoid``.
        group_size: normalise each group of this many channels separately (``None``: all channels).
        norm_before_gate: ``True``: ``norm(x) * act(g)`` (GLA, GDN); ``False``: ``norm(x * act(g))``
            (Mamba2).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        activation: str = "swish",
        group_size: int | None = None,
        norm_before_gate: bool = True,
    ):
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"GatedRMSNorm activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
        if group_size is not None and (group_size <= 0 or hidden_size % group_size):
            raise ValueError(f"GatedRMSNorm group_size must divide hidden_size ({hidden_size}), got {group_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.activation = activation
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.register_parameter("weight", nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None)
        self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, activation={self.activation}, "
                f"group_size={self.group_size}, norm_before_gate={self.norm_before_gate}")

    def _gate(self, g: Tensor) -> Tensor:
        return torch.sigmoid(g) if self.activation == "sigmoid" else F.silu(g)

    def forward(self, x: Tensor, g: Tensor | None = None) -> Tensor:
        """``x``: [..., hidden_size]; ``g``: same shape as ``x`` or ``None`` (no gate)."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"GatedRMSNorm({self.hidden_size}) got input with last dim {x.shape[-1]}")
        if g is not None and g.shape != x.shape:
            raise ValueError(f"GatedRMSNorm: gate shape {tuple(g.shape)} differs from input shape {tuple(x.shape)}")
        y = x.float()
        if g is not None and not self.norm_before_gate:
            y = y * self._gate(g.float())
        y = _rms_normalize(y, self.eps, self.group_size)
        if self.weight is not None:
            y = y * self.weight.float()
        if g is not None and self.norm_before_gate:
            y = y * self._gate(g.float())
        return y.to(x.dtype)
