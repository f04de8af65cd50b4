"""KVM attention: references, decode equivalence, the budget schedule, state invariants (docs/kvm.md)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from blocks.config import ConfigError
from blocks.kvm import KVMAttention, KVMConfig, kvm_attention, slots_after, target_slots
from blocks.kvm.autograd import absorb
from blocks.kvm.codec import SlotCodec
from blocks.kvm.routing import max_over_slots
from blocks.kvm.schedule import appending
from kvm_reference import reference_prefill
from mixer_checks import ContractCase, MixerContract, assert_close

C = 8  # chunk_len of the tiny configs; window = 2 chunks = 16 tokens
D_MODEL = 32
BUDGETS = {
    "fixed": dict(budget="fixed"),
    "power_law": dict(budget="power_law", growth_factor=4.0, state_min_len=8),
    "saturation": dict(budget="saturation", saturation_n=24, state_min_len=1),
}


def make(seed: int = 0, **options) -> KVMAttention:
    torch.manual_seed(seed)
    options = {"num_heads": 4, "chunk_len": C, "rope_partial_dim": 4, "qk_norm": "layernorm", **options}
    layer = KVMAttention(KVMConfig(**options), d_model=D_MODEL).eval()
    with torch.no_grad():  # move the KVM-only parameters off their identity init so they matter
        for name, p in layer.named_parameters():
            if name in ("window_temp", "state_temp") or name.startswith("state_key_norm"):
                p.add_(0.2 * torch.randn_like(p))
    return layer


def inputs(t: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, D_MODEL, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references

def test_window_covering_the_sequence_equals_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    config = KVMConfig(num_heads=4, chunk_len=C, n_bswa_chunks=5)  # window 40 >= T
    out, _ = kvm_attention(q, k, v, torch.rand(2, 4, 40, 1) + 0.5, config, state_key_norm=torch.nn.LayerNorm(16))
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-6)


def test_positions_inside_the_first_window_are_exact_and_later_ones_are_not():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16)
    config = KVMConfig(num_heads=2, chunk_len=C, rope_partial_dim=4)
    out, _ = kvm_attention(q, k, v, None, config, state_key_norm=torch.nn.LayerNorm(16))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    window = 2 * C
    assert_close(out[:, :, :window], full[:, :, :window], 1e-6)
    assert (out[:, :, window] - full[:, :, window]).abs().max() > 1e-3


@pytest.mark.parametrize("grad", [False, True])
def test_the_output_is_laid_out_time_major_for_the_output_projection(grad):
    """(B, Hq, T, dv) over (B, T, Hq, dv) memory, in prefill, continuation and decode alike: the
    output projection then reads (B, T, Hq*dv) without a copy."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 41, 16, requires_grad=grad) for _ in range(3))
    config, norm = KVMConfig(num_heads=4, num_kv_heads=2, chunk_len=C), torch.nn.LayerNorm(16)
    kv = lambda x, lo, hi: x[:, ::2, lo:hi]  # noqa: E731  (two kv heads)
    with torch.set_grad_enabled(grad):
        out, state = kvm_attention(q[:, :, :30], kv(k, 0, 30), kv(v, 0, 30), None, config, state_key_norm=norm)
        more, state = kvm_attention(q[:, :, 30:40], kv(k, 30, 40), kv(v, 30, 40), None, config, state,
                                    state_key_norm=norm)
        last, _ = kvm_attention(q[:, :, 40:], kv(k, 40, 41), kv(v, 40, 41), None, config, state, state_key_norm=norm)
    for o in (out, more, last):
        assert o.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("use_vlens", [True, False])
