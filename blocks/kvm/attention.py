"""KVM attention over projected heads (``kvm_attention``): one call continues a state by any number
of tokens. It plans the call's chunk schedule, lays out the raw tokens the call holds, copies the
first chunk into the state, reads the queries before W, hands the chunks from W on to the runner
for the grad mode and device, and assembles the new state."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from blocks.kvm.codec import SlotCodec, Slots
from blocks.kvm.config import KVMConfig
from blocks.kvm.reads import ReadScales, read_plain
from blocks.kvm.runner import runner_for
from blocks.kvm.schedule import CallSchedule, plan_call
from blocks.kvm.state import KVMState, ReadView, check_state
from blocks.kvm.tokens import RawTokens
from blocks.token_buffer import TokenBuffer, extend


def kvm_attention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, config: KVMConfig,
                  state: KVMState | None = None, *, state_key_norm: nn.Module,
                  window_temp: Tensor | None = None, state_temp: Tensor | None = None,
                  state_offset: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, KVMState]:
    """KVM attention over projected, rotated heads, continuing ``state`` (None: an empty history).

    q: (B, Hq, T, d); k: (B, Hkv, T, d); v: (B, Hkv, T, dv); gate: (B, Hkv, T, 1) positive merge
    gate, or None for no gating; ``state_key_norm`` maps (..., d) keys to state keys;
    ``window_temp``/``state_temp``: (Hq,) logit temperatures or None; ``state_offset``: (Hq,) added
    to the logits of the slots past the ``config.sink_len`` sinks, or None.
    Returns the output (B, Hq, T, dv) before the output projection (a transposed view of a
    contiguous (B, T, Hq, dv) tensor, which that projection reads without a copy), and the new state.
    """
    b, hq, t, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    if k.shape[:3] != (b, hkv, t) or v.shape[:3] != (b, hkv, t) or k.shape[-1] != d or hq % hkv:
        raise ValueError(f"kvm_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         "fit (B, Hq, T, d) / (B, Hkv, T, d) / (B, Hkv, T, dv) with Hkv dividing Hq")
    if gate is None:
        gate = q.new_ones(b, hkv, t, 1)
    elif gate.shape != (b, hkv, t, 1):
        raise ValueError(f"kvm_attention: gate must be (B, Hkv, T, 1) = {(b, hkv, t, 1)}, got {tuple(gate.shape)}")
    n0 = 0 if state is None else state.seq_len
    schedule = plan_call(n0, n0 + t, config)
    if state is not None:
        check_state(state, b, hkv, d, dv, config, schedule)
    codec = SlotCodec(config, state_key_norm, config.zeroed_key_dims(d))
    scales = ReadScales(scale or 1.0 / math.sqrt(d), window_temp, state_temp, state_offset, config.sink_len)
    runner = runner_for(codec, scales, (q, k, v, gate), None if state is None else state.read_view)
    slots, buffer, raw = _resume(state, k, v, gate, schedule, config)
    if schedule.first_chunk:  # the first chunk goes into the state as it arrives
        rows = schedule.rows(schedule.first_chunk)
        fresh = codec.new_slots(k[:, :, rows], v[:, :, rows], gate[:, :, rows])
        slots = Slots(*(torch.cat([old, new], 2) for old, new in zip(slots, fresh)))
    # (B, Hq, T, dv), rows filled region by region; laid out as (B, T, Hq, dv), so that the output
    # projection reads it as (B, T, Hq*dv) without a copy
    out = q.new_empty(b, t, hq, dv).transpose(1, 2)
    if schedule.plain:
        read_plain(q, out, schedule, raw, scales)
    slots, view = runner.run(schedule, q, raw, slots, out)
    return out, _new_state(slots, raw, buffer, schedule, view)


def _resume(state: KVMState | None, k: Tensor, v: Tensor, gate: Tensor, schedule: CallSchedule,
            config: KVMConfig) -> tuple[Slots, TokenBuffer | None, RawTokens]:
    """The slots the call starts from, and the raw tokens it holds: the state's window followed by
    the new tokens, as views of a ``TokenBuffer`` where the state's window ends one (None: with
    autograd, or no state yet)."""
    if state is None:
        b, hkv, _, d = k.shape
        empty = Slots(k.new_zeros(b, hkv, 0, d), v.new_zeros(b, hkv, 0, v.shape[-1]),
                      k.new_zeros(b, hkv, 0, 1, dtype=torch.float32))
        return empty, None, RawTokens(k, v, gate, schedule.start)
    held = state.window_keys, state.window_values, state.window_gates
    buffer, tokens = extend(state.window_buffer, held, (k, v, gate),
                            spare=config.window_len + config.chunk_len)  # a new buffer lasts a window and a chunk
    return Slots(state.slot_keys, state.slot_values, state.slot_lens), buffer, RawTokens(*tokens, schedule.start)


def _new_state(slots: Slots, raw: RawTokens, buffer: TokenBuffer | None, schedule: CallSchedule,
               view: ReadView | None) -> KVMState:
    """The state after the call: its slots, the raw window from ``schedule.end`` on, and the read
    view of the slots if it was computed from these very tensors."""
    slot_keys, slot_values = slots.keys.contiguous(), slots.values.contiguous()  # a room's are views of its sums
    state = KVMState(slot_keys, slot_values, slots.lens, *raw.between(schedule.end, schedule.n1), schedule.n1)
    state.window_buffer = buffer
    if view is not None and all(a is b for a, b in zip(view.sums, (slot_keys, slot_values, slots.lens))):
        state.read_view = view
    return state
