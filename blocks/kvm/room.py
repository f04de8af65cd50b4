"""The slots of a call without autograd, in buffers sized for its final slot count (``Room``), so
that boundary updates write in place: key and value sums side by side, their read view, their
routing features and a scratch buffer for routing scores."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blocks.kvm.codec import SlotCodec, SlotReads, Slots
from blocks.kvm.routing import flat_rows


@dataclasses.dataclass
class Room:
    """Inference buffers for R slots, of which the first ``num`` are in use: the slot sums, updated
    in place, and their read view, whose rows are recomputed only where an update touched them."""

    sums: Tensor  # (B, Hkv, R, d + dv): key sums | value sums, side by side so that a merge is one index_add
    lens: Tensor  # (B, Hkv, R, 1) fp32
    read_keys: Tensor  # (B, Hkv, R, d): state_key_norm(keys)
    read_values: Tensor  # (B, Hkv, R, dv): the values as attention reads them, in the model dtype
    read_bias: Tensor | None  # (B, Hkv, R) fp32: the slots' logit bias (the mean read), or None
    features: Tensor  # (B, Hkv, R, r) fp32: slot_features(read_keys), the slots as routing reads them
    scores: Tensor  # (B * Hkv * R * C,) fp32 scratch for routing scores: one buffer, not a fresh one per update

    @classmethod
    def around(cls, codec: SlotCodec, slots: Slots, rows: int, dtype: torch.dtype) -> Room:
        """A copy of the slots at the start of a room of ``rows`` slots; ``dtype``: the dtype the
        attention reads values in."""
        (b, h, num, d), dv = slots.keys.shape, slots.values.shape[-1]
        sums = slots.keys.new_empty(b, h, rows, d + dv, dtype=torch.promote_types(slots.keys.dtype, slots.values.dtype))
        sums[:, :, :num, :d], sums[:, :, :num, d:] = slots.keys, slots.values
        lens = slots.lens.new_empty(b, h, rows, 1)
        lens[:, :, :num] = slots.lens
        read_keys, read_values = sums.new_empty(b, h, rows, d), sums.new_empty(b, h, rows, dv, dtype=dtype)
        reads = codec.read(*slots, dtype)
        read_keys[:, :, :num], read_values[:, :, :num] = reads.keys, reads.values
        read_bias = None
        if reads.bias is not None:
            read_bias = lens.new_empty(b, h, rows)
            read_bias[:, :, :num] = reads.bias
        features = codec.slot_features(read_keys[:, :, :num])
        room_features = features.new_empty(b, h, rows, features.shape[-1])
        room_features[:, :, :num] = features
        scores = features.new_empty(b * h * codec.config.chunk_len * rows)
        return cls(sums, lens, read_keys, read_values, read_bias, room_features, scores)

    @property
    def buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Sums, lens, read keys, read values and features: the room as the C kernels take it."""
        return self.sums, self.lens, self.read_keys, self.read_values, self.features

    def slots(self, num: int) -> Slots:
        """The first ``num`` slots, as views."""
        d = self.read_keys.shape[-1]
        return Slots(self.sums[:, :, :num, :d], self.sums[:, :, :num, d:], self.lens[:, :, :num])

    def reads(self, num: int) -> SlotReads:
        """The first ``num`` slots as attention reads them (views)."""
        bias = None if self.read_bias is None else self.read_bias[:, :, :num]
        return SlotReads(self.read_keys[:, :, :num], self.read_values[:, :, :num], bias)

    def append(self, num: int, keys: Tensor, values: Tensor, lens: Tensor) -> None:
        """New slots (B, Hkv, A, *) written after the first ``num``; their read view is left to the caller."""
        d, end = keys.shape[-1], num + keys.shape[2]
        self.sums[:, :, num:end, :d], self.sums[:, :, num:end, d:], self.lens[:, :, num:end] = keys, values, lens

    def refresh(self, codec: SlotCodec, num: int, touched: Tensor) -> None:
        """Recompute the read view of the first ``num`` slots where an update touched them (B, Hkv, M),
        repeats allowed; the whole view when that is most of it (gathering rows costs more than it saves)."""
        d = self.read_keys.shape[-1]
        if 2 * touched.shape[2] >= num:
            reads = codec.read(*self.slots(num), self.read_values.dtype)
            news = (reads.keys, reads.values, codec.slot_features(reads.keys), reads.bias)
            for name, new in zip(("read_keys", "read_values", "features", "read_bias"), news):
                if new is None:
                    continue
                if num == self.sums.shape[2]:  # the view spans the whole room: keep the new tensors as they are
                    setattr(self, name, new)
                else:
                    getattr(self, name)[:, :, :num] = new
            return
        flat = flat_rows(self.sums, touched)  # (B*Hkv*M,)
        rows = lambda buf: buf.view(-1, buf.shape[-1]).index_select(0, flat)  # noqa: E731
        sums = rows(self.sums)  # (B*Hkv*M, d + dv)
        reads = codec.read(sums[:, :d], sums[:, d:], rows(self.lens), self.read_values.dtype)
        for view, new in zip((self.read_keys, self.read_values, self.features),
                             (reads.keys, reads.values, codec.slot_features(reads.keys))):
            view.view(-1, view.shape[-1]).index_copy_(0, flat, new)
        if reads.bias is not None:
            self.read_bias.view(-1).index_copy_(0, flat, reads.bias)
