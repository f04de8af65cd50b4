"""The gated delta rule (Gated DeltaNet's recurrence), chunked in pure PyTorch, or fla's kernels on CUDA.

Per head, with a fp32 state ``S`` of shape [K, V] and, for every token ``t``, a log-space decay
``g_t <= 0``, a write strength ``beta_t`` and vectors ``q_t, k_t`` [K], ``v_t`` [V]::

    S  <- exp(g_t) * S                    # forget
    v' =  beta_t * (v_t - S^T k_t)        # the part of v_t that the state does not predict yet
    S  <- S + k_t v'^T                    # delta-rule write
    o_t = S^T (q_t * scale)               # read, including the current token

These are the semantics of fla's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule``
with ``state_v_first=False`` (and of its ``naive_recurrent_gated_delta_rule``). Gate activation,
beta's sigmoid and the q/k L2 norm are the caller's job (the layer), not the op's.

The torch path is chunked so that CPU training does not loop over tokens. Inside a chunk of ``C``
tokens the writes are resolved at once in the WY / UT-transform form: with ``G`` the in-chunk
cumulative gate and ``A_ij = beta_i exp(G_i - G_j) k_i.k_j`` (j < i), the new values are
``V' = U - W S0`` where ``(I + A) [U | W] = [beta V | beta exp(G) K]`` (one triangular solve). Every
decay factor that is formed is ``exp`` of a non-positive number, so no gate value can overflow.
Across chunks the state map is affine, ``S_next = F S + G`` with [K, K] and [K, V] matrices
computed in parallel for all chunks, so the sequential part is one small matmul per chunk.

Layout: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; states [B, HV, K, V] fp32. ``HV``
may be a multiple of ``H`` (grouped value heads, as fla's GVA: value head ``i`` reads q/k head
``i // (HV // H)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.ops.backend import resolve_backend
from blocks.ops.chunks import across_chunks, compute_dtype, to_chunks
from blocks.ops.varlen import ChunkLayout, check_varlen

DEFAULT_CHUNK_SIZE = 64


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the gated delta rule over ``T`` tokens, starting from ``initial_state`` (zeros if ``None``).

    Args:
        q, k: [B, T, H, K] queries and keys (the layer L2-normalises them).
        v: [B, T, HV, V] values, ``HV`` a multiple of ``H``.
        g: [B, T, HV] log-space decay (``<= 0`` in use; ``exp(g)`` multiplies the state).
        beta: [B, T, HV] write strength (sigmoid output, or up to 2 with negative eigenvalues).
        scale: multiplies q; ``None`` means ``K ** -0.5`` (fla's default).
        initial_state: [B, HV, K, V], any float dtype (the op computes in fp32, fp64 for fp64 inputs).
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk of the torch path (the fla path uses fla's own).
        backend: ``"auto"`` (fla on CUDA, torch elsewhere), ``"torch"`` or ``"fla"``.
        cu_seqlens: [N + 1] offsets of N sequences in one flattened row (B = 1), fla's varlen
            convention: each starts from a zero state (the torch path needs ``initial_state`` None) and
            the final state is each sequence's, [N, HV, K, V] (blocks/ops/varlen.py).

    Returns:
        ``(o, final_state)``: o [B, T, HV, V] in q's dtype; final_state [B, HV, K, V] fp32 (fp64 for fp64
        inputs) or ``None``.
    """
    B, T, H, K = _check_inputs(q, k, v, g, beta, initial_state, chunk_size)
    if scale is None:
        scale = K**-0.5
    if resolve_backend(backend, q.device) == "fla":
        return _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)

    HV = v.shape[2]
    if HV != H:  # grouped value heads: value head i reads q/k head i // (HV // H)
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))  # [B, T, HV, K]
    if cu_seqlens is not None:
        check_varlen("gated_delta_rule", q, initial_state)
        layout = ChunkLayout(cu_seqlens, chunk_size, T, q.device)
        lanes = [layout.spread(x) for x in (q, k, v, g, beta)]  # [lanes, N * C, HV, *]
        state = q.new_zeros(layout.lanes, HV, K, v.shape[-1], dtype=torch.float32)
        o, state = _chunked(*lanes, scale, state, chunk_size, layout, output_final_state)
        return layout.collect(o), state
    if initial_state is None:
        initial_state = q.new_zeros(B, HV, K, v.shape[-1], dtype=torch.float32)
    if T == 0:
        o, state = v.new_empty(v.shape).to(q.dtype), initial_state.to(compute_dtype(q))
    elif T == 1:
        o, state = _step(q, k, v, g, beta, scale, initial_state)
    else:
        o, state = _chunked(q, k, v, g, beta, scale, initial_state, chunk_size)
    return o, (state if output_final_state else None)


