"""The way a call runs with autograd on, and the reference every other way is tested against.

Slots are plain tensors: every boundary update returns new ones (nothing is written in place, so
the graph sees each step), and every chunk's queries are read exactly, one softmax per query over
[state ; window] (``reads.read_tile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.kvm.codec import Incoming, SlotCodec, Slots
from blocks.kvm.reads import ReadScales, TileMasks, read_tile
from blocks.kvm.routing import add_rows, max_over_slots, merge_increments, new_slot_lens, route_chunk
from blocks.kvm.schedule import CallSchedule
from blocks.kvm.tokens import RawTokens


class AutogradRunner:
    """A call's chunk steps in order: each chunk's update (``absorb``), then its queries' read."""

    def __init__(self, codec: SlotCodec, scales: ReadScales):
        self.codec, self.scales = codec, scales

    def run(self, schedule: CallSchedule, q: Tensor, raw: RawTokens, slots: Slots,
            out: Tensor) -> tuple[Slots, None]:
        """Run ``schedule.steps``: q (B, Hq, T, d) the call's queries, their outputs into the same
        rows of ``out`` (B, Hq, T, dv). -> the slots after the call, and None: nothing read is kept
        for the next call (the read is part of the graph)."""
        chunk = self.codec.config.chunk_len
        normed = None  # the slot keys as the last read read them, the slots unchanged since
        masks = TileMasks(self.codec.config, q.device)
        for step in schedule.steps:
            if step.update is not None:
                leaving = self.codec.incoming(*raw.between(step.update.leaving, step.update.leaving + chunk))
                slots = absorb(self.codec, slots, leaving, step.update.appends, normed)
            reads = self.codec.read(*slots, q.dtype)
            normed = reads.keys
            read_tile(q, out, schedule, step, raw, reads, self.scales, masks)
        return slots, None


def absorb(codec: SlotCodec, slots: Slots, incoming: Incoming, appends: int,
           normed_keys: Tensor | None = None) -> Slots:
    """Fold one leaving chunk, prepared by ``SlotCodec.incoming``, into the slots (there is at least
    one) -> new slots: its ``appends`` most novel tokens appended, the others merged into their best
    slot. ``normed_keys``: ``state_key_norm(slots.keys)`` if the caller has it already."""
    config, d, num = codec.config, incoming.keys.shape[-1], slots.keys.shape[2]
    features = codec.slot_features(codec.norm(slots.keys) if normed_keys is None else normed_keys)
    scores = features @ incoming.routing.transpose(-1, -2)  # (B, Hkv, S, C) fp32: every slot against every token
    with torch.no_grad():
        novelty, best, target = max_over_slots(scores, config.sink_len)  # (B, Hkv, C) each
    routed = route_chunk(codec, incoming, novelty, best, target, num, appends, lambda rows: max_over_slots(rows)[1:])
    if appends:
        added = routed.append_keys, routed.append_values, new_slot_lens(codec, routed)
        slots = Slots(*(torch.cat([old, new], 2) for old, new in zip(slots, added)))
    lens = slots.lens
    if not config.use_vlens:  # count (or weight) averaging: each merge adds one (its weight) to its slot's lens
        lens = add_rows(lens, routed.target, merge_increments(routed, lens.dtype))
    return Slots(add_rows(slots.keys, routed.target, routed.merging[..., :d]),
                 add_rows(slots.values, routed.target, routed.merging[..., d:]), lens)
