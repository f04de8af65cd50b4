"""A literal, unoptimised transcription of the published KVM prefill (docs/kvm.md §3, §5–§7), used as an
independent oracle for ``blocks.kvm``: one query chunk at a time, state updates between chunks,
one SDPA call over [state ; window] per chunk. It shares no code with the implementation under test
(its bugs would have to be the same bugs by accident)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_prefill(q, k, v, g, *, chunk_len, n_bswa_chunks, sink_len, rope_dim, norm, budget, window_temp=None,
                      state_temp=None, use_vlens=True):
    """q, k, v: (B, H, T, d); g: (B, H, T, 1); budget(ctx_len, available, current) -> target slots.
    Returns (out (B, H, T, d), s_k, s_v, s_len)."""
    b, h, t, d = q.shape
    C, W = chunk_len, chunk_len * n_bswa_chunks
    wt = torch.ones(h) if window_temp is None else window_temp
    st = torch.ones(h) if state_temp is None else state_temp

    def bswa_begin(n):
        return max(0, math.ceil(n / C) * C - W)

    def prepare(x):
        x = x.clone()
        x[..., :rope_dim] = 0
        return norm(x)

    front = min(t, W)
    outs = [F.scaled_dot_product_attention(q[:, :, :front], k[:, :, :front] * wt.view(1, h, 1, 1), v[:, :, :front],
                                           is_causal=True)]
    first = min(t, C)
    s_k, s_v = prepare(k[:, :, :first]), v[:, :, :first]
    s_len = v[:, :, :first].norm(dim=-1, keepdim=True) if use_vlens else torch.ones(b, h, first, 1)
    covered = first
    for qb in range(front, t, C):
        qe = min(t, qb + C)
        bb = bswa_begin(qe)
        assert bb == covered, "coverage drifted"
        keys = torch.cat([norm(s_k) * st.view(1, h, 1, 1), k[:, :, bb:qe] * wt.view(1, h, 1, 1)], 2)
        vals_state = F.normalize(s_v, dim=-1) * s_len if use_vlens else s_v / s_len
        vals = torch.cat([vals_state, v[:, :, bb:qe]], 2)
        lq, lk = qe - qb, keys.shape[2]
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # lower-right causal
        outs.append(F.scaled_dot_product_attention(q[:, :, qb:qe], keys, vals, attn_mask=mask))
        nb = bswa_begin(min(t, qe + C))
        if nb <= bb:
            continue
        ku = prepare(k[:, :, bb:nb])
        kg, vg = ku * g[:, :, bb:nb], v[:, :, bb:nb] * g[:, :, bb:nb]
        n_app = min(max(budget(qe, nb, s_k.shape[2]) - s_k.shape[2], 0), C)
        merge_rows = torch.arange(C).expand(b, h, C)
        if n_app:
            sim = (ku @ norm(s_k).transpose(-1, -2)).amax(-1)  # (B, H, C)
            app = sim.topk(n_app, dim=-1, largest=False).indices.sort(-1).values
            merge_rows = sim.topk(C - n_app, dim=-1, largest=True).indices.sort(-1).values
            take = lambda x, idx: x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
            s_k = torch.cat([s_k, take(kg, app)], 2)
            s_v = torch.cat([s_v, take(vg, app)], 2)
            s_len = torch.cat([s_len, take(vg, app).norm(dim=-1, keepdim=True) if use_vlens
                               else torch.ones(b, h, n_app, 1)], 2)
        routing_keys = norm(s_k)  # every merge of this chunk routes against the post-append state
        for bi in range(b):  # token by token, as a dense one-hot sum would do it
            for hi in range(h):
                for j in merge_rows[bi, hi].tolist():
                    logits = ku[bi, hi, j] @ routing_keys[bi, hi].T
                    logits[:sink_len] = -torch.inf
                    slot = int(logits.argmax())
                    s_k[bi, hi, slot] = s_k[bi, hi, slot] + kg[bi, hi, j]
                    s_v[bi, hi, slot] = s_v[bi, hi, slot] + vg[bi, hi, j]
                    if not use_vlens:
                        s_len[bi, hi, slot] += 1
        covered = nb
    return torch.cat(outs, 2), s_k, s_v, s_len
