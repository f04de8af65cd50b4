"""The per-layer decoding state contract shared by every mixer.

A mixer's ``forward(x, state=None, ctx=None)`` returns ``(y, state)``. The state is a small
dataclass of tensors (batch first) and integer counters. This base class gives every such state
the same four abilities, derived from its fields, so no mixer writes them by hand:

* ``nbytes()``: bytes held by its tensors (what decode memory costs);
* ``select(batch_indices)``: keep / reorder / repeat batch rows (beam search, dropping finished rows);
* ``state_dict()``: a flat ``{name: tensor}`` dict (integers become 0-d int64 tensors) that
  safetensors can store;
* ``load_state_dict(d)``: the inverse, with a clear error naming a missing, unexpected or
  mis-shaped entry.

``kind`` tells which family the state belongs to (see ``STATE_KINDS``); the model-level state
reports bytes per kind.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from blocks.errors import InputError

STATE_KINDS = ("recurrent", "kvm", "window", "kv")
"""recurrent: fixed size (LRNN matrices, conv / token-shift tails); kvm: grows, bounded by a budget;
window: sliding-window attention, fixed; kv: full attention, grows with every token."""


S = TypeVar("S", bound="LayerState")


class StateError(InputError):
    """A state does not fit the layer or the saved data it is loaded from."""


@dataclasses.dataclass
class LayerState:
    """Base of every per-layer state. Subclasses are dataclasses whose fields are tensors with the
    batch on dim 0, ``None`` (an absent optional tensor) or ``int`` counters."""

    kind: ClassVar[str] = ""

    def _fields(self) -> dict[str, Tensor | int | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        for value in self._fields().values():
            if isinstance(value, Tensor):
                return value.shape[0]
        raise StateError(f"{type(self).__name__} holds no tensor, so it has no batch size")

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._fields().values() if isinstance(v, Tensor))

    def select(self: S, batch_indices: Tensor | list[int]) -> S:
        """A new state holding the rows ``batch_indices`` (any order, repeats allowed)."""
        index = torch.as_tensor(batch_indices, dtype=torch.long)
        if index.dim() != 1:
            raise StateError(f"select() takes a 1-d list of batch indices, got shape {tuple(index.shape)}")
        if index.numel() and (index.min() < 0 or index.max() >= self.batch_size):
            raise StateError(f"select(): batch index out of range for a state of batch {self.batch_size}")
        return dataclasses.replace(
            self,
            **{
                name: value.index_select(0, index.to(value.device))
                for name, value in self._fields().items()
                if isinstance(value, Tensor)
            },
        )

    def to(self: S, *args, **kwargs) -> S:
        """Move tensors like ``Tensor.to`` (device and/or dtype of floating tensors)."""
        device = torch.empty(0).to(*args, **kwargs).device  # where integer tensors go (dtype left alone)
        moved = {}
        for name, value in self._fields().items():
            if isinstance(value, Tensor):
                moved[name] = value.to(*args, **kwargs) if value.is_floating_point() else value.to(device)
        return dataclasses.replace(self, **moved)

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, value in self._fields().items():
            if isinstance(value, Tensor):
                out[name] = value.detach().contiguous()
            elif isinstance(value, bool | int):
                out[name] = torch.tensor(int(value), dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls: type[S], data: dict[str, Tensor]) -> S:
        """Build a state from ``state_dict()`` output, checking names (shapes are the layer's job)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unexpected = sorted(set(data) - set(fields))
        if unexpected:
            raise StateError(f"{cls.__name__}: unexpected entries {unexpected}; expected {sorted(fields)}")
        values = {}
        for name, field in fields.items():
            if name not in data:
                if field.default is None:
                    values[name] = None
                    continue
                raise StateError(f"{cls.__name__}: missing entry '{name}' (saved by another layer kind?)")
            value = data[name]
            values[name] = int(value.item()) if field.type in ("int", int) else value
        return cls(**values)

    def load_state_dict(self, data: dict[str, Tensor]) -> None:
        """Replace this state's contents in place with ``data`` (same entries, same shapes)."""
        loaded = type(self).from_state_dict(data)
        for name, value in self._fields().items():
            new = getattr(loaded, name)
            if isinstance(value, Tensor) and isinstance(new, Tensor) and not _same_layout(value, new):
                raise StateError(
                    f"{type(self).__name__}.{name}: saved shape {tuple(new.shape)} does not fit "
                    f"this layer's {tuple(value.shape)} (different model configuration?)"
                )
            setattr(self, name, new)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same rank and sizes, except the batch (dim 0) and, for rank >= 3, the token/slot axis (dim -2),
    which legitimately differ between states of one layer (attention caches, KVM slots)."""
    if a.dim() != b.dim():
        return False
    skip = {0} | ({a.dim() - 2} if a.dim() >= 3 else set())
    return all(a.shape[i] == b.shape[i] for i in range(a.dim()) if i not in skip)
