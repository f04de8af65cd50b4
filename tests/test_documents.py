"""Packed documents kept apart (blocks/documents.py, train.document_isolation): a row that packs several
documents gives, for every mixer and for hybrid models, the outputs and gradients of each document run
alone; so do the torch ops given fla's ``cu_seqlens`` (and they equal fla's own kernels, run through
the Triton interpreter); batched rows may have different boundaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocks.documents import Documents, documents_in
from blocks.errors import InputError
from blocks.kvm import coverage, slots_after
from blocks.ops.delta_rule import gated_delta_rule
from blocks.ops.dplr import dplr_delta_rule
from blocks.ops.gla import chunk_gla_torch
from blocks.registry import build_mixer
from blocks.state import StateError
from fla_interpreter import requires_fla_interpreter, run_with_fla_kernels
from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe
from mixer_checks import assert_close

D_MODEL = 16
ROWS = [[5, 70, 1, 4], [80], [33, 47]]  # document lengths of each packed row: rows differ in their boundaries


def starts_of(rows: list[list[int]]) -> torch.Tensor:
    """(B, T) bool: True at the first token of each document of ``rows`` (lengths, each row summing to T)."""
    starts = torch.zeros(len(rows), sum(rows[0]), dtype=torch.bool)
    for row, lengths in enumerate(rows):
        starts[row, torch.tensor([0, *lengths[:-1]]).cumsum(0)] = True
    return starts


def spans(rows: list[list[int]]) -> list[tuple[int, int, int]]:
    return [(row, begin, begin + n) for row, lengths in enumerate(rows)
            for begin, n in zip([0, *torch.tensor(lengths).cumsum(0).tolist()], lengths)]


# ----------------------------------------------------------------------------- the views

def test_documents_give_positions_segments_cu_seqlens_and_spans():
    documents = Documents(starts_of([[2, 3], [1, 1, 3]]))
    assert documents.positions.tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 1, 2]]
    assert documents.segments.tolist() == [[0, 0, 1, 1, 1], [0, 1, 2, 2, 2]]
    assert documents.cu_seqlens.tolist() == [0, 2, 5, 6, 7, 10]
    assert documents.spans == [(0, 0, 2), (0, 2, 5), (1, 0, 1), (1, 1, 2), (1, 2, 5)]
    previous = torch.arange(10.0).view(2, 5, 1)
    assert documents.restart(previous, -1.0)[..., 0].tolist() == [[-1, 1, -1, 3, 4], [-1, -1, -1, 8, 9]]
    x = torch.randn(2, 5, 3)
    assert torch.equal(documents.unflat(documents.flat(x)), x) and documents.flat(x).shape == (1, 10, 3)


def test_documents_refuse_what_they_cannot_mean():
    with pytest.raises(InputError, match="column 0 must be True"):
        Documents(torch.tensor([[False, True]]))
    with pytest.raises(InputError, match=r"bool tensor of shape \(batch, time >= 1\)"):
        Documents(torch.ones(2, 3))
    documents = Documents(starts_of([[2, 3]]))
    x = torch.zeros(1, 5, 4)
    assert documents_in({"documents": documents}, x, None, "layer") is documents and documents_in({}, x, 0, "") is None
    with pytest.raises(StateError, match=r"layer: a batch of packed documents .* \(pass state=None\)"):
        documents_in({"documents": documents}, x, object(), "layer")
    with pytest.raises(InputError, match=r"describes a batch of shape \(1, 5\), the input has .* \(1, 4\)"):
        documents_in({"documents": documents}, x[:, :4], None, "layer")


# ----------------------------------------------------------------------------- the ops

def op_inputs(seed: int, total: int, heads: int = 2, dim: int = 8, decay: float = 0.25):
    """q, k, v, per-key and per-head log gates, beta, and RWKV-7's a, b, w: [1, total, H, *]."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, total, heads, dim, generator=gen) for _ in range(3))
    k = F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(1, total, heads, dim, generator=gen)) * decay
    beta = torch.rand(1, total, heads, generator=gen)
    kk = F.normalize(torch.randn(1, total, heads, dim, generator=gen), dim=-1)
    a, b = -kk, kk * torch.rand(1, total, heads, dim, generator=gen)
    return q, k, v, g, g[..., 0], beta, a, b, -0.6 * torch.rand(1, total, heads, dim, generator=gen)