def test_prefill_equals_the_literal_published_algorithm(budget, use_vlens):
    torch.manual_seed(3)
    cfg = KVMConfig(num_heads=2, chunk_len=C, rope_partial_dim=4, sink_len=1, use_vlens=use_vlens, **BUDGETS[budget])
    q, k, v = torch.randn(2, 2, 77, 16), torch.randn(2, 2, 77, 16), torch.randn(2, 2, 77, 16)
    g = 1 + F.elu(torch.randn(2, 2, 77, 1))
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(16)), norm.bias.add_(0.3 * torch.randn(16))
    wt, st = 1 + 0.2 * torch.randn(2), 1 + 0.2 * torch.randn(2)
    with torch.no_grad():
        out, state = kvm_attention(q, k, v, g, cfg, state_key_norm=norm, window_temp=wt, state_temp=st)
        ref, s_k, s_v, s_len = reference_prefill(
            q, k, v, g, chunk_len=C, n_bswa_chunks=2, sink_len=1, rope_dim=4, norm=norm, window_temp=wt,
            state_temp=st, use_vlens=use_vlens, budget=lambda ctx, avail, cur: target_slots(cfg, ctx, avail, cur))
    assert_close(out, ref, 1e-5)
    assert_close(state.slot_keys, s_k, 1e-5, "slot key sums")
    assert_close(state.slot_values, s_v, 1e-5, "slot value sums")
    assert_close(state.slot_lens, s_len, 1e-6, "slot lengths / counts")


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("options", [dict(), dict(num_kv_heads=2), dict(use_vlens=False), dict(bf16_state_values=True),
                                     dict(use_head_temps=False, sink_len=0)])
def test_inference_read_equals_the_exact_read(budget, options):
    """Under no_grad whole chunks read window and state separately and merge their softmaxes by
    log-sum-exp; with autograd on every chunk is one softmax over [state ; window]. Same numbers."""
    layer = make(**BUDGETS[budget], **options)
    x = inputs(9 * C + 5)
    for splits in ([9 * C + 5], [2 * C + 3, 4 * C + 1, 3 * C + 1]):  # also continuations starting mid-chunk
        exact, state_exact = _run(layer, x, splits)
        with torch.no_grad():
            fast, state_fast = _run(layer, x, splits)
        assert_close(fast, exact.detach(), 1e-5, f"output, splits {splits}")
        for name, value in state_fast.state_dict().items():
            assert_close(value, state_exact.state_dict()[name].detach(), 1e-5, f"state '{name}', splits {splits}")


def test_bf16_state_values_round_the_state_read():
    layer, rounded = make(**BUDGETS["power_law"]), make(**BUDGETS["power_law"], bf16_state_values=True)
    x = inputs(6 * C)
    with torch.no_grad():
        y, y_rounded = layer(x)[0], rounded(x)[0]
    assert_close(y_rounded[:, : 2 * C], y[:, : 2 * C], 0)  # the state is read only from position W on
    assert 1e-6 < (y_rounded - y).abs().max() < 1e-2


def _run(layer, x, splits):
    ys, state, start = [], None, 0
    for n in splits:
        y, state = layer(x[:, start:start + n], state)
        ys.append(y)
        start += n
    return torch.cat(ys, 1), state


# ----------------------------------------------------------------------------- the mixer contract

VARIANTS = {
    "paper": {},
    "no_vlens": dict(use_vlens=False),
    "no_sink": dict(sink_len=0),
    "no_merge_gate": dict(merge_gate_keys=False, merge_gate_values=False),
    "no_append_gate": dict(merge_gate_appends=False),
    "gated_initial_state": dict(merge_gate_initial_state=True),
    "token_shift_value_residual_gqa": dict(token_shift=True, value_residual=True, num_kv_heads=2),
}


CONTINUATIONS = ([3, 5, 8, 9, 17, 1, 24], [C, 2 * C, 2 * C + 1, 2 * C + 4], [2 * C + 5, 3, 4 * C])


def contract_layer(**options):
    """A layer for the contract checks; with value residual, called with a fresh ctx each time."""
    layer = make(**options)
    return _with_ctx(layer) if options.get("value_residual") else layer


