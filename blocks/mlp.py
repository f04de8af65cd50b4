"""The feed-forward half of a block: ReLU² (the KVM paper), SwiGLU (Llama) or GELU, with an
optional token shift on the input.

Token shift (docs/kvm.md §2): ``x + shift * (x_prev - x)``, where ``x_prev`` is the previous token's
input and the first token of a sequence (or of a packed document) sees zero. Decoding carries the
last input as a tail so a
continuation equals the uninterrupted sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.documents import Documents

ACTIVATIONS = {
    "relu2": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
}


class MLP(nn.Module):
    """``down(act(up(x)))`` or, for SwiGLU, ``down(silu(gate(x)) * up(x))``; names follow Llama."""

    def __init__(self, d_model: int, hidden: int, kind: str = "relu2", bias: bool = False,
                 token_shift: bool = False, layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        self.kind = kind
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias) if kind == "swiglu" else None
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.shift = None
        if token_shift:
            # The paper's backbone (docs/kvm.md §2): 1 - (i/D)^(r^4), r from 1 at the first layer towards 0 at the last.
            r = 1.0 - layer_idx / max(n_layers, 1)
            self.shift = nn.Parameter(1.0 - (torch.arange(d_model) / d_model) ** (r ** 4))

    def forward(self, x: Tensor, prev: Tensor | None = None,
                documents: Documents | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D); prev: (B, D) the last input of the previous call (None: zeros). With packed
        ``documents`` the first token of each sees zero too.
        Returns y (B, T, D) and the tail to pass next time (None without token shift)."""
        tail = None
        if self.shift is not None:
            first = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev[:, None].to(x.dtype)
            before = torch.cat([first, x[:, :-1]], dim=1)  # (B, T, D)
            if documents is not None:
                before = documents.restart(before, 0.0)
            tail = x[:, -1]
            x = x + self.shift * (before - x)
        if self.gate_proj is not None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = ACTIVATIONS[self.kind](self.up_proj(x))
        return self.down_proj(h), tail