OPS = {  # name -> (op on the leaves, with cu_seqlens or None; indices of op_inputs it takes)
    "gla per key": (lambda t, cu: chunk_gla_torch(*t, scale=0.5, output_final_state=True, cu_seqlens=cu), (0, 1, 2, 3)),
    "gla per head": (lambda t, cu: chunk_gla_torch(*t, scale=0.5, output_final_state=True, chunk_size=16,
                                                   cu_seqlens=cu), (0, 1, 2, 4)),
    "gated delta rule": (lambda t, cu: gated_delta_rule(*t, output_final_state=True, chunk_size=16, backend="torch",
                                                        cu_seqlens=cu), (0, 1, 2, 4, 5)),
    "dplr": (lambda t, cu: dplr_delta_rule(*t, scale=1.0, output_final_state=True, chunk_size=32, backend="torch",
                                           cu_seqlens=cu), (0, 1, 2, 6, 7, 8)),
    "dplr, strong decays": (lambda t, cu: dplr_delta_rule(*t[:5], t[5] * 40, scale=1.0, output_final_state=True,
                                                          chunk_size=32, backend="torch", cu_seqlens=cu),
                            (0, 1, 2, 6, 7, 8)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_ops_with_cu_seqlens_equal_each_sequence_alone(name):
    """Outputs, each sequence's final state and the gradients of every input; sequences of one token, of
    less than a chunk and of several chunks, so the layout fills several lanes."""
    op, which = OPS[name]
    lengths = [5, 70, 1, 16, 33, 64, 3]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    inputs = [op_inputs(0, bounds[-1])[i].requires_grad_() for i in which]
    o, finals = op(inputs, torch.tensor(bounds))
    weight = torch.randn_like(o)
    grads = torch.autograd.grad((o * weight).sum() + finals.square().sum(), inputs)
    assert finals.shape[0] == len(lengths)
    pieces = []  # the gradients of each sequence alone (zero for an input it does not use: a lone token's decay)
    for n, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = [x.detach()[:, begin:end].requires_grad_() for x in inputs]
        o_alone, final_alone = op(alone, None)
        assert_close(o[:, begin:end], o_alone, what=f"{name}: output of sequence {n}")
        assert_close(finals[n:n + 1], final_alone, what=f"{name}: final state of sequence {n}")
        loss = (o_alone * weight[:, begin:end]).sum() + final_alone.square().sum()
        grads_alone = torch.autograd.grad(loss, alone, allow_unused=True)
        pieces.append([torch.zeros_like(x) if g is None else g for x, g in zip(alone, grads_alone)])
    for i, (grad, *per_sequence) in enumerate(zip(grads, *pieces)):
        assert_close(grad, torch.cat(per_sequence, dim=1), rtol=1e-4, what=f"{name}: gradient of input {i}")


def _fla_varlen_case(inputs, cu_seqlens):
    """In the interpreter child: fla's chunked kernels on several sequences (cu_seqlens)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.rwkv7 import chunk_rwkv7
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v, g, g_head, beta, a, b, w = inputs
    with torch.no_grad():
        return {"gla per key": chunk_gla(q, k, v, g=g, scale=0.5, output_final_state=True, cu_seqlens=cu_seqlens),
                "gla per head": chunk_simple_gla(q, k, v, g=g_head, scale=0.5, output_final_state=True,
                                                 cu_seqlens=cu_seqlens),
                "gated delta rule": chunk_gated_delta_rule(q=q, k=k, v=v, g=g_head, beta=beta, output_final_state=True,
                                                           cu_seqlens=cu_seqlens),
                "dplr": chunk_rwkv7(r=q, w=w, k=k, v=v, a=a, b=b, scale=1.0, output_final_state=True,
                                    cu_seqlens=cu_seqlens)}


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
def test_ops_with_cu_seqlens_equal_fla_triton_kernels():
    """fla's chunk_gla, chunk_simple_gla, chunk_gated_delta_rule and chunk_rwkv7 with cu_seqlens (real Triton
    code, interpreted on CPU): the outputs and each sequence's final state."""
    inputs = op_inputs(1, 45, heads=1, dim=16)
    cu_seqlens = torch.tensor([0, 7, 30, 31, 45])
    fla = run_with_fla_kernels(_fla_varlen_case, inputs=inputs, cu_seqlens=cu_seqlens)
    for name, (fla_o, fla_state) in fla.items():
        op, which = OPS[name]
        o, state = op([inputs[i] for i in which], cu_seqlens)
        assert_close(o, fla_o, what=f"{name}: output vs fla")
        assert_close(state, fla_state, what=f"{name}: final states vs fla")


# ----------------------------------------------------------------------------- the mixers

MIXERS = {
    "gla": ("gla", dict(num_heads=2, use_short_conv=True, backend="torch")),
    "rwkv7": ("rwkv7", dict(head_dim=8, chunk_size=16, backend="torch")),
    "mamba2": ("mamba2", dict(head_dim=8, state_size=8, backend="torch")),
    "gated_deltanet": ("gated_deltanet", dict(head_dim=8, num_heads=2, chunk_size=16, backend="torch")),
    "kvm": ("kvm", dict(num_heads=2, chunk_len=4, budget="power_law", growth_factor=1.5, state_min_len=4,
                        qk_norm="layernorm", rope_partial_dim=4, rope_style="kvm_paper", token_shift=True,
                        value_residual=True)),
    "kvm, grouped kv heads, no merge gate": ("kvm", dict(num_heads=4, num_kv_heads=2, chunk_len=8, budget="fixed",
                                                         state_min_len=12, merge_gate_keys=False,
                                                         merge_gate_values=False)),
    "attention": ("attention", dict(num_heads=2, token_shift=True)),
    "swa": ("swa", dict(num_heads=2, window=5)),
    "bswa": ("bswa", dict(num_heads=2, chunk_len=4, n_bswa_chunks=2, rope_partial_dim=4)),
    "swa, sinks": ("swa", dict(num_heads=4, num_kv_heads=2, window=5, sink_len=3)),
    "bswa, sinks": ("bswa", dict(num_heads=2, chunk_len=4, n_bswa_chunks=1, sink_len=6, rope_partial_dim=4)),
}


def built(name: str):
    kind, options = MIXERS[name]
    torch.manual_seed(1)
    mixer = build_mixer(kind, D_MODEL, **options)
    with torch.no_grad():  # off the zero and identity inits (RWKV-7's output projection, KVM's temperatures)
        for param in mixer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return mixer


@pytest.mark.parametrize("name", list(MIXERS))
def test_every_mixer_computes_packed_documents_as_if_each_ran_alone(name):
    """Outputs and the gradients of the input and of every parameter; rows with different boundaries."""
    mixer = built(name)
    x = torch.randn(len(ROWS), sum(ROWS[0]), D_MODEL, requires_grad=True)
    weight = torch.randn_like(x)
    y, state = mixer(x, None, {"documents": Documents(starts_of(ROWS))})
    assert state is None
    params = [p for p in mixer.parameters()]
    grads = torch.autograd.grad((y * weight).sum(), [x, *params], allow_unused=True)
    outs, total = [], 0.0
    for row, begin, end in spans(ROWS):
        y_alone, _ = mixer(x[row:row + 1, begin:end], None, {})
        outs.append((row, begin, end, y_alone))
        total = total + (y_alone * weight[row:row + 1, begin:end]).sum()
    for row, begin, end, y_alone in outs:
        assert_close(y[row:row + 1, begin:end], y_alone, what=f"{name}: output of document {row}[{begin}:{end}]")
    grads_alone = torch.autograd.grad(total, [x, *params], allow_unused=True)
    names = ["input", *(n for n, _ in mixer.named_parameters())]
    for what, grad, grad_alone in zip(names, grads, grads_alone):
        if grad_alone is None:
            assert grad is None or not grad.any(), what
            continue
        assert_close(grad, grad_alone, rtol=1e-4, what=f"{name}: gradient of {what}")


def test_the_kvm_case_appends_and_merges_inside_a_document():
    """The packed KVM case above exercises the whole budget: its longest document leaves the state with
    more slots than a chunk (appends) and fewer than the tokens absorbed (merges)."""
    config = built("kvm").config
    assert config.chunk_len < slots_after(70, config) < coverage(70, config)


def test_a_packed_document_per_row_equals_the_plain_forward_and_states_are_refused():
    mixer = built("kvm")
    x = torch.randn(2, 24, D_MODEL)
    y_plain, state = mixer(x, None, {})
    y_one, _ = mixer(x, None, {"documents": Documents(starts_of([[24], [24]]))})
    assert_close(y_one, y_plain, what="one document per row vs no documents")
    with pytest.raises(StateError, match="pass state=None"):
        mixer(x, state, {"documents": Documents(starts_of([[24], [24]]))})


# ----------------------------------------------------------------------------- hybrid models

MODEL_ROWS = [[5, 40, 1, 18], [64], [33, 31]]


@pytest.mark.parametrize("recipe", ["gla_kvm", "rwkv7_kvm", "mamba2_kvm", "gdn_kvm_swa", "gptalpha_bswa"])
def test_hybrid_models_compute_packed_documents_as_if_each_ran_alone(recipe):
    """Logits and every parameter's gradient. The tiny recipes cover every mixer kind, RWKV-7's v_first
    stream, the value residual and the MLP's token shift (kvm_paper backbone); weights are moved off
    their zero inits so that every layer shapes the logits."""
    torch.manual_seed(0)
    model = HybridLM(load_recipe(f"tiny/{recipe}").model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    tokens = torch.randint(0, model.config.vocab_size, (len(MODEL_ROWS), sum(MODEL_ROWS[0])))
    logits, state = model(tokens, document_starts=starts_of(MODEL_ROWS))
    assert state is None
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits.square().mean(), params, allow_unused=True)
    total = 0.0
    for row, begin, end in spans(MODEL_ROWS):
        alone = model(tokens[row:row + 1, begin:end]).logits
        assert_close(logits[row:row + 1, begin:end], alone, what=f"{recipe}: logits of document {row}[{begin}:{end}]")
        total = total + alone.square().sum() / logits.numel()
    grads_alone = torch.autograd.grad(total, params, allow_unused=True)
    for (what, _), grad, grad_alone in zip(model.named_parameters(), grads, grads_alone):
        if grad_alone is not None:
            assert_close(grad, grad_alone, rtol=1e-4, what=f"{recipe}: gradient of {what}")
    with pytest.raises(ValueError, match="document_starts has shape"):
        model(tokens, document_starts=starts_of(MODEL_ROWS)[:, :10])
