"""The KVM token mixer (``KVMAttention``, registered as "kvm", symbol K): projections, merge gate,
temperatures and state-key norm around ``kvm_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.documents import documents_in
from blocks.kvm.attention import kvm_attention
from blocks.kvm.config import KVMConfig
from blocks.kvm.documents import kvm_attention_documents
from blocks.kvm.state import KVMState
from blocks.projection import ProjectedAttention
from blocks.registry import register_mixer
from blocks.state import StateError


@register_mixer("kvm", symbol="K", state=KVMState)
class KVMAttention(ProjectedAttention):
    """Key-Value Means attention: block sliding window + a compressed, budgeted memory."""

    Config = KVMConfig

    def __init__(self, config: KVMConfig, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__(config, d_model, layer_idx, n_layers)
        if config.uses_merge_gate:
            self.merge_gate_proj = nn.Linear(d_model, self.num_kv_heads, bias=False)
        if config.use_head_temps:
            self.window_temp = nn.Parameter(torch.ones(self.num_heads))
            self.state_temp = nn.Parameter(torch.ones(self.num_heads))
        if config.state_offset:  # 0: the read as without it; -inf: the sinks and the window alone
            self.state_offset = nn.Parameter(torch.zeros(self.num_heads))
        # the mean read reads slot keys as the mean of the keys that entered them: no norm (§7)
        self.state_key_norm = nn.Identity() if config.reads_mean else nn.LayerNorm(self.head_dim, eps=config.norm_eps)

    def forward(self, x: Tensor, state: KVMState | None = None,
                ctx: dict | None = None) -> tuple[Tensor, KVMState | None]:
        """x: (B, T, d_model) -> y (B, T, d_model), the state after these T tokens (None for packed
        documents, ``ctx["documents"]``, which each run from an empty state: blocks/kvm/documents.py)."""
        self._check_input(x)
        if state is not None and not isinstance(state, KVMState):
            raise StateError(f"KVMAttention got a {type(state).__name__}, expected a KVMState")
        documents = documents_in(ctx, x, state, "KVMAttention")
        q, k, v, new_tails = self.project(x, 0 if state is None else state.seq_len, self.shift_tails(state), ctx)
        gate = None
        if self.config.uses_merge_gate:
            gate = (1 + F.elu(self.merge_gate_proj(x))).transpose(1, 2).unsqueeze(-1)  # (B, Hkv, T, 1)
        read = dict(state_key_norm=self.state_key_norm, window_temp=getattr(self, "window_temp", None),
                    state_temp=getattr(self, "state_temp", None), state_offset=getattr(self, "state_offset", None),
                    scale=self.scale)
        if documents is not None:
            return self.output(kvm_attention_documents(q, k, v, gate, self.config, documents, **read)), None
        o, new_state = kvm_attention(q, k, v, gate, self.config, state, **read)
        self.store_shift_tails(new_state, new_tails)
        return self.output(o), new_state
