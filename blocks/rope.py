"""Rotary position embeddings, full or partial, in the two layouts the toolkit meets.

* ``"kvm_paper"`` (the KVM paper's backbone): angular frequencies ``(1/theta) ** linspace(0, 1, R/2)``
  (so they run from 1 down to exactly 1/theta), applied to *adjacent* pairs (0,1), (2,3), ... of the
  first ``R`` dims, rotating by minus the angle as the published code does; the other ``d - R`` dims
  are left unrotated.
* ``"llama"`` (Llama, Mistral, Qwen, SmolLM): frequencies ``theta ** (-2i/R)``, dims ``i`` and
  ``i + R/2`` of the first ``R`` dims rotate together (``rotate_half``).

Angles are always computed in fp32 from positions, so a model moved to bf16 keeps exact positions
(the published code's lazily created buffer broke under ``.to(bf16)``, docs/kvm.md §10, B8).
``round_bf16=True`` reproduces the published code's rounding of cos/sin through bf16.

Both layouts rotate pair i by its angle: (a, b) -> (a cos - b sin, b cos + a sin), the angle negated
in ``kvm_paper``. There a pair is adjacent floats, one complex number, so ``rotate_`` rotates by
one complex multiply.
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
        self.theta = theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> Tensor:
        """The angular frequency of each rotated pair, (rotary_dim / 2,) fp32 on the CPU."""
        half = self.rotary_dim // 2
        if self.style == "kvm_paper":
            # In fp32 exactly as the published code computes it: a float64 version differs by an ulp in some
            # frequencies, which is enough to flip bf16-rounded cos/sin (round_bf16) at large positions.
            return (1.0 / self.theta) ** torch.linspace(0, 1, half, dtype=torch.float32, device="cpu")
        return (self.theta ** (-torch.arange(0, half, dtype=torch.float64, device="cpu") * 2 / self.rotary_dim)).float()

    @torch.no_grad()
    def reset_frequencies(self) -> None:
        """Fill ``inv_freq`` again, where it is: it is not saved with the weights, so a loader that
        allocates buffers empty (transformers' ``from_pretrained``) calls this afterwards."""
        self.inv_freq.copy_(self.frequencies())

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in fp32 whatever dtype the model is moved to (docs/kvm.md §10, B8).
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        return self

    def angles(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin (length, rotary_dim / 2) fp32 of each pair's angle at positions [start, start + length);
        in ``kvm_paper`` the angle is negated (the published code rotates by minus it).

        Compute them once and pass them to ``forward`` / ``rotate_`` for q and k alike."""
        return self.angles_at(torch.arange(start, start + length, device=device, dtype=torch.float32))

    def angles_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (*positions.shape, rotary_dim / 2) fp32 at any positions, e.g. (B, 1, T) for rows
        whose positions differ (packed documents, each counted from its start), which broadcast
        over the heads of (B, H, T, head_dim)."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)  # (..., R/2)
        cos, sin = angles.cos(), angles.sin()
        if self.round_bf16:
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        return cos, (-sin if self.style == "kvm_paper" else sin)

    def _pairs(self, rot: Tensor) -> tuple[Tensor, Tensor]:
        """Views (..., R/2) of the first and second float of every rotated pair of rot (..., R)."""
        return (rot[..., 0::2], rot[..., 1::2]) if self.style == "kvm_paper" else rot.chunk(2, dim=-1)

    def forward(self, x: Tensor, start: int, angles: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (batch, heads, time, head_dim) at absolute positions [start, start + time) -> rotated x,
        computed in fp32. Differentiable; ``rotate_`` is the faster in-place version for inference."""
        cos, sin = angles if angles is not None else self.angles(start, x.shape[-2], x.device)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        first, second = self._pairs(rot.float())
        new = first * cos - second * sin, second * cos + first * sin
        rotated = torch.stack(new, dim=-1).flatten(-2) if self.style == "kvm_paper" else torch.cat(new, dim=-1)
        return torch.cat([rotated.to(x.dtype), rest], dim=-1)

    def rotate_(self, x: Tensor, angles: tuple[Tensor, Tensor]) -> Tensor:
        """``forward`` in place on x (batch, heads, time, head_dim), without autograd: no new tensor
        of x's size and the unrotated dims untouched (6 heads x 128 at 32k tokens: 14 ms for
        ``kvm_paper``, 36 ms for ``llama``, against forward's 190 and 120 ms). For tensors the
        caller owns, such as fresh projections. Returns x."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("RotaryEmbedding.rotate_ works in place and has no gradient: call it under "
                               "torch.no_grad(), or use forward()")
        cos, sin = angles
        rot = x[..., : self.rotary_dim]
        work = rot if rot.dtype == torch.float32 else rot.float()  # pairs rotate in fp32
        if (self.style == "kvm_paper" and work.stride(-1) == 1
                and all(n % 2 == 0 for n in (*work.stride()[:-1], work.storage_offset()))):
            torch.view_as_complex(work.unflatten(-1, (-1, 2))).mul_(torch.complex(cos, sin))  # a pair: one complex
        else:
            first, second = self._pairs(work)
            first_sin = first * sin
            first.mul_(cos).addcmul_(second, sin, value=-1)
            second.mul_(cos).add_(first_sin)
        if work is not rot:
            rot.copy_(work)
        return x
