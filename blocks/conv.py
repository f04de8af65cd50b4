"""Short causal depthwise convolution with a carried tail, in plain PyTorch.

Linear-RNN mixers (GLA, Gated DeltaNet, Mamba2) run a width-W depthwise causal convolution over
their projections before the recurrence. To continue a sequence from a saved state by any number
of tokens, the convolution must see the inputs just before the new ones; this module takes and
returns that tail.

Parameters and cache follow fla: the module *is* an ``nn.Conv1d`` (``weight`` [D, 1, W], optional
``bias`` [D]), so fla's ``ShortConvolution`` and Mamba2's ``conv1d`` state_dicts load unchanged; the
cache is [B, D, W], the last W inputs (oldest first, zero-padded at the start of a sequence), the
layout of fla's ``conv_state``. Only the newest W-1 entries influence later outputs.

Packed documents (``blocks.documents.Documents``): each document is convolved as a sequence of its
own, so a tap that would reach into the previous document reads zero instead, as the zero cache of
an empty history gives (fla's ``ShortConvolution`` with ``cu_seqlens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.documents import Documents

CONV_ACTIVATIONS = ("silu", "swish")


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv1d over [B, T, D] with an optional SiLU, continuing from a [B, D, W] cache.

    Args:
        hidden_size: channels D.
        kernel_size: width W (taps over the current and W-1 previous tokens).
        bias: learn a per-channel bias.
        activation: ``"silu"``/``"swish"`` after the convolution, or ``None``.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        if activation is not None and activation not in CONV_ACTIVATIONS:
            raise ValueError(f"ShortConvolution activation must be one of {CONV_ACTIVATIONS} or None, got {activation!r}")
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution kernel_size must be >= 1, got {kernel_size}")
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size, bias=bias)
        self.hidden_size = hidden_size
        self.activation = activation

    def initial_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> Tensor:
        """The cache of an empty history: W zeros per channel, [B, D, W]."""
        return self.weight.new_zeros(batch_size, self.hidden_size, self.kernel_size[0], dtype=dtype)

    def forward(self, x: Tensor, cache: Tensor | None = None,
                documents: Documents | None = None) -> tuple[Tensor, Tensor | None]:
        """Convolve ``x`` [B, T, D] after the history in ``cache`` [B, D, W] (``None``: empty), or, with
        ``documents``, each packed document of ``x`` from an empty history (``cache`` must be None).

        Returns ``(y [B, T, D], new_cache [B, D, W])``, the new cache None with ``documents``; the
        input cache is not modified.
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"ShortConvolution({self.hidden_size}) expects x of shape [B, T, {self.hidden_size}], "
                             f"got {tuple(x.shape)}")
        if documents is not None:
            if cache is not None:
                raise ValueError("ShortConvolution: packed documents start from an empty history; cache must be None")
            return self._documents(x, documents), None
        batch, width = x.shape[0], self.kernel_size[0]
        if cache is None:
            cache = self.initial_cache(batch, dtype=x.dtype)
        elif cache.shape != (batch, self.hidden_size, width):
            raise ValueError(f"ShortConvolution cache must have shape {(batch, self.hidden_size, width)} "
                             f"([B, D, W]), got {tuple(cache.shape)}")
        history = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, W + T]
        # the first cache entry is older than the receptive field: start one step later
        y = F.conv1d(history[..., 1:], self.weight, self.bias, groups=self.hidden_size)  # [B, D, T]
        if self.activation is not None:
            y = F.silu(y)
        return y.transpose(1, 2), history[..., -width:]

    def _documents(self, x: Tensor, documents: Documents) -> Tensor:
        """x [B, T, D] -> y [B, T, D], each document's taps limited to its own tokens."""
        width, length = self.kernel_size[0], x.shape[1]
        padded = F.pad(x, (0, 0, width - 1, 0))  # [B, W - 1 + T, D]
        positions = documents.positions[..., None]  # [B, T, 1]
        y = x * self.weight[:, 0, -1]  # lag 0: the token itself
        for lag in range(1, width):  # weight[:, 0, W - 1 - lag] multiplies the input `lag` tokens back
            earlier = padded[:, width - 1 - lag:width - 1 - lag + length]  # [B, T, D]
            y = y + torch.where(positions >= lag, earlier, 0.0) * self.weight[:, 0, width - 1 - lag]
        if self.bias is not None:
            y = y + self.bias
        return F.silu(y) if self.activation is not None else y