def _check_inputs(q, k, v, g, beta, initial_state, chunk_size) -> tuple[int, int, int, int]:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"gated_delta_rule: q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % H:
        raise ValueError(f"gated_delta_rule: v must be [B={B}, T={T}, HV, V] with HV a multiple of H={H}, "
                         f"got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"gated_delta_rule: {name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, HV, K, V):
        raise ValueError(f"gated_delta_rule: initial_state must be [B, HV, K, V] = {(B, HV, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gated_delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
    return B, T, H, K


def _step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, state: Tensor):
    """One token (decode): the recurrence written out directly, no chunk bookkeeping."""
    out_dtype = q.dtype
    dtype = compute_dtype(q)
    q, k, v, g, beta = (x[:, 0].to(dtype) for x in (q, k, v, g, beta))  # [B, H, *]
    state = state.to(dtype) * g.exp()[..., None, None]  # [B, H, K, V]
    v_new = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))  # [B, H, V]
    state = state + k[..., :, None] * v_new[..., None, :]  # [B, H, K, V]
    o = torch.einsum("bhkv,bhk->bhv", state, q * scale)  # [B, H, V]
    return o[:, None].to(out_dtype), state


def _chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, state: Tensor,
             chunk_size: int, layout: ChunkLayout | None = None, final_states: bool = False) -> tuple[Tensor, Tensor]:
    """WY-form chunks in parallel, then one affine state update per chunk (see the module docstring).
    With a ``layout`` the state restarts where it says, and the final state is each sequence's
    (``final_states``) or None."""
    out_dtype = q.dtype
    T, K = q.shape[1], q.shape[3]
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)  # chunks
    dtype = compute_dtype(q)
    # [B, H, N, C, *]: the zero tokens that fill the last chunk (g = 0, k = 0, beta = 0) leave the state unchanged
    q, k, v, beta, g = (to_chunks(x, N, C, dtype) for x in (q, k, v, beta, g))
    q = q * scale  # [B, H, N, C, K]
    G = g.cumsum(-1)  # [B, H, N, C] cumulative log decay inside each chunk
    G_last = G[..., -1]  # [B, H, N]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]

    k_beta = k * beta[..., None]  # [B, H, N, C, K]
    A = ((k_beta @ k.mT) * decay).tril(-1)  # [B, H, N, C, C] strictly lower: earlier writes seen by token i
    rhs = torch.cat([v * beta[..., None], k_beta * G.exp()[..., None]], dim=-1)  # [B, H, N, C, V + K]
    U, W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)
    # new values of the chunk: V' = U - W @ S0   (U [.., C, V], W [.., C, K])

    P = (q @ k.mT) * decay  # [B, H, N, C, C] intra-chunk read weights, diagonal included
    q_start = q * G.exp()[..., None] - P @ W  # [B, H, N, C, K] how outputs read the chunk-start state
    o_intra = P @ U  # [B, H, N, C, V]
    k_end = k * (G_last[..., None] - G).exp()[..., None]  # [B, H, N, C, K] keys decayed to chunk end
    eye = torch.eye(K, device=q.device, dtype=dtype)
    F = G_last.exp()[..., None, None] * eye - k_end.mT @ W  # [B, H, N, K, K] S_next = F @ S + Gm
    Gm = k_end.mT @ U  # [B, H, N, K, V]

    o, state = across_chunks(F, Gm, state, q_start, o_intra, T, layout, final_states)
    return o.to(out_dtype), state


def _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """fla's Triton kernels (CUDA): chunked while training or for long inputs, fused recurrent otherwise."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    if initial_state is not None:
        initial_state = initial_state.float()
    kernel = chunk_gated_delta_rule if torch.is_grad_enabled() or q.shape[1] > 64 else fused_recurrent_gated_delta_rule
    return kernel(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, state_v_first=False, cu_seqlens=cu_seqlens)
