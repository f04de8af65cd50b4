"""The chunk schedule, in integers only: where the window begins, how many slots the budget allows,
and, for one call over tokens [n0, n1), which chunks it reads, which boundary updates it runs and
how many tokens each appends. Every way of running a call follows the same ``CallSchedule``."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from blocks.kvm.config import KVMConfig


def window_begin(n_tokens: int, config: KVMConfig) -> int:
    """First position of the raw window once ``n_tokens`` tokens are processed (a chunk multiple)."""
    c = config.chunk_len
    return max(0, -(-n_tokens // c) * c - config.window_len)


def coverage(n_tokens: int, config: KVMConfig) -> int:
    """How many leading tokens the compressed state has absorbed after ``n_tokens`` tokens."""
    return max(min(n_tokens, config.chunk_len), window_begin(n_tokens, config))


def target_slots(config: KVMConfig, ctx_len: int, available: int, current: int) -> int:
    """The budget: how many slots the state may hold after an update at context ``ctx_len`` when
    ``available`` tokens have left the window. Never below ``current``: the state never shrinks."""
    if config.budget == "fixed":
        target = config.state_min_len
    else:
        if config.budget == "power_law":
            raw = math.floor(config.growth_factor * ctx_len ** config.growth_exponent)
        else:
            n = config.saturation_n
            raw = math.floor(n * ctx_len / (n + ctx_len))
        target = max(raw // config.round_down * config.round_down, config.state_min_len)
    target = min(target, available)
    if config.max_state_chunks is not None:
        target = min(target, config.chunk_len * config.max_state_chunks)
    return max(target, current)


def appending(config: KVMConfig, ctx_len: int, available: int, slots: int) -> int:
    """How many of the C tokens leaving the window become new slots, the state holding ``slots``:
    what the budget allows (the others merge)."""
    return min(max(target_slots(config, ctx_len, available, slots) - slots, 0), config.chunk_len)


def boundary_update(c: int, config: KVMConfig) -> tuple[int, int] | None:
    """The update run when token ``c * chunk_len`` arrives: ``(ctx_len, available)``, or None when
    chunk ``c`` starts no update (the first chunks are read with plain attention)."""
    if c <= config.n_bswa_chunks:
        return None
    overflow_chunk = c - config.n_bswa_chunks
    return c * config.chunk_len, (overflow_chunk + 1) * config.chunk_len


def runs_update(n0: int, n1: int, config: KVMConfig) -> bool:
    """Whether processing tokens [n0, n1) runs a state update (a decode step mostly does not)."""
    first = max(-(-n0 // config.chunk_len), config.n_bswa_chunks + 1)  # updates run at chunks > Nb
    return first * config.chunk_len < n1


def slots_after(n_tokens: int, config: KVMConfig) -> int:
    """Number of state slots after processing ``n_tokens`` tokens (no tensors involved)."""
    return _slots_after_chunks(-(-n_tokens // config.chunk_len), min(n_tokens, config.chunk_len), config)


@functools.lru_cache(maxsize=4096)
def _slots_after_chunks(n_chunks: int, first_chunk_tokens: int, config: KVMConfig) -> int:
    """``slots_after`` depends on the tokens only through these two numbers; cached because decode
    asks at every token and the loop runs over every chunk so far."""
    slots = first_chunk_tokens
    for c in range(config.n_bswa_chunks + 1, n_chunks):
        slots += appending(config, *boundary_update(c, config), slots)
    return slots


class Update(NamedTuple):
    """A boundary update: the chunk leaving the window folded into the state."""

    leaving: int  # position of the leaving chunk's first token
    slots: int  # slots before the update
    appends: int  # how many of its C tokens become new slots; the others merge


class ChunkStep(NamedTuple):
    """One chunk's share of a call: its update, when this call runs it, then its queries' read."""

    chunk: int  # c: the chunk holds tokens [c*C, (c+1)*C)
    update: Update | None
    queries: range  # positions of the chunk's queries in this call
    window: int  # position of the first key of the chunk's window: (c + 1 - Nb) * C
    slots: int  # slots its queries read (after its update)
    whole: bool  # all C tokens of the chunk are queries of this call

    @property
    def slots_before(self) -> int:
        return self.slots - (0 if self.update is None else self.update.appends)


class CallSchedule(NamedTuple):
    """What a call over tokens [n0, n1) does, in order: copy the first chunk's tokens into the state
    as they arrive, read the queries before position W with plain causal attention, then for each
    chunk from W on run its boundary update (if its first token is new) and read its queries."""

    n0: int
    n1: int
    start: int  # window_begin(n0): the first raw token the call holds (the state's window, then the new tokens)
    first_chunk: range  # new tokens of chunk 0, copied straight into slots
    plain: range  # queries before W, read with plain causal attention
    steps: tuple[ChunkStep, ...]  # the chunks from W on, in order
    end: int  # window_begin(n1): the first raw token the new state keeps
    slots_before: int  # slots_after(n0): the slots of the state the call continues
    slots: int  # slots after the call

    @property
    def runs_update(self) -> bool:
        return any(step.update is not None for step in self.steps)

    def runs(self) -> list[tuple[ChunkStep, ...]]:
        """The steps in order, grouped: each partial chunk alone, the whole chunks in a row together."""
        runs: list[tuple[ChunkStep, ...]] = []
        for step in self.steps:
            if step.whole and runs and runs[-1][-1].whole:
                runs[-1] += (step,)
            else:
                runs.append((step,))
        return runs

    def rows(self, positions: range) -> slice:
        """Absolute positions of this call's tokens -> their rows in its inputs and output."""
        return slice(positions.start - self.n0, positions.stop - self.n0)


def plan_call(n0: int, n1: int, config: KVMConfig) -> CallSchedule:
    """The schedule of a call that continues a state of ``n0`` tokens up to ``n1``."""
    chunk, nb, window = config.chunk_len, config.n_bswa_chunks, config.window_len
    slots_before = slots_after(n0, config)
    slots = max(slots_before, min(n1, chunk))  # with the new tokens of chunk 0, copied in
    steps = []
    for c in range(max(n0, window) // chunk, (n1 - 1) // chunk + 1 if n1 > window else 0):
        boundary, update = boundary_update(c, config), None
        if boundary is not None and c * chunk >= n0:  # this boundary's first token is new: update now
            update = Update((c - nb) * chunk, slots, appending(config, *boundary, slots))
            slots += update.appends
        queries = range(max(n0, c * chunk), min(n1, (c + 1) * chunk))
        whole = len(queries) == chunk
        steps.append(ChunkStep(c, update, queries, (c + 1 - nb) * chunk, slots, whole))
    return CallSchedule(n0, n1, window_begin(n0, config), range(n0, max(n0, min(n1, chunk))),
                        range(n0, max(n0, min(n1, window))), tuple(steps), window_begin(n1, config), slots_before,
                        slots)
