"""``HybridCache``: the model's decoding states as a transformers ``Cache``, so ``generate`` carries them.

A ``ModelState`` holds one state per layer, each of its own kind (recurrent matrices, KVM slots and
window, KV caches), and the same number of tokens in every row: padding fed into a recurrent or KVM
state would change it for good. Transformers batches prompts of different lengths by left padding,
so the cache keeps the rows in *groups* of equal length, one ``ModelState`` per group: a row starts
at its first real token, and every row of a group has read the same tokens count since. Each
forward runs once per group (rows of equal length share one batch), and every layer's state of every
row continues, whatever its kind.

``get_seq_length`` is what transformers means by it: the input positions read so far, padding
included, which ``generate`` uses to cut the inputs it has not fed yet.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache

from hybrid.model.state import ModelState


@dataclasses.dataclass
class RowGroup:
    """``rows``: the batch rows this group holds, in the order of ``state``'s rows (None before the
    group's first forward)."""

    rows: list[int]
    state: ModelState | None


class HybridCache(Cache):
    """The groups of rows and their states (see the module docstring); empty until the first forward."""

    is_compileable = False

    def __init__(self):
        super().__init__(layers=[])
        self.groups: list[RowGroup] = []
        self.columns = 0  # input positions read, padding included

    def __repr__(self) -> str:
        return f"HybridCache(columns={self.columns}, rows by tokens read={self.tokens_by_row()})"

    def tokens_by_row(self) -> list[int]:
        """The real tokens each row's state holds, in batch order."""
        count: dict[int, int] = {}
        for group in self.groups:
            count.update(dict.fromkeys(group.rows, group.state.seq_len))
        return [count[row] for row in range(len(count))]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no fixed size: KVM and KV states grow, the others are fixed

    @property
    def batch_size(self) -> int:
        return sum(len(group.rows) for group in self.groups) if self.groups else -1

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("recurrent and KVM states cannot go back to an earlier position: HybridCache "
                                  "does not crop (decoding strategies that roll back, such as assisted "
                                  "generation, are not supported)")

    def reset(self) -> None:
        self.groups, self.columns = [], 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i of the new batch is row ``beam_idx[i]`` of the current one (beam search)."""
        sources = [int(i) for i in beam_idx]
        where = {row: (group, position) for group in self.groups for position, row in enumerate(group.rows)}
        picked: dict[int, tuple[list[int], list[int]]] = {}  # id(group) -> (new rows, positions in its state)
        groups = {id(group): group for group in self.groups}
        for new_row, source in enumerate(sources):
            group, position = where[source]
            rows, positions = picked.setdefault(id(group), ([], []))
            rows.append(new_row)
            positions.append(position)
        self.groups = [RowGroup(rows, groups[key].state.select(positions)) for key, (rows, positions) in picked.items()]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(self.batch_size).repeat_interleave(repeats))
