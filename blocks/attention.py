"""Softmax attention baselines: full causal, sliding window and block sliding window, with a KV state.

They share ``ProjectedAttention`` with KVM (projections, GQA, q/k norm, RoPE, token shift, value
residual), so a Llama teacher, the paper's GPTAlpha baselines and KVM differ only in the
attention pattern. All three keep the raw rotated keys and values they may still need:

* ``attention`` (symbol A): every past token; the state grows with every token (kind ``kv``).
* ``swa`` (symbol S): the last ``window`` tokens, a query at t sees ``[t - window + 1, t]``.
* ``bswa`` (symbol B): block sliding window as in KVM: a query in chunk c sees chunks
  ``c - n_bswa_chunks + 1 .. c`` causally (between ``(Nb-1)*C + 1`` and ``Nb*C`` tokens); it is
  KVM without the compressed state.

Both window attentions take ``sink_len`` (StreamingLLM's attention sinks, Xiao et al. 2023): a query
also sees the first ``sink_len`` tokens of the sequence, kept exactly, besides its window. A state
holds those tokens apart from the window (``WindowState.sink_keys``), so the window still grows in
place; a query block that needs both joins them for its attention call (in decoding, a copy of the
window per step).

Without autograd a cache grows in place: it lives in a buffer with room to spare
(``blocks.token_buffer``), so a decode step writes its token instead of copying the cache.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.config import require_non_negative, require_positive
from blocks.document_attention import document_attention
from blocks.documents import documents_in
from blocks.projection import ProjectedAttention, ProjectionConfig
from blocks.registry import register_mixer
from blocks.state import LayerState, StateError
from blocks.token_buffer import TokenBuffer, extend

# Query rows per attention call when a window mask is needed (bounds the mask's memory).
_QUERY_BLOCK = 1024
# A cache moved into a new buffer gets room for this share of its tokens more (at least
# SPARE_MIN_TOKENS): moving copies the cache, so it happens once per that many decode steps.
SPARE_SHARE, SPARE_MIN_TOKENS = 0.125, 256


@dataclasses.dataclass
class KVCacheState(LayerState):
    """Raw rotated keys/values of the tokens a layer may still attend to."""

    kind = "kv"
    keys: Tensor  # (B, Hkv, L, d): tokens [seq_len - L, seq_len)
    values: Tensor  # (B, Hkv, L, dv)
    seq_len: int
    prev_q: Tensor | None = None  # token-shift tails (B, H*d), if token shift is on
    prev_k: Tensor | None = None
    prev_v: Tensor | None = None
    # The buffer keys/values are views of, where they are (without autograd); not a field:
    # state_dict, select and to give plain tensors, whose next append copies them into a new one.
    buffer: ClassVar[TokenBuffer | None] = None


@dataclasses.dataclass
class WindowState(KVCacheState):
    """A KV cache trimmed to a sliding window, and the sink tokens: fixed size."""

    kind = "window"
    sink_keys: Tensor | None = None  # (B, Hkv, S, d): tokens [0, S), S = min(sink_len, seq_len); None without sinks
    sink_values: Tensor | None = None  # (B, Hkv, S, dv)


@dataclasses.dataclass(frozen=True)
class AttentionConfig(ProjectionConfig):
    """Full causal softmax attention."""


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(ProjectionConfig):
    window: int = 256  # tokens a query sees, itself included
    sink_len: int = 0  # first tokens of the sequence every query sees besides its window (attention sinks)

    def __post_init__(self):
        super().__post_init__()
        require_positive("window", self.window)
        require_non_negative("sink_len", self.sink_len)


@dataclasses.dataclass(frozen=True)
class BlockSlidingWindowConfig(ProjectionConfig):
    chunk_len: int = 256
    n_bswa_chunks: int = 2
    sink_len: int = 0  # first tokens of the sequence every query sees besides its window (attention sinks)

    def __post_init__(self):
        super().__post_init__()
        require_positive("chunk_len", self.chunk_len)
        require_positive("n_bswa_chunks", self.n_bswa_chunks)
        require_non_negative("sink_len", self.sink_len)


class SoftmaxAttention(ProjectedAttention):
    """Shared forward; subclasses say which past positions a query sees and how much to keep."""

    state_cls: type[KVCacheState] = KVCacheState
    windowed = False  # True when queries see only part of the past (lowest_visible is not None)
    sink_len = 0  # first tokens of the sequence every query sees besides its window (``WindowedAttention``)

    def lowest_visible(self, pos: Tensor) -> Tensor | None:
        """Earliest key position each query position may see (None: all of the past), sinks aside."""
        return None

    def keep_from(self, n_tokens: int) -> int:
        """First position of the window a state must keep after ``n_tokens`` tokens."""
        return 0

    def held(self, n_tokens: int) -> tuple[int, int]:
        """What a state holds after ``n_tokens`` tokens, as (s, w): the sink tokens [0, s) and the window
        [w, n_tokens), s <= w (they meet while the window reaches back to the sinks)."""
        sinks = min(self.sink_len, n_tokens)
        return sinks, max(sinks, self.keep_from(n_tokens))

    def forward(self, x: Tensor, state: KVCacheState | None = None, ctx: dict | None = None
                ) -> tuple[Tensor, KVCacheState | None]:
        """x: (B, T, d_model) -> y (B, T, d_model), the state after these T tokens (None for packed
        documents, ``ctx["documents"]``, which each attend within themselves from an empty history)."""
        self._check_input(x)
        if state is not None and not isinstance(state, self.state_cls):
            raise StateError(f"{type(self).__name__} got a {type(state).__name__}, expected a {self.state_cls.__name__}")
        documents = documents_in(ctx, x, state, type(self).__name__)
        n0 = 0 if state is None else state.seq_len
        q, k, v, new_tails = self.project(x, n0, self.shift_tails(state), ctx)  # (B, H, T, d), (B, Hkv, T, d) x2
        if documents is not None:
            lowest = self.lowest_visible if self.windowed else None
            o = document_attention(q, k, v, documents, scale=self.scale, lowest_visible=lowest, sink_len=self.sink_len)
            return self.output(o), None
        buffer = None  # where the cache grows in place (None: with autograd, or no state yet)
        k_start = self.held(n0)[1]  # the position of the first key of k (0 without a state)
        if state is not None:
            self._check_state(state, k, n0)
            need = state.keys.shape[2] + k.shape[2]
            buffer, (k, v) = extend(state.buffer, (state.keys, state.values), (k, v),
                                    max(SPARE_MIN_TOKENS, int(need * SPARE_SHARE)))
        n1 = n0 + x.shape[1]
        sinks = self._sinks(state, k, v, k_start, n1)
        o = self._attend(q, k, v, n0, k_start, sinks)
        keep = self.held(n1)[1] - k_start
        new_state = self.state_cls(k[:, :, keep:], v[:, :, keep:], n1)
        if sinks is not None:
            new_state.sink_keys, new_state.sink_values = sinks
        new_state.buffer = buffer
        self.store_shift_tails(new_state, new_tails)
        return self.output(o), new_state

    def _check_state(self, state: KVCacheState, k: Tensor, n_tokens: int) -> None:
        """Refuse a state that does not hold what ``held(n_tokens)`` says, for k's (B, Hkv, T, d) batch and heads."""
        sinks, begin = self.held(n_tokens)
        sink_keys = getattr(state, "sink_keys", None)
        held_sinks = 0 if sink_keys is None else sink_keys.shape[2]
        if (state.keys.shape[:2] != k.shape[:2] or state.keys.shape[2] != n_tokens - begin or held_sinks != sinks
                or (sink_keys is not None and sink_keys.shape[:2] != k.shape[:2])):
            held = "" if sink_keys is None else f" and sink keys {tuple(sink_keys.shape)}"
            raise StateError(f"{type(self).__name__}: state keys {tuple(state.keys.shape)}{held} do not fit batch "
                             f"{k.shape[0]}, {k.shape[1]} kv heads, {n_tokens - begin} cached and {sinks} sink tokens")

    def _sinks(self, state: KVCacheState | None, k: Tensor, v: Tensor, k_start: int, n_tokens: int
               ) -> tuple[Tensor, Tensor] | None:
        """Keys and values (B, Hkv, S, d) of the sink tokens [0, S), S = min(sink_len, n_tokens): the
        state's, completed from k, v (positions [k_start, ...)) while they were fewer (None without sinks)."""
        if not self.sink_len:
            return None
        end = min(self.sink_len, n_tokens)
        held_k, held_v = (None, None) if state is None else (state.sink_keys, state.sink_values)
        if held_k is None:
            held_k, held_v = k[:, :, :0], v[:, :, :0]
        held_k, held_v = held_k.to(k.dtype), held_v.to(v.dtype)
        if held_k.shape[2] == end:
            return held_k, held_v
        fresh = end - k_start  # sinks still filling: the state held no window, k starts right after them
        return torch.cat([held_k, k[:, :, :fresh]], 2), torch.cat([held_v, v[:, :, :fresh]], 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int,
                sinks: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """q (B, H, T, d) at positions [q_start, ...); k, v (B, Hkv, L, d) at [k_start, ...); ``sinks``:
        keys and values (B, Hkv, S, d) of the sink tokens [0, S), which k may hold too -> (B, H, T, dv)."""
        gqa = self.num_heads != self.num_kv_heads
        t = q.shape[2]
        if not self.windowed and q_start == k_start:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        outs = []
        for lo in range(0, t, _QUERY_BLOCK):
            hi = min(t, lo + _QUERY_BLOCK)
            pos = torch.arange(q_start + lo, q_start + hi, device=q.device)[:, None]  # (Lq, 1)
            lowest = self.lowest_visible(pos)
            k_lo = 0 if lowest is None else max(int(lowest.min()) - k_start, 0)
            k_hi = q_start + hi - k_start
            key_pos = torch.arange(k_start + k_lo, k_start + k_hi, device=q.device)  # (Lk,)
            keys, values = k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi]
            n_sinks = 0 if sinks is None else min(sinks[0].shape[2], k_start + k_lo)  # sinks before that slice
            if n_sinks:
                key_pos = torch.cat([torch.arange(n_sinks, device=q.device), key_pos])
                keys = torch.cat([sinks[0][:, :, :n_sinks], keys], 2)
                values = torch.cat([sinks[1][:, :, :n_sinks], values], 2)
            allowed = key_pos <= pos  # (Lq, Lk)
            if lowest is not None:
                allowed = allowed & ((key_pos >= lowest) | (key_pos < self.sink_len))
            outs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], keys, values, attn_mask=allowed,
                                                       scale=self.scale, enable_gqa=gqa))
        return torch.cat(outs, dim=2)


