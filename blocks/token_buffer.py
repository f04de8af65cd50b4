"""Preallocated storage for decoding states that grow along the token axis (dim 2).

A full-attention KV cache and KVM's raw window gain tokens at every decode step. Concatenating
them into new tensors copies everything held at every step (at 32k context, 6 heads x 128, 149 ms
per token and layer against 26.6 ms in place). A ``TokenBuffer`` holds tensors with room for more
tokens; a state's tensors are views of some of its tokens, and a step appends in place.

States stay values: a step never changes what an earlier state sees. Only the state whose views
end at the buffer's last written token may append in place; an older state continued again (a
branch: beam search, retrying a step) or one whose tensors came from elsewhere (``state_dict``,
``select``, ``to``) is copied into a new buffer instead. Autograd needs tensors no later step writes
to, so with autograd on ``extend`` concatenates, as before, and keeps no buffer.
A state's ``nbytes`` counts the tokens its views hold, not the buffer's spare room.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class TokenBuffer:
    """Tensors (B, H, capacity, *) sharing a token axis, of which tokens [0, used) are written."""

    def __init__(self, parts: Sequence[Tensor], capacity: int):
        n = parts[0].shape[2]
        self.parts = tuple(x.new_empty(*x.shape[:2], capacity, *x.shape[3:]) for x in parts)
        for buf, x in zip(self.parts, parts):
            buf[:, :, :n] = x
        self.used = n

    @property
    def capacity(self) -> int:
        return self.parts[0].shape[2]

    def ends_with(self, views: Sequence[Tensor]) -> bool:
        """Whether ``views`` are this buffer's tensors over its last written tokens, [used - L, used)."""
        return len(views) == len(self.parts) and all(
            x.dtype == buf.dtype and x.stride() == buf.stride() and x.shape[:2] == buf.shape[:2]
            and x.shape[3:] == buf.shape[3:] and x.shape[2] <= self.used
            and x.data_ptr() == buf[:, :, self.used - x.shape[2]:].data_ptr()
            for x, buf in zip(views, self.parts))

    def append(self, new: Sequence[Tensor], first: int) -> tuple[Tensor, ...]:
        """Write ``new`` (B, H, T, *) after the last token -> views of tokens [first, used) after it."""
        n, t = self.used, new[0].shape[2]
        for buf, x in zip(self.parts, new):
            buf[:, :, n:n + t] = x
        self.used = n + t
        return tuple(buf[:, :, first:self.used] for buf in self.parts)


def extend(buffer: TokenBuffer | None, held: Sequence[Tensor], new: Sequence[Tensor],
           spare: int) -> tuple[TokenBuffer | None, tuple[Tensor, ...]]:
    """``held`` (B, H, L, *) followed by ``new`` (B, H, T, *), as views of one buffer -> (the buffer,
    the views of its L + T tokens). ``buffer``: where ``held`` may live. In place when ``held`` ends
    that buffer and T more tokens fit (and inference mode allows the write); else a new buffer with
    room for ``spare`` tokens more, ``held`` copied in (in ``new``'s dtypes). With autograd on: their
    concatenation, and no buffer."""
    if torch.is_grad_enabled():
        return None, tuple(torch.cat([x.to(y.dtype), y], 2) for x, y in zip(held, new))
    t = new[0].shape[2]
    if (buffer is not None and buffer.ends_with(held) and buffer.used + t <= buffer.capacity
            and all(x.dtype == buf.dtype for x, buf in zip(new, buffer.parts))
            and (torch.is_inference_mode_enabled() or not buffer.parts[0].is_inference())):  # torch refuses that write
        return buffer, buffer.append(new, buffer.used - held[0].shape[2])
    buffer = TokenBuffer([x.to(y.dtype) for x, y in zip(held, new)], held[0].shape[2] + t + spare)
    return buffer, buffer.append(new, 0)