def contract_case(budget: str, variant: str) -> ContractCase:
    """Prefill + decode for every budget and variant; continuation by several tokens for every budget;
    batch rows, gradients and state round trips with the growing power_law budget."""
    t = 8 * C + 3
    paper, grows = variant == "paper", variant == "paper" and budget == "power_law"
    return ContractCase(
        f"{variant}-{budget}", functools.partial(contract_layer, **BUDGETS[budget], **VARIANTS[variant]), D_MODEL,
        seed=1, decode_equals_forward=[(2, t, [1, C - 1, C, 2 * C, 2 * C + 1, 3 * C, 4 * C + 1, t - 1])],
        continue_by_chunks=[(2, splits) for splits in CONTINUATIONS] if paper else [],
        batch_independent=[(3, 6 * C + 1)] if grows else [], gradients=[(2, 6 * C + 2, 3 * C + 2)] if grows else [],
        state_roundtrip=[(3, 6 * C + 1)] if grows else [])


class TestContract(MixerContract):
    cases = [contract_case(budget, variant) for variant in VARIANTS for budget in BUDGETS]


def test_decode_appends_to_the_window_in_place_and_branches_copy():
    layer, x = make(**BUDGETS["power_law"]), inputs(6 * C)
    with torch.no_grad():
        full, _ = layer(x)
        _, state = layer(x[:, :2 * C + 3])
        outs, states = [], []
        for i in range(2 * C + 3, 5 * C):  # across several chunk boundaries and window moves
            y, state = layer(x[:, i:i + 1], state)
            outs.append(y)
            states.append(state)
        buffers = {id(s.window_buffer) for s in states}
        branch, _ = layer(x[:, 3 * C:3 * C + 2], states[3 * C - (2 * C + 3) - 1])  # an old state, continued again
    assert_close(torch.cat(outs, 1), full[:, 2 * C + 3:5 * C], 1e-5, "decode")
    assert_close(branch, full[:, 3 * C:3 * C + 2], 1e-5, "branch from an older state")
    assert len(buffers) < len(states) / 4, f"{len(buffers)} window buffers for {len(states)} steps"
    assert states[-1].window_buffer is not None
    assert layer(x[:, :1], layer(x[:, :3])[1])[1].window_buffer is None, "with autograd: concatenated"


def test_decode_reads_the_slots_once_per_chunk_and_again_when_the_norm_changes():
    layer, x = make(**BUDGETS["fixed"]), inputs(5 * C)
    with torch.no_grad():
        _, state = layer(x[:, :3 * C + 1])
        states = [state := layer(x[:, i:i + 1], state)[1] for i in range(3 * C + 1, 4 * C + 3)]
        views = [s.read_view for s in states]
        within = views[:C - 2]  # steps before the next boundary (at 4C) leave the slots as they are
        assert all(v is within[0] for v in within) and within[0] is not None
        assert views[-1] is not within[0], "a boundary update changes the slots: read again"
        layer.state_key_norm.weight.mul_(1.5)  # an edited norm: the kept view is stale
        y, _ = layer(x[:, 4 * C + 3:4 * C + 4], states[-1])
        fresh = type(states[-1]).from_state_dict(states[-1].state_dict())  # the same state, no view kept
        expected, _ = layer(x[:, 4 * C + 3:4 * C + 4], fresh)
    assert_close(y, expected, 1e-6, "after the norm changed")
    assert layer(x[:, 3:4], layer(x[:, :3])[1])[1].read_view is None, "with autograd the read is not kept"


