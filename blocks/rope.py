"""Rotary position embeddings, full or partial, in the two layouts the toolkit meets.

* ``"kvm_paper"`` (the KVM paper's backbone): angular frequencies ``(1/theta) ** linspace(0, 1, R/2)``
  (so they run from 1 down to exactly 1/theta), applied to *adjacent* pairs (0,1), (2,3), ... of the
  first ``R`` dims, rotating by minus the angle as the published code does; the other ``d - R`` dims
  are left unrotated.
* ``"llama"`` (Llama, Mistral, Qwen, SmolLM): frequencies ``theta ** (-2i/R)``, dims ``i`` and
  ``i + R/2`` of the first ``R`` dims rotate together (``rotate_half``).

Angles are always computed in fp32 from positions, so a model moved to bf16 keeps exact positions
(the published code's lazily created buffer broke under ``.to(bf16)``, kvm.md B8).
``round_bf16=True`` reproduces the published code's rounding of cos/sin through bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ROPE_STYLES = ("kvm_paper", "llama")


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` dims of (batch, heads, time, head_dim) tensors by position."""

    def __init__(self, head_dim: int, rotary_dim: int, theta: float = 10000.0, style: str = "kvm_paper",
                 round_bf16: bool = False):
        super().__init__()
        if style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {style!r}")
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rope_partial_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim, self.rotary_dim, self.style, self.round_bf16 = head_dim, rotary_dim, style, round_bf16
        half = rotary_dim // 2
        if style == "kvm_paper":
            # In fp32 exactly as the published code computes it: a float64 version differs by an ulp in some
            # frequencies, which is enough to flip bf16-rounded cos/sin (round_bf16) at large positions.
            inv_freq = (1.0 / theta) ** torch.linspace(0, 1, half, dtype=torch.float32)
        else:
            inv_freq = (theta ** (-torch.arange(0, half, dtype=torch.float64) * 2 / rotary_dim)).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in fp32 whatever dtype the model is moved to (kvm.md B8).
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        return self

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (length, rotary_dim) for positions [start, start + length)."""
        pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.to(device))  # (length, R/2)
        if self.style == "kvm_paper":
            angles = angles.repeat_interleave(2, dim=-1)  # pairs (0,1), (2,3), ...
        else:
            angles = torch.cat([angles, angles], dim=-1)  # pairs (i, i + R/2)
        cos, sin = angles.cos(), angles.sin()
        if self.round_bf16:
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        return cos, sin

    def forward(self, x: Tensor, start: int) -> Tensor:
        """x: (batch, heads, time, head_dim) at absolute positions [start, start + time)."""
        cos, sin = self.cos_sin(start, x.shape[-2], x.device)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.style == "kvm_paper":
            # The published code rotates each pair by -angle: out[2i] = x[2i] cos + x[2i+1] sin.
            pairs = rot.unflatten(-1, (-1, 2))  # (..., R/2, 2)
            rotated_half = torch.stack([pairs[..., 1], -pairs[..., 0]], dim=-1).flatten(-2)
        else:
            first, second = rot.chunk(2, dim=-1)
            rotated_half = torch.cat([-second, first], dim=-1)
        out = rot.float() * cos + rotated_half.float() * sin
        return torch.cat([out.to(x.dtype), rest], dim=-1)
