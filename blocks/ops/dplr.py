"""The generalized delta rule with a diagonal-plus-low-rank transition (RWKV-7's recurrence).

Per head, with a fp32 state ``S`` of shape [K, V] and, for every token, a per-key log-space decay
``w_t <= 0`` [K], vectors ``q_t, k_t, a_t, b_t`` [K] and ``v_t`` [V]::

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T (q_t * scale)

i.e. ``S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T``: the low-rank term reads the state
*before* this token's decay. These are the semantics of fla's ``chunk_dplr_delta_rule`` /
``fused_recurrent_dplr_delta_rule`` and of its ``dplr_recurrence`` reference (fla's docstrings
write the transposed form ``S_t = S_{t-1} (D_t + alpha_t beta_t^T) + v_t k_t^T`` with
``alpha = a``, ``beta = b``). RWKV-7 uses ``a = -kk``, ``b = kk * iclr`` (``kk`` the L2-normalised
removal key, ``iclr`` the in-context learning rate), ``w = -0.6065 * sigmoid(.)`` and ``scale = 1``.

The torch path is chunked. Writing ``z_t = a_t^T S_{t-1}`` turns the step into a gated linear
recurrence with two rank-one writes, ``k_t v_t^T`` and ``b_t z_t^T``; inside a chunk the ``z`` of
all tokens follow from one unit-lower-triangular solve, ``(I - M_ab) Z = (a * exp(G_excl)) S0 +
M_ak V``, where the ``M`` matrices are decay-weighted inner products between the tokens of a chunk.
Those products need the per-key decay ``exp(G_i - G_j)`` of every pair. When the cumulative log
decay inside every chunk stays within ``SAFE_SPAN`` (always for RWKV-7, whose per-token decay is
bounded by ``-exp(-1/2)``: 39 over 64 tokens), it is split into two factors around the chunk's mid
decay, each at most ``exp(SAFE_SPAN / 2)``, and the products are plain matmuls. Stronger decays
(any ``w <= 0`` is allowed) switch to 16-token chunks where every pair's decay is formed exactly as
``exp`` of a non-positive number (O(C^2 K) memory). Either way the numbers agree to fp32 rounding.
Across chunks the state map is affine, ``S_next = F S + G``, computed for all chunks in parallel,
so the sequential part is one [K, K] @ [K, V] matmul per chunk.

Layout: q, k, a, b, w [B, T, H, K]; v [B, T, H, V]; states [B, H, K, V] fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.ops.backend import resolve_backend
from blocks.ops.chunks import across_chunks, compute_dtype, to_chunks
from blocks.ops.varlen import ChunkLayout, check_varlen

DEFAULT_CHUNK_SIZE = 64
EXACT_CHUNK_SIZE = 16
SAFE_SPAN = 60.0  # largest |cumulative log decay| inside a chunk for which decays are factored


def dplr_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    w: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    w_lower_bound: float | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the DPLR delta rule over ``T`` tokens, starting from ``initial_state`` (zeros if ``None``).

    Args:
        q, k: [B, T, H, K] queries (RWKV's ``r``) and keys.
        v: [B, T, H, V] values.
        a, b: [B, T, H, K] the low-rank transition ``b a^T``.
        w: [B, T, H, K] per-key log-space decay, ``<= 0``.
        scale: multiplies q; ``None`` means ``K ** -0.5`` (fla's default; RWKV-7 passes 1.0).
        initial_state: [B, H, K, V], any float dtype (the op computes in fp32, fp64 for fp64 inputs).
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk of the torch path (16 where decays are too strong to factor).
        w_lower_bound: a promise that ``w >= w_lower_bound`` everywhere (RWKV-7: ``-exp(-0.5)``);
            only the fla path uses it, to pick its faster 64-token chunks.
        backend: ``"auto"`` (fla on CUDA, torch elsewhere), ``"torch"`` or ``"fla"``.
        cu_seqlens: [N + 1] offsets of N sequences in one flattened row (B = 1), fla's varlen
            convention: each starts from a zero state (the torch path needs ``initial_state`` None) and
            the final state is each sequence's, [N, H, K, V] (blocks/ops/varlen.py).

    Returns:
        ``(o, final_state)``: o [B, T, H, V] in q's dtype; final_state [B, H, K, V] fp32 (fp64 for fp64
        inputs) or ``None``.
    """
    B, T, H, K = _check_inputs(q, k, v, a, b, w, initial_state, chunk_size)
    if scale is None:
        scale = K**-0.5
    if resolve_backend(backend, q.device) == "fla":
        return _fla_dplr(q, k, v, a, b, w, scale, initial_state, output_final_state, w_lower_bound, cu_seqlens)
    if cu_seqlens is not None:
        check_varlen("dplr_delta_rule", q, initial_state)
    if initial_state is None:
        initial_state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    # autocast would turn the compute dtype's products back into bf16, where torch has no triangular solve
    with torch.autocast(q.device.type, enabled=False):
        if cu_seqlens is not None:
            return _varlen(q, k, v, a, b, w, scale, chunk_size, cu_seqlens, output_final_state)
        if T == 0:
            o, state = v.new_empty(v.shape).to(q.dtype), initial_state.to(compute_dtype(q))
        elif T == 1:
            o, state = _step(q, k, v, a, b, w, scale, initial_state)
        else:
            o, state = _chunked(q, k, v, a, b, w, scale, initial_state, chunk_size)
    return o, (state if output_final_state else None)


