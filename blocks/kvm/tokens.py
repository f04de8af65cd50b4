"""The raw tokens a call holds (``RawTokens``): the state's window followed by the new tokens,
addressed by their absolute positions, as the chunk schedule names them."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class RawTokens(NamedTuple):
    """Rotated keys, values and merge gates of tokens [start, n1), one row per token."""

    keys: Tensor  # (B, Hkv, n1 - start, d)
    values: Tensor  # (B, Hkv, n1 - start, dv)
    gates: Tensor  # (B, Hkv, n1 - start, 1)
    start: int  # the position of row 0

    def between(self, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and gates of positions [lo, hi): views, no copy."""
        return *self.keys_values(lo, hi), self.gates[:, :, lo - self.start:hi - self.start]

    def keys_values(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions [lo, hi), as a read takes them: views, no copy."""
        rows = slice(lo - self.start, hi - self.start)
        return self.keys[:, :, rows], self.values[:, :, rows]
