"""blocks.ops.gla: the chunked GLA / simple-GLA op against a token loop, fla's naive references and
(through Triton's interpreter) fla's own kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocks.ops.backend import BackendError
from blocks.ops.gla import CHUNK_SIZE_PER_HEAD, CHUNK_SIZE_PER_KEY, chunk_gla_torch, gla
from fla_interpreter import requires_fla_interpreter, requires_triton, run_with_fla_kernels
from mixer_checks import assert_close
from op_checks import check_gradients_equal_the_token_loop


def recurrent_oracle(q, k, v, g, scale, initial_state=None):
    """The defining recurrence one token at a time, in fp64; state [B, H, K, V]."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    if g.dim() == 3:
        g = g[..., None].expand_as(k)
    S = torch.zeros(*q.shape[:1], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    S = S if initial_state is None else initial_state.double()
    outputs = []
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(outputs, dim=1), S


def make_inputs(B=2, T=20, H=2, K=8, V=6, per_key=True, gate_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    logits = torch.randn(B, T, H, K, generator=gen) if per_key else torch.randn(B, T, H, generator=gen)
    g = F.logsigmoid(logits) * gate_scale
    h0 = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, g, h0


GATES = pytest.mark.parametrize("per_key", [True, False], ids=["per-key", "per-head"])


@GATES
@pytest.mark.parametrize("T", [1, 3, CHUNK_SIZE_PER_KEY - 1, CHUNK_SIZE_PER_KEY, CHUNK_SIZE_PER_KEY + 1,
                               CHUNK_SIZE_PER_HEAD, 2 * CHUNK_SIZE_PER_HEAD + 3])
def test_chunked_equals_token_loop(T, per_key):
    q, k, v, g, h0 = make_inputs(T=T, per_key=per_key)
    o, state = chunk_gla_torch(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    o_ref, state_ref = recurrent_oracle(q, k, v, g, 0.3, h0)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(o, o_ref, what="output")
    assert_close(state, state_ref, what="final state")


@GATES
def test_gradients_equal_token_loop(per_key):
    q, k, v, g, h0 = make_inputs(T=37, per_key=per_key)
    check_gradients_equal_the_token_loop(chunk_gla_torch, recurrent_oracle, (q, k, v, g), h0, 0.5,
                                         ("q", "k", "v", "g", "initial_state"), rtol=2e-5)


@GATES
@pytest.mark.parametrize("chunk_size,sub_chunk", [(8, 2), (32, 8), (64, 64)])
def test_chunk_sizes_agree(per_key, chunk_size, sub_chunk):
    q, k, v, g, h0 = make_inputs(T=70, per_key=per_key)
    o, state = chunk_gla_torch(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True,
                               chunk_size=chunk_size, sub_chunk=sub_chunk)
    o_ref, state_ref = recurrent_oracle(q, k, v, g, 0.3, h0)
    assert_close(o, o_ref, what=f"output, chunk {chunk_size} / sub-chunk {sub_chunk}")
    assert_close(state, state_ref, what=f"state, chunk {chunk_size} / sub-chunk {sub_chunk}")


@GATES
def test_strong_decay_stays_finite_and_exact(per_key):
    """Gates of -50 per token: a naive exp(-cumsum) factorisation would overflow within two tokens."""
    q, k, v, g, h0 = make_inputs(T=150, per_key=per_key, gate_scale=50.0)
    o, state = chunk_gla_torch(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=True)
    o_ref, state_ref = recurrent_oracle(q, k, v, g, 1.0, h0)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert_close(o, o_ref, what="output under strong decay")
    assert_close(state, state_ref, what="state under strong decay")


def test_without_initial_or_final_state():
    q, k, v, g, _ = make_inputs(T=21)
    o, state = chunk_gla_torch(q, k, v, g, scale=0.3)
    assert state is None
    assert_close(o, recurrent_oracle(q, k, v, g, 0.3)[0])


def test_output_keeps_input_dtype_state_is_fp32():
    q, k, v, g, h0 = (x.double() for x in make_inputs(T=18))
    o, state = chunk_gla_torch(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float64 and state.dtype == torch.float32


def test_bad_inputs_are_refused_clearly():
    q, k, v, g, h0 = make_inputs(T=5)
    with pytest.raises(ValueError, match="q and k"):
        chunk_gla_torch(q, k[:, :, :1], v, g, scale=1.0)
    with pytest.raises(ValueError, match="v must be"):
        chunk_gla_torch(q, k, v[:, :4], g, scale=1.0)
    with pytest.raises(ValueError, match="g must be"):
        chunk_gla_torch(q, k, v, g[..., :3], scale=1.0)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gla_torch(q, k, v, g, scale=1.0, initial_state=h0.transpose(-1, -2))
    with pytest.raises(ValueError, match="sub_chunk"):
        chunk_gla_torch(q, k, v, g, scale=1.0, chunk_size=16, sub_chunk=5)


def test_dispatcher_runs_torch_on_cpu_and_refuses_fla():
    q, k, v, g, h0 = make_inputs(T=19)
    o, state = gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    o_ref, state_ref = chunk_gla_torch(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(state, state_ref)
    with pytest.raises(BackendError, match="CUDA"):
        gla(q, k, v, g, scale=0.3, backend="fla")


@requires_triton
@GATES
def test_equals_fla_naive_references(per_key):
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla, naive_recurrent_simple_gla

    q, k, v, g, h0 = make_inputs(T=100, H=2, K=16, V=32, per_key=per_key)
    o, state = chunk_gla_torch(q, k, v, g, scale=16**-0.5, initial_state=h0, output_final_state=True)
    if per_key:  # fla's naive GLA fixes the scale at K ** -0.5
        references = {"naive_recurrent_gla": naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)}
    else:
        references = {
            "naive_recurrent_simple_gla": naive_recurrent_simple_gla(q, k, v, g, scale=16**-0.5, initial_state=h0,
                                                                     output_final_state=True),
            "naive_chunk_simple_gla": naive_chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                                             scale=16**-0.5),
        }
    for name, (o_ref, state_ref) in references.items():
        assert_close(o, o_ref, what=f"output vs {name}")
        assert_close(state, state_ref, what=f"state vs {name}")


def _fla_kernel_case(inputs_per_key, inputs_per_head, h0, w_o, w_s):
    """In the interpreter child: fla's GLA kernels on the given inputs (fwd, final state, grads)."""
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.simple_gla import chunk_simple_gla

    results = {}
    for name, kernel, inputs, gate_arg in (("chunk_gla", chunk_gla, inputs_per_key, "g"),
                                           ("chunk_simple_gla", chunk_simple_gla, inputs_per_head, "g")):
        leaves = [x.clone().requires_grad_() for x in (*inputs, h0)]
        q, k, v, g, state0 = leaves
        o, state = kernel(q, k, v, **{gate_arg: g}, scale=0.25, initial_state=state0, output_final_state=True,
                          state_v_first=False)
        grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)
        results[name] = {"o": o.detach(), "state": state.detach(), "grads": grads}
    with torch.no_grad():
        q, k, v, g = inputs_per_key
        o, state = fused_recurrent_gla(q, k, v, gk=g, scale=0.25, initial_state=h0, output_final_state=True,
                                       state_v_first=False)
    results["fused_recurrent_gla"] = {"o": o, "state": state}
    return results


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
def test_equals_fla_triton_kernels():
    """fla's chunk_gla / fused_recurrent_gla / chunk_simple_gla (real Triton code, interpreted on CPU):
    outputs, final states, and gradients of q, k, v, g and the initial state."""
    q, k, v, g, h0 = make_inputs(B=1, T=80, H=2, K=16, V=16)
    g_head = make_inputs(B=1, T=80, H=2, K=16, V=16, per_key=False)[3]
    w_o, w_s = torch.randn(1, 80, 2, 16), torch.randn(1, 2, 16, 16)
    fla = run_with_fla_kernels(_fla_kernel_case, inputs_per_key=(q, k, v, g), inputs_per_head=(q, k, v, g_head),
                               h0=h0, w_o=w_o, w_s=w_s)
    for name, gate in (("chunk_gla", g), ("chunk_simple_gla", g_head)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gate, h0)]
        o, state = chunk_gla_torch(*leaves[:4], scale=0.25, initial_state=leaves[4], output_final_state=True)
        grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)
        assert_close(o, fla[name]["o"], what=f"output vs {name}")
        assert_close(state, fla[name]["state"], what=f"state vs {name}")
        for arg, grad, ref in zip(("q", "k", "v", "g", "initial_state"), grads, fla[name]["grads"]):
            assert_close(grad, ref, rtol=1e-4, what=f"d/d{arg} vs {name}")
    o, state = chunk_gla_torch(q, k, v, g, scale=0.25, initial_state=h0, output_final_state=True)
    assert_close(o, fla["fused_recurrent_gla"]["o"], what="output vs fused_recurrent_gla")
    assert_close(state, fla["fused_recurrent_gla"]["state"], what="state vs fused_recurrent_gla")
