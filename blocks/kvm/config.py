"""The options of a KVM layer (``KVMConfig``): its projections and the KVM algorithm, validated."""

from __future__ import annotations

import dataclasses

from blocks.config import require, require_choice, require_positive
from blocks.projection import ProjectionConfig

BUDGETS = ("fixed", "power_law", "saturation")
STATE_READS = ("normed", "mean")


@dataclasses.dataclass(frozen=True)
class KVMConfig(ProjectionConfig):
    """Options of a KVM layer: its projections (see ``ProjectionConfig``) and the KVM algorithm.

    The algorithm defaults are the paper's (kvm.md §4.1); the paper's recipes add
    ``qk_norm: layernorm``, ``rope_partial_dim: 64``, ``rope_style: kvm_paper``, token shift and
    value residual.
    """

    chunk_len: int = 256  # C: tokens per chunk (query block, window block, overflow unit)
    n_bswa_chunks: int = 2  # Nb: window = the last Nb chunks up to the query (W = Nb*C tokens)
    sink_len: int = 1  # leading slots that never receive merges
    budget: str = "fixed"  # how many slots the state may hold: fixed | power_law | saturation
    state_min_len: int = 0  # lower bound on the slot target (fixed: the target itself)
    growth_factor: float = 1.0  # power_law: f in f * ctx**e
    growth_exponent: float = 0.5  # power_law: e
    saturation_n: int | None = None  # saturation: N in N*ctx/(N+ctx)
    round_down: int = 1  # slot targets are rounded down to a multiple of this
    max_state_chunks: int | None = None  # cap slots at chunk_len * this (None: no cap)
    use_vlens: bool = True  # read slot values as direction * creating-value norm (else: mean)
    state_read: str = "normed"  # normed: the paper's read (state-key norm); mean: sums / weight, + log(weight) (§7)
    use_head_temps: bool = True  # per-head temperatures on window and state logits
    state_offset: bool = False  # a learned per-head offset (from 0) on the logits of the slots past the sinks
    merge_gate_keys: bool = True  # weight merged keys by the 1+ELU merge gate
    merge_gate_values: bool = True  # weight merged values by the merge gate
    merge_gate_appends: bool = True  # appended slots also use the gated key/value
    merge_gate_initial_state: bool = False  # the first chunk's slots use the gated key/value
    state_key_zero_dims: int | None = None  # dims zeroed before state_key_norm (None: the RoPE dims)
    bf16_state_values: bool = False  # round state values through bf16 at read (published code, B6)

    def __post_init__(self):
        super().__post_init__()
        require_positive("chunk_len", self.chunk_len)
        require_positive("n_bswa_chunks", self.n_bswa_chunks)
        require(isinstance(self.sink_len, int) and 0 <= self.sink_len < self.chunk_len, "sink_len",
                f"must be in [0, chunk_len={self.chunk_len}) so that merges have a slot to go to, got {self.sink_len}")
        require_choice("budget", self.budget, BUDGETS)
        require_choice("state_read", self.state_read, STATE_READS)
        require(self.state_read != "mean" or not self.use_vlens, "use_vlens",
                "the mean read divides by the weight of absorbed tokens: set use_vlens: false with state_read: mean")
        require(self.state_read != "mean" or self.merge_gate_keys == self.merge_gate_values, "merge_gate_keys",
                "the mean read weighs a token's key and value alike: set merge_gate_keys and merge_gate_values "
                "to the same value with state_read: mean")
        require(self.growth_factor > 0, "growth_factor", f"must be > 0, got {self.growth_factor}")
        require(0 < self.growth_exponent <= 1, "growth_exponent", f"must be in (0, 1], got {self.growth_exponent}")
        if self.budget == "saturation":
            require(self.saturation_n is not None and self.saturation_n > 0, "saturation_n",
                    f"the saturation budget needs saturation_n > 0, got {self.saturation_n}")
        require_positive("round_down", self.round_down)
        require(self.max_state_chunks is None or self.max_state_chunks > 0, "max_state_chunks",
                f"must be > 0 or null, got {self.max_state_chunks}")
        require(self.state_key_zero_dims is None or self.state_key_zero_dims >= 0, "state_key_zero_dims",
                f"must be >= 0 or null, got {self.state_key_zero_dims}")

    @property
    def window_len(self) -> int:
        return self.chunk_len * self.n_bswa_chunks

    @property
    def reads_mean(self) -> bool:
        """Whether slots are read as the gate-weighted mean of their tokens, with log(weight) added to
        their logits (docs/kvm.md §7)."""
        return self.state_read == "mean"

    @property
    def uses_merge_gate(self) -> bool:
        return self.merge_gate_keys or self.merge_gate_values

    def zeroed_key_dims(self, head_dim: int) -> int:
        """Leading key dims zeroed before the state-key norm: ``state_key_zero_dims``, else the RoPE dims."""
        if self.state_key_zero_dims is not None:
            return min(self.state_key_zero_dims, head_dim)
        return head_dim if self.rope_partial_dim is None else min(self.rope_partial_dim, head_dim)