def _check_inputs(q, k, v, a, b, w, initial_state, chunk_size) -> tuple[int, int, int, int]:
    if q.dim() != 4:
        raise ValueError(f"dplr_delta_rule: q must be [B, T, H, K], got {tuple(q.shape)}")
    B, T, H, K = q.shape
    for name, x in (("k", k), ("a", a), ("b", b), ("w", w)):
        if x.shape != q.shape:
            raise ValueError(f"dplr_delta_rule: {name} must have q's shape [B, T, H, K] = {tuple(q.shape)}, "
                             f"got {tuple(x.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"dplr_delta_rule: v must be [B, T, H, V] with {(B, T, H)} first, got {tuple(v.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"dplr_delta_rule: initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"dplr_delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
    return B, T, H, K


def _step(q, k, v, a, b, w, scale: float, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token (decode): the recurrence written out directly."""
    out_dtype = q.dtype
    dtype = compute_dtype(q)
    q, k, v, a, b, w = (x[:, 0].to(dtype) for x in (q, k, v, a, b, w))  # [B, H, *]
    state = state.to(dtype)  # [B, H, K, V]
    z = torch.einsum("bhk,bhkv->bhv", a, state)  # [B, H, V] low-rank read of the previous state
    state = w.exp()[..., None] * state + b[..., :, None] * z[..., None, :] + k[..., :, None] * v[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state, q * scale)  # [B, H, V]
    return o[:, None].to(out_dtype), state


def _varlen(q, k, v, a, b, w, scale: float, chunk_size: int, cu_seqlens: Tensor,
            final_states: bool) -> tuple[Tensor, Tensor | None]:
    """The sequences of ``cu_seqlens`` (one flattened row) laid out chunk-aligned in lanes
    (blocks/ops/varlen.py), in chunks of ``chunk_size`` or, where decays are too strong to factor, 16."""
    T, H, K = q.shape[1:]
    layout = ChunkLayout(cu_seqlens, chunk_size, T, q.device)
    if chunk_size > EXACT_CHUNK_SIZE and not _factorable(layout.spread(w), chunk_size):
        layout = ChunkLayout(cu_seqlens, EXACT_CHUNK_SIZE, T, q.device)
    lanes = [layout.spread(x) for x in (q, k, v, a, b, w)]  # [lanes, N * C, H, *]
    state = q.new_zeros(layout.lanes, H, K, v.shape[-1], dtype=torch.float32)
    o, state = _chunked(*lanes, scale, state, layout.chunk, layout, final_states)
    return layout.collect(o), state


def _factorable(w: Tensor, chunk: int) -> bool:
    """Whether the cumulative log decay inside every chunk of ``chunk`` tokens of w [B, T, H, K] stays
    within ``SAFE_SPAN`` (w <= 0, so the chunk's total is its largest)."""
    T = w.shape[1]
    total = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, -T % chunk)).unflatten(1, (-1, chunk)).sum(2)  # [B, N, H, K]
    return bool(total.abs().amax() <= SAFE_SPAN)


def _chunked(q, k, v, a, b, w, scale: float, state: Tensor, chunk_size: int, layout: ChunkLayout | None = None,
             final_states: bool = False) -> tuple[Tensor, Tensor]:
    """Chunk-parallel solve, then one affine state update per chunk (see the module docstring). With a
    ``layout`` (whose chunks were chosen by ``_factorable``) the state restarts where it says, and the
    final state is each sequence's (``final_states``) or None."""
    out_dtype = q.dtype
    T, K = q.shape[1], q.shape[3]
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)  # chunks
    dtype = compute_dtype(q)
    # [B, H, N, C, *]: the zero tokens that fill the last chunk (w = k = b = 0) leave the state unchanged
    w_chunks = to_chunks(w, N, C, dtype)  # [B, H, N, C, K]
    G = w_chunks.cumsum(-2)  # [B, H, N, C, K] log decay of the state from the chunk start through token i
    factorable = bool(G.abs().amax() <= SAFE_SPAN)
    if not factorable and C > EXACT_CHUNK_SIZE and layout is None:
        return _chunked(q, k, v, a, b, w, scale, state, EXACT_CHUNK_SIZE)  # decays too strong to factor
    G_excl = G - w_chunks  # [B, H, N, C, K] ... through token i - 1 (what a_i reads)
    G_last = G[..., -1, :]  # [B, H, N, K]
    q, k, v, a, b = (to_chunks(x, N, C, dtype) for x in (q, k, v, a, b))  # [B, H, N, C, K|V]
    q = q * scale

    intra = _intra_factored if factorable else _intra_exact
    M_qk, M_qb, M_ak, M_ab = intra(q, k, a, b, G, G_excl)  # [B, H, N, C, C] each

    # z = W @ S0 + U  with  (I - M_ab) [W | U] = [a * exp(G_excl) | M_ak @ V]
    rhs = torch.cat([a * G_excl.exp(), M_ak @ v], dim=-1)  # [B, H, N, C, K + V]
    W, U = torch.linalg.solve_triangular(-M_ab, rhs, upper=False, unitriangular=True).split([K, V], dim=-1)

    q_start = q * G.exp() + M_qb @ W  # [B, H, N, C, K] how outputs read the chunk-start state
    o_intra = M_qk @ v + M_qb @ U  # [B, H, N, C, V]
    to_end = (G_last[..., None, :] - G).exp()  # [B, H, N, C, K] decay from token i to the chunk end
    k_end, b_end = k * to_end, b * to_end  # [B, H, N, C, K]
    F = torch.diag_embed(G_last.exp()) + b_end.mT @ W  # [B, H, N, K, K]   S_next = F @ S + Gm
    Gm = k_end.mT @ v + b_end.mT @ U  # [B, H, N, K, V]

    o, state = across_chunks(F, Gm, state, q_start, o_intra, T, layout, final_states)
    return o.to(out_dtype), state


def _intra_factored(q, k, a, b, G, G_excl):
    """Decay-weighted inner products inside each chunk as plain matmuls: ``exp(G_i - G_j)`` is split as
    ``exp(G_i - R) * exp(R - G_j)`` around the chunk's mid decay ``R = G_last / 2``, so each factor is at
    most ``exp(SAFE_SPAN / 2)`` and their product, for the pairs kept, exactly the decay (no overflow)."""
    C = q.shape[-2]
    ref = G[..., -1:, :] / 2  # [B, H, N, 1, K]
    down, up = (G - ref).exp(), (ref - G).exp()  # [B, H, N, C, K] each
    writes = torch.cat([k * up, b * up], dim=-2)  # [B, H, N, 2C, K] the two write keys, decayed back to R
    M_q = (q * down) @ writes.mT  # [B, H, N, C, 2C] token i's read of every write j
    M_a = (a * (G_excl - ref).exp()) @ writes.mT  # [B, H, N, C, 2C] token i's low-rank read
    idx = torch.arange(C, device=q.device)
    incl = (idx[None, :] <= idx[:, None]).repeat(1, 2)  # [C, 2C] pairs (i, j) with j <= i
    excl = (idx[None, :] < idx[:, None]).repeat(1, 2)  # [C, 2C] pairs with j < i
    M_q, M_a = M_q.masked_fill(~incl, 0.0), M_a.masked_fill(~excl, 0.0)
    return (*M_q.split(C, dim=-1), *M_a.split(C, dim=-1))


def _intra_exact(q, k, a, b, G, G_excl):
    """The same products with every pair's per-key decay formed as ``exp(<= 0)``: safe for any decay,
    O(C^2 K) memory, hence used on small chunks only (``EXACT_CHUNK_SIZE``)."""
    C = q.shape[-2]
    idx = torch.arange(C, device=q.device)
    incl = (idx[None, :] <= idx[:, None])[..., None]  # [C, C, 1] pairs (i, j) with j <= i
    excl = (idx[None, :] < idx[:, None])[..., None]  # [C, C, 1] pairs with j < i
    d_incl = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~incl, float("-inf")).exp()  # [B,H,N,C,C,K]
    d_excl = (G_excl[..., :, None, :] - G[..., None, :, :]).masked_fill(~excl, float("-inf")).exp()
    kb = torch.stack([k, b], dim=-3)  # [B, H, N, 2, C, K] the two write keys
    M_q = torch.einsum("bhnid,bhnijd,bhnsjd->bhnsij", q, d_incl, kb)  # [B, H, N, 2, C, C]
    M_a = torch.einsum("bhnid,bhnijd,bhnsjd->bhnsij", a, d_excl, kb)  # [B, H, N, 2, C, C]
    return (*M_q.unbind(-3), *M_a.unbind(-3))


def _fla_dplr(q, k, v, a, b, w, scale, initial_state, output_final_state, w_lower_bound, cu_seqlens):
    """fla's Triton kernels (CUDA): chunked while training or for long inputs, fused recurrent otherwise."""
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    if initial_state is not None:
        initial_state = initial_state.float()
    if torch.is_grad_enabled() or q.shape[1] >= 64:
        bound = {} if w_lower_bound is None else {"safe_gate": True, "lower_bound": w_lower_bound, "chunk_size": 64}
        return chunk_rwkv7(r=q, w=w, k=k, v=v, a=a, b=b, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, **bound)
    return fused_recurrent_rwkv7(r=q, w=w, k=k, v=v, a=a, b=b, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)