def test_train_mode_equals_eval_mode():
    layer = make(**BUDGETS["saturation"])
    x = inputs(5 * C)
    y_eval, _ = layer(x)
    y_train, _ = layer.train()(x)
    assert_close(y_train, y_eval, 0)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    b, hq, hkv, t, d = 2, 6, 2, 70, 16
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    g = 1 + F.elu(torch.randn(b, hkv, t, 1))
    cfg = KVMConfig(num_heads=hq, num_kv_heads=hkv, chunk_len=C, rope_partial_dim=4, **BUDGETS["power_law"])
    norm, wt, st = torch.nn.LayerNorm(d), 1 + 0.2 * torch.randn(hq), 1 + 0.2 * torch.randn(hq)
    with torch.no_grad():
        gqa, _ = kvm_attention(q, k, v, g, cfg, state_key_norm=norm, window_temp=wt, state_temp=st)
        rep = lambda x: x.repeat_interleave(hq // hkv, dim=1)  # noqa: E731
        mha, _ = kvm_attention(q, rep(k), rep(v), rep(g), dataclasses.replace(cfg, num_kv_heads=None),
                               state_key_norm=norm, window_temp=wt, state_temp=st)
    assert_close(gqa, mha, 1e-5)


# ----------------------------------------------------------------------------- budget schedule

def test_paper_budget_formulas():
    fixed = KVMConfig(chunk_len=256, state_min_len=256)
    sqrt16 = KVMConfig(chunk_len=256, budget="power_law", growth_factor=16, state_min_len=256)
    sat1024 = KVMConfig(chunk_len=256, budget="saturation", saturation_n=1024, state_min_len=1)
    assert [slots_after(t, fixed) for t in (100, 256, 8192, 32768, 1 << 20)] == [100, 256, 256, 256, 256]
    assert slots_after(8192, sqrt16) == 1425 and slots_after(32768, sqrt16) == 2884
    assert slots_after(8192, sat1024) == 906
    assert slots_after(1 << 20, sat1024) <= 1024
    # the first growing update is at ctx 768: target 443, so 187 tokens append and 69 merge
    assert target_slots(sqrt16, 768, 512, 256) == 443


@pytest.mark.parametrize("budget", ["fixed", "power_law", "saturation"])
def test_state_sizes_follow_the_budget(budget):
    cfg = KVMConfig(num_heads=1, chunk_len=C, rope_partial_dim=2, **BUDGETS[budget])
    torch.manual_seed(0)
    x = torch.randn(1, 1, 40 * C, 4)
    norm = torch.nn.LayerNorm(4)
    sizes, state = [], None
    with torch.no_grad():
        for i in range(0, x.shape[2], C // 2):
            _, state = kvm_attention(x[:, :, i:i + C // 2], x[:, :, i:i + C // 2], x[:, :, i:i + C // 2], None,
                                     cfg, state, state_key_norm=norm)
            sizes.append(state.num_slots)
            assert state.num_slots == slots_after(state.seq_len, cfg)
            window_len = state.seq_len - max(0, -(-state.seq_len // C) * C - 2 * C)
            assert state.window_keys.shape[2] == window_len
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert min(growth) >= 0 and max(growth) <= C, "slots never shrink and grow by at most a chunk per update"
    if budget == "fixed":
        assert set(sizes[1:]) == {C}


@pytest.mark.slow
def test_paper_sized_schedules_hold_on_real_tensors():
    """T = 8192, C = 256 on a one-head, four-dim layer: the tensors follow the paper's table."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8192, 4)
    norm = torch.nn.LayerNorm(4)
    with torch.no_grad():
        for cfg, slots in [(KVMConfig(num_heads=1, chunk_len=256, budget="power_law", growth_factor=16,
                                      state_min_len=256, rope_partial_dim=2), 1425),
                           (KVMConfig(num_heads=1, chunk_len=256, budget="saturation", saturation_n=1024,
                                      state_min_len=1, rope_partial_dim=2), 906)]:
            _, state = kvm_attention(x, x, x, None, cfg, state_key_norm=norm)
            assert state.num_slots == slots


# ----------------------------------------------------------------------------- state invariants

def _codec(cfg: KVMConfig, d: int = 8) -> SlotCodec:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.bias.add_(0.1 * torch.randn(d))
    return SlotCodec(cfg, norm, 2)


def test_sink_slots_never_change_and_lengths_never_change_under_merges():
    layer = make(**BUDGETS["power_law"])
    x = inputs(12 * C)
    with torch.no_grad():
        _, first = layer(x[:, :C])
        _, state = layer(x[:, C:], first)
    assert torch.equal(state.slot_keys[:, :, 0], first.slot_keys[:, :, 0]), "the sink key changed"
    assert torch.equal(state.slot_values[:, :, 0], first.slot_values[:, :, 0]), "the sink value changed"
    assert torch.equal(state.slot_lens[:, :, :C], first.slot_lens[:, :, :C]), "a slot length changed under merges"
    assert not torch.equal(state.slot_keys[:, :, 1:C], first.slot_keys[:, :, 1:C]), "nothing was merged"


@pytest.mark.parametrize("budget", ["fixed", "power_law"])
def test_key_and_value_mass_is_conserved(budget):
    cfg = KVMConfig(num_heads=2, chunk_len=C, rope_partial_dim=2, **BUDGETS[budget])
    codec = _codec(cfg)
    torch.manual_seed(1)
    k0, v0 = torch.randn(2, 2, C, 8), torch.randn(2, 2, C, 8)
    slots = codec.new_slots(k0, v0, torch.ones(2, 2, C, 1))
    k, v, g = torch.randn(2, 2, C, 8), torch.randn(2, 2, C, 8), 1 + F.elu(torch.randn(2, 2, C, 1))
    after = absorb(codec, slots, codec.incoming(k, v, g), appending(cfg, 3 * C, 2 * C, C))
    assert_close(after.keys.sum(2), slots.keys.sum(2) + (codec.prepare_keys(k) * g).sum(2), 1e-5, "key mass")
    assert_close(after.values.sum(2), slots.values.sum(2) + (v * g).sum(2), 1e-5, "value mass")


def test_appended_tokens_are_the_least_similar_and_merges_route_after_appending():
    cfg = KVMConfig(num_heads=1, chunk_len=C, rope_partial_dim=2, budget="power_law", growth_factor=2.0)
    codec = _codec(cfg)
    torch.manual_seed(2)
    slots = codec.new_slots(torch.randn(1, 1, C, 8), torch.randn(1, 1, C, 8), torch.ones(1, 1, C, 1))
    k, v, g = torch.randn(1, 1, C, 8), torch.randn(1, 1, C, 8), torch.ones(1, 1, C, 1)
    ctx_len, available = 5 * C, 3 * C
    n_append = target_slots(cfg, ctx_len, available, C) - C
    assert 0 < n_append < C
    after = absorb(codec, slots, codec.incoming(k, v, g), appending(cfg, ctx_len, available, C))
    best = (codec.prepare_keys(k) @ codec.norm(slots.keys).transpose(-1, -2)).amax(-1)[0, 0]
    novel = best.argsort()[:n_append].sort().values
    assert torch.equal(after.keys[0, 0, C:], codec.prepare_keys(k)[0, 0, novel]), "appended rows are not the most novel, in order"
    assert torch.equal(after.values[0, 0, C:], v[0, 0, novel])
    assert after.keys.shape[2] == C + n_append
    # every other token is summed into its best slot among the *post-append* slots, the sink excluded
    appended = torch.cat([slots.keys[0, 0], codec.prepare_keys(k)[0, 0, novel]])
    expected = appended.clone()
    for j in sorted(set(range(C)) - set(novel.tolist())):
        scores = codec.prepare_keys(k)[0, 0, j] @ codec.norm(appended).T
        scores[0] = -torch.inf
        expected[int(scores.argmax())] += codec.prepare_keys(k)[0, 0, j]
    assert_close(after.keys[0, 0], expected, 1e-6, "keys after routing against the post-append slots")


def test_count_averaging_divides_each_slot_by_its_own_count():
    cfg = KVMConfig(num_heads=1, chunk_len=C, rope_partial_dim=2, use_vlens=False, sink_len=1)
    codec = _codec(cfg)
    torch.manual_seed(3)
    slots = codec.new_slots(torch.randn(1, 1, C, 8), torch.randn(1, 1, C, 8), torch.ones(1, 1, C, 1))
    incoming = codec.incoming(torch.randn(1, 1, C, 8), torch.randn(1, 1, C, 8), torch.ones(1, 1, C, 1))
    after = absorb(codec, slots, incoming, appending(cfg, 3 * C, 2 * C, C))
    counts = after.lens[0, 0, :, 0]
    assert counts.sum() == 2 * C and counts[0] == 1 and counts.max() > 1
    values = codec.read(*after, torch.float32).values
    assert_close(values, after.values / after.lens, 0)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("options, field", [
    (dict(chunk_len=0), "chunk_len"), (dict(chunk_len=-4), "chunk_len"), (dict(n_bswa_chunks=0), "n_bswa_chunks"),
    (dict(sink_len=8, chunk_len=8), "sink_len"), (dict(budget="sqrt"), "budget"),
    (dict(budget="saturation"), "saturation_n"), (dict(rope_partial_dim=3), "rope_partial_dim"),
])
def test_bad_options_name_the_option(options, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        KVMConfig(**options)


def test_heads_that_do_not_divide_are_clear_errors():
    with pytest.raises(ConfigError, match="num_heads: must divide d_model"):
        KVMAttention(KVMConfig(num_heads=5), d_model=32)
    with pytest.raises(ConfigError, match="num_kv_heads: must divide num_heads"):
        KVMAttention(KVMConfig(num_heads=4, num_kv_heads=3), d_model=32)


def test_wrong_inputs_and_foreign_states_are_clear_errors():
    layer = make()
    with pytest.raises(ValueError, match="expects x of shape"):
        layer(torch.randn(2, 5, D_MODEL + 1))
    _, state = make(chunk_len=4)(inputs(20))
    with pytest.raises(Exception, match="does not belong to this layer"):
        layer(inputs(3), state)


def _with_ctx(layer):
    """Wrap a layer so each call gets a fresh ctx dict (value residual needs one)."""
    class WithCtx(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = layer

        def forward(self, x, state=None):
            return self.inner(x, state, {})
    return WithCtx()


@pytest.mark.parametrize("s", [5, 64, 100, 1000, 2884])
def test_max_over_slots_equals_torch_max_including_ties(s):
    torch.manual_seed(s)
    x = torch.randn(2, 3, s, 40).round(decimals=1)  # (B, H, slots, tokens), many ties
    x[0, 0, :, 0] = x[0, 0, :, 0].max() + 1  # a tie across blocks and with the tail
    x[0, 0, [0, s // 2, s - 1], 0] = x[0, 0, :, 0].max()
    every = x.amax(-2)
    for skip in (0, 1, 33, min(s, 70)):
        masked = x.clone()
        masked[..., :skip, :] = -torch.inf
        got = max_over_slots(x.clone(), skip)
        expected = masked.max(-2)
        assert torch.equal(got[0], every), "the max over every slot"
        assert torch.equal(got[1], expected.values) and torch.equal(got[2], expected.indices), f"skip={skip}"


def test_routing_scores_over_fewer_dims_equal_the_plain_product():
    """Routing scores the zeroed rotary dims of prepared keys as two numbers per slot (LayerNorm)."""
    torch.manual_seed(4)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.add_(0.5 * torch.randn(16)), norm.bias.add_(0.5 * torch.randn(16))
        norm.weight[2] = 0
    codec = SlotCodec(KVMConfig(num_heads=2, chunk_len=C, rope_partial_dim=6), norm, 6)
    k_u = codec.prepare_keys(torch.randn(2, 2, C, 16))
    normed = norm(torch.randn(2, 2, 3 * C, 16))
    with torch.no_grad():
        scores = codec.token_features(k_u) @ codec.slot_features(normed).transpose(-1, -2)
        assert codec.token_features(k_u).shape[-1] == 16 - 6 + 2
        assert_close(scores, k_u @ normed.transpose(-1, -2), 1e-6)
