"""The way a call runs without autograd in PyTorch (no_grad / inference_mode, any device).

A call that runs boundary updates keeps its slots in a ``Room`` and updates them in place; a call
that runs none (most decode steps) reads the slots as they came, once, through a ``ReadView`` that
the state carries to the next step until an update changes the slots. Whole chunks on CPU are
read by the split read (blocks/kvm/split_read.py); partial chunks, and every chunk off CPU, as
exact tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.kvm.codec import Incoming, SlotCodec, SlotReads, Slots
from blocks.kvm.reads import ReadScales, TileMasks, read_tile
from blocks.kvm.room import Room
from blocks.kvm.routing import Routed, add_rows, max_over_slots, merge_increments, new_slot_lens, route_chunk
from blocks.kvm.schedule import CallSchedule, ChunkStep, Update
from blocks.kvm.split_read import attend_slots, attend_windows, join, window_group, window_mask
from blocks.kvm.state import ReadView
from blocks.kvm.tokens import RawTokens


class InferenceRunner:
    """A call's chunk steps without autograd (one runner per call). ``kept_view``: the read view the
    state came with, if any; ``split_reads``: whole chunks by the split read (CPU), else every chunk
    as a tile."""

    def __init__(self, codec: SlotCodec, scales: ReadScales, kept_view: ReadView | None, split_reads: bool = True):
        self.codec, self.scales, self.split_reads = codec, scales, split_reads
        self.room: Room | None = None  # the slots, when this call updates them
        self.view = kept_view  # the slots' read view, when it does not

    def run(self, schedule: CallSchedule, q: Tensor, raw: RawTokens, slots: Slots,
            out: Tensor) -> tuple[Slots, ReadView | None]:
        """Run ``schedule.steps``: q (B, Hq, T, d) the call's queries, their outputs into the same
        rows of ``out`` (B, Hq, T, dv). -> the slots after the call (views of the room if it has
        one), and the read view of the slots as they came (the new state keeps it if they are)."""
        if schedule.runs_update:  # updates write in place, never into the caller's state
            self.room = Room.around(self.codec, slots, schedule.slots, q.dtype)
        elif schedule.steps:
            self.view = self.read_view(slots, q.dtype)
        masks = TileMasks(self.codec.config, q.device)
        for run in schedule.runs():
            if run[0].whole and self.split_reads:
                self.read_whole_chunks(q, out, schedule, run, raw)
            else:
                for step in run:
                    if step.update is not None:
                        self.update(step.update, raw)
                    read_tile(q, out, schedule, step, raw, self.slot_reads(step), self.scales, masks)
        return (slots if self.room is None else self.room.slots(schedule.slots)), self.view

    def read_view(self, slots: Slots, dtype: torch.dtype) -> ReadView:
        """The slots as attention reads them: the kept view while it was computed from these very
        tensors, with the same norm parameters and dtype; else read again."""
        key = self.view_key(slots, dtype)
        view = self.view
        if view is None or view.key != key or any(a is not b for a, b in zip(view.sums, slots)):
            view = ReadView(tuple(slots), key, self.codec.read(*slots, dtype))
        return view

    def view_key(self, slots: Slots, dtype: torch.dtype) -> tuple:
        """What a read view depends on besides the slot tensors' identity: their versions (in-place
        changes; inference tensors have none, and this code never changes a state's slots in
        place), the norm and its parameters' versions, and the dtype read in."""
        version = lambda x: None if x.is_inference() else x._version  # noqa: E731
        norm, config = self.codec.norm, self.codec.config
        return (tuple(map(version, slots)), id(norm), tuple(map(version, norm.parameters())), dtype,
                config.use_vlens, config.state_read, config.bf16_state_values)

    def slot_reads(self, step: ChunkStep) -> SlotReads:
        """The slots as the step's queries read them."""
        if self.room is None:
            return self.view.reads
        return self.room.reads(step.slots)

    def read_whole_chunks(self, q: Tensor, out: Tensor, schedule: CallSchedule, run: tuple[ChunkStep, ...],
                          raw: RawTokens) -> None:
        """Whole chunks in a row, by the split read: the windows of a few chunks at a time in one
        flash call, each chunk's state part after its update, the two joined into ``out``."""
        config = self.codec.config
        chunk, (b, hq, _, d) = config.chunk_len, q.shape
        group = window_group(b * hq * chunk * d * q.element_size())
        mask = window_mask(hq // raw.keys.shape[1], chunk, config.window_len, q.dtype, q.device)
        for i, step in enumerate(run):
            if step.update is not None:
                self.update(step.update, raw)
            if i % group == 0:  # the windows of the next few whole chunks, in one call
                last = run[min(i + group, len(run)) - 1]
                keys, values = raw.keys_values(step.window, last.queries.stop)
                queries = schedule.rows(range(step.queries.start, last.queries.stop))
                win_out, win_lse = attend_windows(q[:, :, queries], keys, values, chunk, config.window_len, mask,
                                                  self.scales)
            rows = schedule.rows(step.queries)
            o_s, lse_s = attend_slots(q[:, :, rows], self.slot_reads(step), self.scales)  # (B, Hq, C, dv), (B, Hq, C)
            o_w, lse_w = win_out[:, :, i % group], win_lse[:, :, i % group]  # (B, Hkv, g, C, dv), (B, Hkv, g, C)
            self.join(o_w, lse_w, o_s.view_as(o_w), lse_s.view_as(lse_w), out[:, :, rows].view_as(o_w))

    def join(self, o_w: Tensor, lse_w: Tensor, o_s: Tensor, lse_s: Tensor, out: Tensor) -> None:
        """The window and state parts of a split read, joined into out (see ``split_read.join``)."""
        join(o_w, lse_w, o_s, lse_s, out)

    def update(self, update: Update, raw: RawTokens) -> None:
        """One boundary update of the room, in place: the leaving chunk prepared, routed among the
        slots, its most novel tokens appended and the others merged."""
        num, chunk = update.slots, self.codec.config.chunk_len
        incoming = self.incoming(*raw.between(update.leaving, update.leaving + chunk))
        novelty, best, target = self.route(incoming, num)
        routed = route_chunk(self.codec, incoming, novelty, best, target, num, update.appends, self.best_among_new)
        if update.appends:
            self.room.append(num, routed.append_keys, routed.append_values, new_slot_lens(self.codec, routed))
        self.merge(routed, update)

    def incoming(self, k: Tensor, v: Tensor, g: Tensor) -> Incoming:
        """A raw chunk (B, Hkv, C, *) leaving the window, prepared for the state."""
        return self.codec.incoming(k, v, g)

    def route(self, incoming: Incoming, num: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every token's best score over the first ``num`` slots, and its best score and slot over the
        non-sink ones, (B, Hkv, C) each, from their scores (B, Hkv, S, C) in the room's scratch."""
        b, h, size, _ = incoming.routing.shape
        scores = torch.matmul(self.room.features[:, :, :num], incoming.routing.transpose(-1, -2),
                              out=self.room.scores[: b * h * num * size].view(b, h, num, size))
        return max_over_slots(scores, self.codec.config.sink_len)

    def best_among_new(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Routing scores against new slots (B, Hkv, A, C) -> best score and index over the A rows."""
        return max_over_slots(rows)[1:]

    def merge(self, routed: Routed, update: Update) -> None:
        """The merging tokens added to their slots, then the read view re-read where they and the
        appends touched the room."""
        room, num = self.room, update.slots
        add_rows(room.sums, routed.target, routed.merging, inplace=True)
        if not self.codec.config.use_vlens:  # count (or weight) averaging: each merge adds one (its weight)
            add_rows(room.lens, routed.target, merge_increments(routed, room.lens.dtype), inplace=True)
        b, h, _ = routed.target.shape
        appended = torch.arange(num, num + update.appends, device=routed.target.device).expand(b, h, -1)
        room.refresh(self.codec, num + update.appends, torch.cat([routed.target, appended], 2))