@register_mixer("attention", symbol="A", state=KVCacheState)
class CausalAttention(SoftmaxAttention):
    """Full causal softmax attention (the transformer baseline and conversion teacher)."""

    Config = AttentionConfig


class WindowedAttention(SoftmaxAttention):
    """The window attentions' common part: a fixed-size state, and the config's ``sink_len`` sink tokens."""

    state_cls = WindowState
    windowed = True

    @property
    def sink_len(self) -> int:
        return self.config.sink_len


@register_mixer("swa", symbol="S", state=WindowState)
class SlidingWindowAttention(WindowedAttention):
    """Sliding-window softmax attention: a query sees the last ``window`` tokens and the sinks."""

    Config = SlidingWindowConfig

    def lowest_visible(self, pos: Tensor) -> Tensor:
        return pos - self.config.window + 1

    def keep_from(self, n_tokens: int) -> int:
        return max(0, n_tokens - self.config.window + 1)


@register_mixer("bswa", symbol="B", state=WindowState)
class BlockSlidingWindowAttention(WindowedAttention):
    """Block sliding-window softmax attention: a query sees its chunk, the previous Nb-1 chunks and the sinks."""

    Config = BlockSlidingWindowConfig

    def lowest_visible(self, pos: Tensor) -> Tensor:
        c = self.config.chunk_len
        return (torch.div(pos, c, rounding_mode="floor") - self.config.n_bswa_chunks + 1) * c

    def keep_from(self, n_tokens: int) -> int:
        # The next query (position n_tokens) is the lowest that the rest of the sequence can start from.
        c = self.config.chunk_len
        return max(0, (n_tokens // c - self.config.n_bswa_chunks + 1) * c)
