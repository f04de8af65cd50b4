"""What a KVM layer keeps between calls (``KVMState``: slots, raw window, token count), the slots'
read view a state may carry along, and the check that a state belongs to a layer."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

from torch import Tensor

from blocks.kvm.codec import SlotReads
from blocks.kvm.config import KVMConfig
from blocks.kvm.schedule import CallSchedule
from blocks.state import LayerState, StateError
from blocks.token_buffer import TokenBuffer


class ReadView(NamedTuple):
    """Some slots as attention reads them, with what it was computed from: the slot tensors
    themselves and a key of everything else it depends on (see blocks/kvm/inference.py)."""

    sums: tuple[Tensor, Tensor, Tensor]  # the slots' keys, values and lens
    key: tuple
    reads: SlotReads  # keys (B, Hkv, S, d), values (B, Hkv, S, dv), logit bias (B, Hkv, S) or None


@dataclasses.dataclass
class KVMState(LayerState):
    """A KVM layer's decoding state: compressed slots, the raw window and the token count."""

    kind = "kvm"
    slot_keys: Tensor  # (B, Hkv, S, d): sums of prepared (gated) keys
    slot_values: Tensor  # (B, Hkv, S, dv): sums of (gated) values
    slot_lens: Tensor  # (B, Hkv, S, 1) fp32: creating-value norm (vlens) or count of absorbed tokens
    window_keys: Tensor  # (B, Hkv, L, d): rotated keys of tokens [window_begin(n), n)
    window_values: Tensor  # (B, Hkv, L, dv)
    window_gates: Tensor  # (B, Hkv, L, 1): their merge gates (used when they overflow)
    seq_len: int  # tokens processed so far (n)
    prev_q: Tensor | None = None  # token-shift tails: last projected q/k/v (B, H*d), if token shift is on
    prev_k: Tensor | None = None
    prev_v: Tensor | None = None
    # The buffer the window tensors are views of, where they are (without autograd: decode appends
    # in place, see blocks/token_buffer.py); not a field, so state_dict, select and to drop it.
    window_buffer: ClassVar[TokenBuffer | None] = None
    # The slots' read view as the last step computed it, so that decode steps between chunk
    # boundaries, which leave the slots as they are, do not recompute it; not a field either.
    # ``nbytes`` counts neither this view (the slots' size again) nor the buffer's spare room.
    read_view: ClassVar[ReadView | None] = None

    @property
    def num_slots(self) -> int:
        return self.slot_keys.shape[2]


def check_state(state: KVMState, b: int, hkv: int, d: int, dv: int, config: KVMConfig, schedule: CallSchedule) -> None:
    """Raise ``StateError`` naming every way ``state`` does not fit a layer with this config and
    these shapes (batch, kv heads, key and value dims), continued by the call ``schedule`` plans."""
    n0 = state.seq_len
    expected_window = n0 - schedule.start
    problems = []
    if state.slot_keys.shape[:2] != (b, hkv) or state.slot_keys.shape[-1] != d:
        problems.append(f"slot_keys {tuple(state.slot_keys.shape)} vs batch {b}, {hkv} kv heads, head_dim {d}")
    if state.slot_values.shape[-1] != dv or state.window_values.shape[-1] != dv:
        problems.append(f"value dim {state.slot_values.shape[-1]} vs {dv}")
    if state.window_keys.shape[2] != expected_window:
        problems.append(f"window holds {state.window_keys.shape[2]} tokens, expected {expected_window} "
                        f"for {n0} tokens with chunk_len {config.chunk_len} x {config.n_bswa_chunks} chunks")
    if state.num_slots != schedule.slots_before:
        problems.append(f"{state.num_slots} slots, but this layer's budget gives {schedule.slots_before} "
                        f"after {n0} tokens")
    if problems:
        raise StateError("KVM state does not belong to this layer (different model, config or batch?): "
                         + "; ".join(problems))
