"""Gated linear attention (GLA) as a chunked pure-PyTorch op, and its dispatcher to fla's kernels.

The recurrence (fla's ``chunk_gla`` semantics, state layout [B, H, K, V], fp32)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ          o_t = S_tᵀ (q_t · scale)

with log-space gates ``g_t <= 0`` either per key (``g`` [B, T, H, K]: GLA) or one per head
(``g`` [B, T, H]: "simple GLA", which is also Mamba2's SSD with q=C, k=B, v=x·dt, g=A·dt,
scale=1). Inputs are [B, T, H, D].

The torch op works chunk by chunk (``chunk_size`` tokens): inside a chunk, outputs come from an
attention-like matrix; across chunks, only the [K, V] state is carried by a loop over chunks, so
the Python loop has T / chunk_size steps, not T. Every decay factor is an ``exp`` of a
*non-positive* number (a later cumulative gate minus an earlier one), so no intermediate can
overflow whatever the gates: per-key gates use secondary chunks (``sub_chunk`` tokens) whose
start serves as the reference point between sub-chunks, and an explicit [c, c, K] decay tensor
within a sub-chunk. A one-token call takes one recurrent step (decode).

``gla`` dispatches: fla's Triton kernels for CUDA tensors (``backend="auto"``/``"fla"``, imported
lazily), this torch op otherwise (the CPU path imports neither fla nor Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.ops.backend import resolve_backend
from blocks.ops.varlen import ChunkLayout, check_varlen, scan_chunks

CHUNK_SIZE_PER_HEAD = 64
CHUNK_SIZE_PER_KEY = 16
SUB_CHUNK = 4
"""Chunk sizes measured fastest for fwd+bwd at T=2048, H=4, K=V=64 on a 2-core CPU. Per-key
gates pay an elementwise [sub_chunk, sub_chunk, K] decay tensor per sub-chunk and a
[chunk/sub_chunk, sub_chunk, K] one per token between sub-chunks, so they prefer small chunks."""
FLA_RECURRENT_MAX_T = 64
"""fla's GLA layer uses its fused recurrent kernel up to this length, its chunk kernel above."""


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"gla: q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, length, heads, key_dim = q.shape
    if v.dim() != 4 or v.shape[:3] != (batch, length, heads):
        raise ValueError(f"gla: v must be [B, T, H, V] = [{batch}, {length}, {heads}, V], got {tuple(v.shape)}")
    if g.shape not in ((batch, length, heads, key_dim), (batch, length, heads)):
        raise ValueError(f"gla: g must be [B, T, H, K] (per-key gates) or [B, T, H] (per-head gates), "
                         f"got {tuple(g.shape)} for q {tuple(q.shape)}")
    expected = (batch, heads, key_dim, v.shape[-1])
    if initial_state is not None and initial_state.shape != expected:
        raise ValueError(f"gla: initial_state must be [B, H, K, V] = {list(expected)}, got {tuple(initial_state.shape)}")


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token: ``q, k`` [B, 1, H, K], ``v`` [B, 1, H, V], ``g`` [B, 1, H, K] or [B, 1, H];
    ``state`` [B, H, K, V] fp32 (``None``: zeros). Returns ``(o [B, 1, H, V], new_state)``."""
    q1, k1, v1 = q[:, 0].float(), k[:, 0].float(), v[:, 0].float()  # [B, H, K], [B, H, K], [B, H, V]
    decay = g[:, 0].float().exp()                                     # [B, H, K] or [B, H]
    decay = decay[..., None, None] if g.dim() == 3 else decay[..., None]  # broadcast over [K, V]
    new_state = k1[..., :, None] * v1[..., None, :]                   # [B, H, K, V]
    if state is not None:
        new_state = new_state + decay * state
    o = torch.einsum("bhk,bhkv->bhv", q1 * scale, new_state)          # [B, H, V]
    return o[:, None].to(v.dtype), new_state


def _intra_chunk_scores_per_key(q: Tensor, k: Tensor, G: Tensor, sub_chunk: int) -> Tensor:
    """Causal scores ``A_ij = Σ_d q_id k_jd exp(G_id - G_jd)`` (j <= i) inside each chunk.

    ``q, k, G``: [B, H, N, C, K] with ``G`` the cumulative gate within the chunk. Returns [B, H, N, C, C].
    Between sub-chunks a > b the decay factors through the cumulative gate just before sub-chunk a
    (``ref_a``): ``exp(G_i - ref_a) · exp(ref_a - G_j)``, both exponents <= 0. Within a sub-chunk
    the [c, c, K] decays are formed directly, masked before ``exp``.
    """
    chunk = q.shape[-2]
    n_sub = chunk // sub_chunk
    qs, ks, Gs = (t.unflatten(-2, (n_sub, sub_chunk)) for t in (q, k, G))  # [B, H, N, s, c, K]
    ref = F.pad(Gs[..., :-1, -1, :], (0, 0, 1, 0))                           # [B, H, N, s, K]
    q_ref = qs * torch.exp(Gs - ref[..., None, :])                           # [B, H, N, s, c, K]
    later = torch.ones(n_sub, n_sub, dtype=torch.bool, device=q.device).tril(-1)  # [s_a, s_b], a > b
    to_ref = ref[..., :, None, None, :] - Gs[..., None, :, :, :]             # [B, H, N, s_a, s_b, c, K]
    to_ref = to_ref.masked_fill(~later[:, :, None, None], float("-inf"))
    k_ref = ks[..., None, :, :, :] * torch.exp(to_ref)                       # [B, H, N, s_a, s_b, c, K]
    scores = torch.einsum("...aik,...abjk->...aibj", q_ref, k_ref)           # [B, H, N, s, c, s, c]

    causal = torch.ones(sub_chunk, sub_chunk, dtype=torch.bool, device=q.device).tril()  # [c_i, c_j]
    within = Gs[..., :, None, :] - Gs[..., None, :, :]                       # [B, H, N, s, c_i, c_j, K]
    within = within.masked_fill(~causal[:, :, None], float("-inf"))
    diag = ((qs[..., :, None, :] * torch.exp(within)) * ks[..., None, :, :]).sum(-1)  # [B, H, N, s, c, c]
    eye = torch.eye(n_sub, dtype=q.dtype, device=q.device)                   # [s_a, s_b]
    scores = scores + diag[..., :, :, None, :] * eye[:, None, :, None]       # place on diagonal blocks
    return scores.flatten(-4, -3).flatten(-2, -1)                            # [B, H, N, C, C]


def _intra_chunk_scores_per_head(q: Tensor, k: Tensor, G: Tensor) -> Tensor:
    """Causal scores ``A_ij = (q_i · k_j) exp(G_i - G_j)`` (j <= i) for one gate per head.

    ``q, k``: [B, H, N, C, K]; ``G``: [B, H, N, C]. Returns [B, H, N, C, C].
    """
    chunk = q.shape[-2]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))  # [B, H, N, C, C]
    return (q @ k.transpose(-1, -2)) * torch.exp(decay)


def chunk_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    sub_chunk: int = SUB_CHUNK,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked GLA in pure PyTorch (see the module docstring for the recurrence).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        g: log-space gates (<= 0), [B, T, H, K] per key or [B, T, H] per head.
        scale: multiplies q (fla's default is K ** -0.5; Mamba2 and RWKV-7 use 1).
        initial_state: [B, H, K, V] fp32 state before the first token, ``None`` for zeros.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk; ``None`` picks ``CHUNK_SIZE_PER_KEY`` or ``CHUNK_SIZE_PER_HEAD``.
        sub_chunk: tokens per secondary chunk (per-key gates only); must divide ``chunk_size``.
        cu_seqlens: [N + 1] offsets of N sequences in one flattened row (B = 1), fla's varlen
            convention: each starts from a zero state (``initial_state`` must be None) and the final
            state is each sequence's, [N, H, K, V] (blocks/ops/varlen.py).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None)``.
    """
    _check_inputs(q, k, v, g, initial_state)
    per_key = g.dim() == 4
    if chunk_size is None:
        chunk_size = CHUNK_SIZE_PER_KEY if per_key else CHUNK_SIZE_PER_HEAD
    if not per_key:
        sub_chunk = 1
    if chunk_size <= 0 or sub_chunk <= 0 or chunk_size % sub_chunk:
        raise ValueError(f"gla: sub_chunk ({sub_chunk}) must be positive and divide chunk_size ({chunk_size})")
    if cu_seqlens is not None:
        check_varlen("gla", q, initial_state)
        layout = ChunkLayout(cu_seqlens, chunk_size, q.shape[1], q.device)
        q, k, v, g = (layout.spread(t) for t in (q, k, v, g))  # [lanes, N * C, H, *]
        o, state = _chunked(q, k, v, g, scale, None, chunk_size, sub_chunk, layout, output_final_state)
        return layout.collect(o), state
    length = q.shape[1]
    if length == 1:
        o, state = recurrent_step(q, k, v, g, scale=scale, state=initial_state)
        return o, state if output_final_state else None
    chunk = min(chunk_size, -(-length // sub_chunk) * sub_chunk)  # short inputs: one small chunk
    return _chunked(q, k, v, g, scale, initial_state, chunk, sub_chunk, None, output_final_state)


def _chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, initial_state: Tensor | None, chunk: int,
             sub_chunk: int, layout: ChunkLayout | None, output_final_state: bool) -> tuple[Tensor, Tensor | None]:
    """``chunk_gla_torch`` in chunks of ``chunk`` tokens; with a ``layout``, q is [lanes, N * chunk, H, K]
    and the state restarts where the layout says."""
    batch, length, heads, key_dim = q.shape
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    per_key = g.dim() == 4

    def to_chunks(t: Tensor) -> Tensor:  # [B, T, H, *] -> [B, H, N, C, *] fp32, zero-padded
        t = t.float().transpose(1, 2)
        t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
        return t.unflatten(2, (n_chunks, chunk))

    # padded tokens have k = v = 0 and g = 0 (no decay): they leave the state unchanged
    qc, kc, vc, gc = to_chunks(q) * scale, to_chunks(k), to_chunks(v), to_chunks(g)
    G = gc.cumsum(dim=3)                                 # [B, H, N, C(, K)] cumulative gate in the chunk
    if per_key:
        scores = _intra_chunk_scores_per_key(qc, kc, G, sub_chunk)
    else:
        scores = _intra_chunk_scores_per_head(qc, kc, G)
        G = G[..., None]                                 # [B, H, N, C, 1] broadcasts over K
    o = scores @ vc                                      # [B, H, N, C, V] intra-chunk part

    G_end = G[..., -1:, :]                               # [B, H, N, 1, K|1] total gate of each chunk
    k_to_end = kc * torch.exp(G_end - G)                 # [B, H, N, C, K] decayed to the chunk end
    chunk_states = k_to_end.transpose(-1, -2) @ vc       # [B, H, N, K, V] each chunk's own contribution
    chunk_decay = torch.exp(G_end).transpose(-1, -2)     # [B, H, N, K|1, 1]
    state = initial_state.float() if initial_state is not None else qc.new_zeros(batch, heads, key_dim, vc.shape[-1])
    states_before, state = scan_chunks(  # [B, H, N, K, V] state entering each chunk
        state, lambda s, n: chunk_decay[:, :, n] * s + chunk_states[:, :, n], n_chunks, layout, output_final_state)
    o = o + (qc * torch.exp(G)) @ states_before          # inter-chunk part

    o = o.flatten(2, 3)[:, :, :length].transpose(1, 2)   # [B, T, H, V]
    return o.to(v.dtype), state if output_final_state else None


def gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """GLA on the best engine for q's device: fla's kernels on CUDA, ``chunk_gla_torch`` elsewhere.

    Same arguments and results as ``chunk_gla_torch``; ``backend`` is ``"auto"``, ``"torch"`` or
    ``"fla"`` (see ``blocks.ops.backend``). Per-key gates use fla's ``fused_recurrent_gla`` up to
    64 tokens and ``chunk_gla`` above (as fla's layer does); per-head gates use ``chunk_simple_gla``.
    ``cu_seqlens`` goes to either as fla defines it.
    """
    if resolve_backend(backend, q.device) == "torch":
        return chunk_gla_torch(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    _check_inputs(q, k, v, g, initial_state)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  state_v_first=False, cu_seqlens=cu_seqlens)
    if g.dim() == 3:
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v, g=g, **kwargs)
    if q.shape[1] <= FLA_RECURRENT_MAX_T:
        from fla.ops.gla import fused_recurrent_gla

        return fused_recurrent_gla(q, k, v, gk=g, **kwargs)
    from fla.ops.gla import chunk_gla

    return chunk_gla(q, k, v, g=g, **kwargs)
