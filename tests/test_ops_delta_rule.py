"""blocks.ops.delta_rule: the chunked gated delta rule against a token loop, fla's naive references
and (through Triton's interpreter) fla's own kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocks.ops.backend import BackendError
from blocks.ops.delta_rule import gated_delta_rule
from fla_interpreter import requires_fla_interpreter, requires_triton, run_with_fla_kernels
from mixer_checks import assert_close
from op_checks import check_gradients_equal_the_token_loop

CHUNK = 16


def recurrent_oracle(q, k, v, g, beta, scale, initial_state):
    """The defining recurrence, one token at a time (fp64 inside), state [B, HV, K, V]."""
    H, HV = q.shape[2], v.shape[2]
    q, k = (x.double().repeat_interleave(HV // H, dim=2) for x in (q, k))
    v, g, beta, S = v.double(), g.double(), beta.double(), initial_state.double()
    outputs = []
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        v_new = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * v_new[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(outputs, dim=1), S


def make_inputs(B=2, T=20, H=2, HV=2, K=8, V=6, gate_scale=1.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, HV, generator=gen) * gate_scale
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g, beta)], h0


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, 2 * CHUNK + 3])
@pytest.mark.parametrize("HV", [2, 4], ids=["heads", "grouped-values"])
def test_chunked_equals_token_loop(T, HV):
    (q, k, v, g, beta), h0 = make_inputs(T=T, HV=HV)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=CHUNK)
    o_ref, state_ref = recurrent_oracle(q, k, v, g, beta, 8**-0.5, h0)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(o, o_ref, what="output")
    assert_close(state, state_ref, what="final state")


def test_default_chunk_size_and_no_initial_state():
    (q, k, v, g, beta), h0 = make_inputs(T=2 * 64 + 3, B=1, H=1, HV=1)
    o, state = gated_delta_rule(q, k, v, g, beta, scale=0.7, output_final_state=True)
    o_ref, state_ref = recurrent_oracle(q, k, v, g, beta, 0.7, torch.zeros_like(h0))
    assert_close(o, o_ref, what="output")
    assert_close(state, state_ref, what="final state")


def test_extreme_gates_stay_finite_and_exact():
    """Decays down to exp(-80) per token: every factor the op forms is exp(<= 0), nothing overflows."""
    (q, k, v, g, beta), h0 = make_inputs(T=40, gate_scale=80.0)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=CHUNK)
    o_ref, state_ref = recurrent_oracle(q, k, v, g, beta, 8**-0.5, h0)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert_close(o, o_ref, what="output")
    assert_close(state, state_ref, what="final state")


def test_continuing_from_the_final_state_equals_one_call():
    (q, k, v, g, beta), h0 = make_inputs(T=37)
    full, full_state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=CHUNK)
    state, pieces = h0, []
    for lo, hi in ((0, 1), (1, 18), (18, 37)):
        o, state = gated_delta_rule(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi],
                                    initial_state=state, output_final_state=True, chunk_size=CHUNK)
        pieces.append(o)
    assert_close(torch.cat(pieces, dim=1), full, what="output in pieces")
    assert_close(state, full_state, what="final state in pieces")


def test_gradients_equal_the_token_loop():
    inputs, h0 = make_inputs(T=2 * CHUNK + 3, HV=4)
    check_gradients_equal_the_token_loop(gated_delta_rule, recurrent_oracle, inputs, h0, 8**-0.5,
                                         ("q", "k", "v", "g", "beta", "initial_state"), rtol=1e-4, chunk_size=CHUNK)


def test_half_precision_inputs_keep_an_fp32_state():
    (q, k, v, g, beta), h0 = make_inputs(T=20, dtype=torch.bfloat16)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=CHUNK)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, _ = recurrent_oracle(q, k, v, g, beta, 8**-0.5, h0)
    assert_close(o, o_ref, rtol=2e-2, what="bf16 output")


def test_zero_tokens_return_the_state_unchanged():
    (q, k, v, g, beta), h0 = make_inputs(T=0)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 2, 6) and torch.equal(state, h0)


def test_bad_inputs_are_refused_clearly():
    (q, k, v, g, beta), h0 = make_inputs(T=5)
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[..., :1], beta)
    with pytest.raises(ValueError, match="HV a multiple of H"):
        gated_delta_rule(q, k, v[:, :, :1].expand(-1, -1, 3, -1), g, beta)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=h0.mT)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(BackendError, match="CUDA"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")


@requires_triton
@pytest.mark.parity
def test_equals_fla_naive_references():
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

    (q, k, v, g, beta), h0 = make_inputs(T=100, K=16, V=32)
    o, state = gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True)
    # fla's recurrent reference takes beta before g
    o_rec, state_rec = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=h0,
                                                        output_final_state=True)
    o_chunk, state_chunk = naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0,
                                                        output_final_state=True)
    assert_close(o, o_rec, what="output vs naive_recurrent_gated_delta_rule")
    assert_close(state, state_rec, what="state vs naive_recurrent_gated_delta_rule")
    assert_close(o, o_chunk, what="output vs naive_chunk_gated_delta_rule")
    assert_close(state, state_chunk, what="state vs naive_chunk_gated_delta_rule")


def _fla_kernel_case(inputs, h0, w_o, w_s):
    """In the interpreter child: fla's chunk and fused-recurrent kernels, outputs and gradients."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    leaves = [x.clone().requires_grad_() for x in (*inputs, h0)]
    q, k, v, g, beta, state0 = leaves
    o, state = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, initial_state=state0, output_final_state=True)
    grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)
    with torch.no_grad():  # keywords: fla 0.6's fused_recurrent takes (q, k, v, g, gk, gv, beta, ...)
        o_rec, state_rec = fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, initial_state=state0,
                                                            output_final_state=True)
    return {"o": o.detach(), "state": state.detach(), "grads": grads, "o_rec": o_rec, "state_rec": state_rec}


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
def test_equals_fla_triton_kernels():
    inputs, h0 = make_inputs(T=100, H=2, HV=4, K=16, V=32)
    w_o, w_s = torch.randn(2, 100, 4, 32), torch.randn(2, 4, 16, 32)
    fla = run_with_fla_kernels(_fla_kernel_case, inputs=inputs, h0=h0, w_o=w_o, w_s=w_s)

    leaves = [x.clone().requires_grad_() for x in (*inputs, h0)]
    o, state = gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)
    assert_close(o, fla["o"], what="output vs chunk_gated_delta_rule")
    assert_close(state, fla["state"], what="state vs chunk_gated_delta_rule")
    assert_close(o, fla["o_rec"], what="output vs fused_recurrent_gated_delta_rule")
    assert_close(state, fla["state_rec"], what="state vs fused_recurrent_gated_delta_rule")
    for name, grad, ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, fla["grads"]):
        assert_close(grad, ref, rtol=1e-4, what=f"d/d{name} vs chunk_gated_delta_rule")
