"""Document boundaries inside packed rows (``Documents``), in the forms the mixers need to restart there.

Training packs several documents into each row of a (B, T) batch. With document isolation, every
mixer treats each document as if it were a sequence of its own: its state starts empty at the
document's first token, positions (RoPE, KVM's chunk schedule) count from there, and no token reads
another document. A batch says where its documents begin with one (B, T) bool mask, ``starts``:
True at the first token of every document, and always in column 0 (a row begins a document, or the
part of one that the row holds).

The mask is the form that travels with the data: it splits with the rows (micro-batches,
data-parallel ranks) and is what the resets read directly (token shift, short convolutions, the
restart of recurrent states). ``Documents`` derives from it, once per forward and on demand:

* ``positions`` (B, T): each token's position inside its document;
* ``segments`` (B, T): which document of its row a token belongs to (for attention masks);
* ``cu_seqlens`` (N + 1,): fla's varlen convention, the cumulative document offsets over the
  flattened B*T tokens, for kernels that take the rows flattened into one (``flat`` / ``unflat``);
* ``spans``: (row, begin, end) of every document, as Python ints (for per-document runs).

The model puts a ``Documents`` into the per-forward ``ctx`` under ``CONTEXT_KEY``; a mixer reads it
with ``documents_in`` (blocks/registry.py states the contract).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from blocks.errors import InputError
from blocks.state import LayerState, StateError

CONTEXT_KEY = "documents"


class Documents:
    """Where documents start in a (B, T) batch of packed rows (see the module docstring)."""

    def __init__(self, starts: Tensor):
        if not isinstance(starts, Tensor) or starts.dim() != 2 or starts.dtype != torch.bool or not starts.shape[1]:
            raise InputError(f"document starts must be a bool tensor of shape (batch, time >= 1), got "
                             f"{getattr(starts, 'dtype', type(starts).__name__)} {tuple(getattr(starts, 'shape', ()))}")
        if not bool(starts[:, 0].all()):
            raise InputError("document starts: column 0 must be True in every row (a row begins a document)")
        self.starts = starts

    @property
    def shape(self) -> torch.Size:
        """(B, T), the shape of the token batch."""
        return self.starts.shape

    @functools.cached_property
    def positions(self) -> Tensor:
        """(B, T) long: each token's position inside its document (0 at its first token)."""
        index = torch.arange(self.shape[1], device=self.starts.device).expand(self.shape)  # (B, T)
        first = torch.where(self.starts, index, 0).cummax(dim=1).values  # (B, T) where each token's document begins
        return index - first

    @functools.cached_property
    def segments(self) -> Tensor:
        """(B, T) long: the number of the document each token belongs to, counted from 0 in each row."""
        return self.starts.long().cumsum(dim=1) - 1

    @functools.cached_property
    def cu_seqlens(self) -> Tensor:
        """(N + 1,) long: fla's cumulative document offsets over the B*T flattened tokens, 0 first, B*T last."""
        begins = self.starts.flatten().nonzero().flatten()  # (N,)
        return torch.cat([begins, begins.new_tensor([self.starts.numel()])])

    @functools.cached_property
    def spans(self) -> list[tuple[int, int, int]]:
        """(row, begin, end) of every document, row by row; begin and end are positions in the row."""
        bounds = self.cu_seqlens.tolist()
        length = self.shape[1]
        return [(begin // length, begin % length, begin % length + end - begin)
                for begin, end in zip(bounds[:-1], bounds[1:])]

    def restart(self, previous: Tensor, first: Tensor | float) -> Tensor:
        """Token shift inside documents: ``previous`` (B, T, F), each token's predecessor in the row,
        with ``first`` (a tensor broadcasting to it, or a number) at the first token of each document."""
        return torch.where(self.starts[..., None], first, previous)

    def flat(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (1, B*T, ...): the rows as one sequence, the layout ``cu_seqlens`` indexes."""
        return x.flatten(0, 1)[None]

    def unflat(self, x: Tensor) -> Tensor:
        """(1, B*T, ...) -> (B, T, ...), the inverse of ``flat``."""
        return x[0].unflatten(0, self.shape)


def documents_in(ctx: dict | None, x: Tensor, state: LayerState | None, layer: str) -> Documents | None:
    """The ``Documents`` a mixer's ``ctx`` carries for its input ``x`` (B, T, D), or None. A packed
    batch of documents starts from no state, so ``state`` must be None; ``layer`` names the caller."""
    documents = None if ctx is None else ctx.get(CONTEXT_KEY)
    if documents is None:
        return None
    if state is not None:
        raise StateError(f"{layer}: a batch of packed documents (ctx['{CONTEXT_KEY}']) starts every document "
                         "from an empty history; it cannot continue a state (pass state=None)")
    if tuple(documents.shape) != tuple(x.shape[:2]):
        raise InputError(f"{layer}: ctx['{CONTEXT_KEY}'] describes a batch of shape {tuple(documents.shape)}, "
                         f"the input has (batch, time) = {tuple(x.shape[:2])}")
    return documents
