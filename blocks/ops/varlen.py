"""Variable-length sequences for the chunked torch ops: fla's ``cu_seqlens`` laid out chunk-aligned.

fla's kernels take several sequences as one flattened row, ``x`` [1, total, ...], with
``cu_seqlens`` [N + 1] their cumulative offsets, and restart the recurrence at each sequence. The
torch ops work chunk by chunk, carrying the state across chunks in a loop (``scan_chunks``); they
keep sequences apart by giving each its own chunks: ``ChunkLayout`` places every sequence at a
chunk boundary of one of several *lanes* (rows of a batch), pads it with zero tokens to whole chunks
(a zero token leaves the state as it is: zero key and value, zero log decay), and the scan zeroes
the carried state of a lane at every chunk where a sequence begins. Inside a chunk nothing changes,
so each sequence is computed exactly as if it ran alone.

Lanes hold as many chunks as the longest sequence, which the loop over chunks takes no longer to
walk than that sequence alone; sequences go into the first lane with room for them, longest first
(first-fit decreasing, which leaves few lanes part empty), and each wastes less than one chunk of
padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ChunkLayout:
    """Where each token of ``total`` flattened tokens goes in [lanes, chunks * chunk] (see the module docstring)."""

    def __init__(self, cu_seqlens: Tensor, chunk: int, total: int, device: torch.device):
        bounds = [int(b) for b in cu_seqlens.tolist()]
        lengths = [end - begin for begin, end in zip(bounds[:-1], bounds[1:])]
        if (cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total
                or min(lengths) < 1):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to the {total} tokens of the flattened row, "
                             f"got {bounds[:8]}{' ...' if len(bounds) > 8 else ''}")
        counts = [-(-n // chunk) for n in lengths]  # chunks of each sequence
        self.chunk, self.chunks = chunk, max(counts)
        lanes, offsets, used = [0] * len(counts), [0] * len(counts), []  # used: chunks taken in each lane
        for i in sorted(range(len(counts)), key=lambda i: -counts[i]):  # first fit, longest first
            lane = next((j for j, taken in enumerate(used) if taken + counts[i] <= self.chunks), len(used))
            if lane == len(used):
                used.append(0)
            lanes[i], offsets[i] = lane, used[lane]
            used[lane] += counts[i]
        self.lanes = len(used)
        lane_of = torch.tensor(lanes, device=device)  # (N,)
        first_chunk = torch.tensor(offsets, device=device)  # (N,)
        self.last_chunk = first_chunk + torch.tensor(counts, device=device) - 1  # (N,)
        self.lane_of = lane_of
        begin = torch.tensor(bounds[:-1], device=device)  # (N,)
        shift = (lane_of * self.chunks + first_chunk) * chunk - begin  # (N,) destination minus source
        per_token = torch.repeat_interleave(shift, torch.tensor(lengths, device=device), output_size=total)
        self.dest = torch.arange(total, device=device) + per_token  # (total,) position in the lanes, flattened
        keep = torch.ones(self.lanes, self.chunks, device=device)
        keep[lane_of, first_chunk] = 0.0
        self.keep = keep  # (lanes, chunks): 0 where a sequence begins (the carried state is dropped)

    def spread(self, x: Tensor) -> Tensor:
        """x [1, total, *F] -> [lanes, chunks * chunk, *F], zero tokens where no sequence is."""
        out = x.new_zeros(self.lanes * self.chunks * self.chunk, *x.shape[2:])
        return out.index_copy(0, self.dest, x[0]).unflatten(0, (self.lanes, self.chunks * self.chunk))

    def collect(self, y: Tensor) -> Tensor:
        """y [lanes, chunks * chunk, *F] -> [1, total, *F], the inverse of ``spread`` on the tokens it placed."""
        return y.flatten(0, 1).index_select(0, self.dest)[None]

    def final_states(self, ends: Tensor) -> Tensor:
        """ends [lanes, H, chunks, K, V], the state after each chunk -> [N, H, K, V], each sequence's last."""
        return ends[self.lane_of, :, self.last_chunk]


def check_varlen(op: str, q: Tensor, initial_state: Tensor | None) -> None:
    """What the torch ops need with ``cu_seqlens``: the sequences flattened into one row, no initial state."""
    if q.shape[0] != 1:
        raise ValueError(f"{op}: with cu_seqlens the sequences are one flattened row (batch 1), got batch {q.shape[0]}")
    if initial_state is not None:
        raise ValueError(f"{op}: the torch op starts every sequence of cu_seqlens from a zero state; "
                         "initial_state must be None")


def scan_chunks(state: Tensor, advance: Callable[[Tensor, int], Tensor], n_chunks: int,
                layout: ChunkLayout | None = None, final_states: bool = False) -> tuple[Tensor, Tensor | None]:
    """Carry a [B, H, K, V] state through ``n_chunks`` chunks, ``advance(state, n)`` giving the state
    after chunk n from the state before it. Returns the states entering each chunk [B, H, N, K, V] and
    the final state: after the last chunk, or with a ``layout`` (B = its lanes; the state is dropped
    where a sequence begins) each sequence's own [N_seq, H, K, V] when ``final_states``, else None."""
    starts, ends = [], []
    for n in range(n_chunks):
        if layout is not None:
            state = state * layout.keep[:, n, None, None, None]
        starts.append(state)
        state = advance(state, n)
        if final_states:
            ends.append(state)
    if layout is None:
        return torch.stack(starts, dim=2), state
    return torch.stack(starts, dim=2), layout.final_states(torch.stack(ends, dim=2)) if final_states else None
