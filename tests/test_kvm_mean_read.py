"""The KVM mean read (``state_read: mean``, docs/kvm.md §7): a slot of n tokens is read as their
mean key and value with log(n) added to its logit, against references computed directly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blocks.config import ConfigError
from blocks.kvm import KVMAttention, KVMConfig, kvm_attention
from blocks.kvm.codec import SlotReads
from blocks.kvm.reads import ReadScales, attend_tile
from mixer_checks import assert_close


def mean_config(**options) -> KVMConfig:
    return KVMConfig(num_heads=4, num_kv_heads=2, chunk_len=8, state_read="mean", use_vlens=False,
                     state_key_zero_dims=0, **options)


@pytest.mark.parametrize("queries", [3, 20])  # the small-tile path (decode) and the SDPA path
def test_a_slot_of_n_equal_tokens_weighs_what_the_n_tokens_would(queries):
    torch.manual_seed(0)
    b, hq, hkv, d, counts = 2, 4, 2, 8, torch.tensor([1.0, 3.0, 7.0])
    q = torch.randn(b, hq, queries, d)
    token_keys, token_values = torch.randn(b, hkv, 3, d), torch.randn(b, hkv, 3, d)
    window_keys, window_values = torch.randn(b, hkv, 5, d), torch.randn(b, hkv, 5, d)
    mask = torch.rand(queries, 5) > 0.3
    mask[:, 0] = True
    slots = SlotReads(token_keys, token_values, counts.log().expand(b, hkv, 3))
    got = attend_tile(q, slots, window_keys, window_values, mask, ReadScales(0.4, None, None))
    # the reference: every slot's token repeated count times, one softmax over [copies ; window]
    copies = torch.repeat_interleave(torch.arange(3), counts.long())
    keys = torch.cat([token_keys[:, :, copies], window_keys], 2).repeat_interleave(2, 1)
    values = torch.cat([token_values[:, :, copies], window_values], 2).repeat_interleave(2, 1)
    allowed = torch.cat([torch.ones(queries, len(copies), dtype=torch.bool), mask], 1)
    logits = (q @ keys.transpose(-1, -2) * 0.4).masked_fill(~allowed, -math.inf)
    assert_close(got, logits.softmax(-1) @ values, 1e-5, "mean read against the repeated tokens")


@pytest.mark.parametrize("splits", [[70], [17, 1, 1, 30, 21]])
def test_a_state_that_never_merges_reads_exactly_like_full_causal_attention(splits):
    """Every token that leaves the window becomes a slot of its own (the budget holds them all):
    the mean read of a one-token slot is that token, so KVM equals full causal attention."""
    config = mean_config(budget="fixed", state_min_len=128)
    torch.manual_seed(1)
    t = sum(splits)
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            state, outs, start = None, [], 0
            for n in splits:
                out, state = kvm_attention(q[:, :, start:start + n], k[:, :, start:start + n],
                                           v[:, :, start:start + n], None, config, state,
                                           state_key_norm=torch.nn.LayerNorm(8))
                outs.append(out)
                start += n
        assert state.slot_lens.eq(1).all() and state.num_slots + state.window_keys.shape[2] == t, "no merge"
        assert_close(torch.cat(outs, 2), expected, 1e-5, f"grad {grad}, splits {splits}")


def test_merged_slots_hold_means_and_counts():
    config = mean_config(budget="fixed", state_min_len=8)  # 8 slots: the first chunk, then merges only
    torch.manual_seed(2)
    t = 64
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    _, state = kvm_attention(q, k, v, None, config, state_key_norm=torch.nn.Identity())
    counts = state.slot_lens[..., 0]  # (1, 2, 8)
    assert state.num_slots == 8 and torch.equal(counts, counts.round())
    left = t - state.window_keys.shape[2]  # the tokens that left the window
    assert counts.sum(-1).eq(left).all(), "every token that left the window is counted once"
    assert counts[..., 0].eq(1).all(), "the sink slot receives no merge"
    keys = k[:, :, :left]
    assert_close(state.slot_keys.sum(2), keys.sum(2), 1e-5, "the slots' key sums hold every token that left")


def test_the_mean_read_layer_has_no_state_key_norm_and_needs_counts():
    layer = KVMAttention(mean_config(), d_model=32)
    assert not any(name.startswith("state_key_norm") for name, _ in layer.named_parameters())
    with pytest.raises(ConfigError, match="use_vlens"):
        KVMConfig(num_heads=4, state_read="mean")
    with pytest.raises(ConfigError, match="state_read"):
        KVMConfig(num_heads=4, state_read="median", use_vlens=False)


def test_gated_tokens_weigh_by_their_gate():
    """With merge gates, a slot's lens is the sum of its tokens' gates and its read is their gate-weighted
    mean: the same state as ungated tokens repeated in proportion (here gates 1, 2 and 3)."""
    config = mean_config(budget="fixed", state_min_len=8)
    torch.manual_seed(3)
    t = 64
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    gate = torch.randint(1, 4, (1, 2, t, 1)).float()
    _, state = kvm_attention(q, k, v, gate, config, state_key_norm=torch.nn.Identity())
    left = t - state.window_keys.shape[2]
    first = config.chunk_len  # the first chunk enters ungated (merge_gate_initial_state is off)
    assert_close(state.slot_lens.sum(2), first + gate[:, :, first:left].sum(2), 1e-5, "lens sum the gates")
    assert_close(state.slot_keys.sum(2), k[:, :, :first].sum(2) + (gate * k)[:, :, first:left].sum(2), 1e-5,
                 "key sums are gate-weighted")


def test_slots_whose_gates_underflow_to_zero_stay_finite():
    torch.manual_seed(4)
    t = 48
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    gate = torch.zeros(1, 2, t, 1)  # 1 + elu(x) underflows to 0 for very negative x
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, _ = kvm_attention(q, k, v, gate, mean_config(budget="fixed", state_min_len=16,
                                                              merge_gate_initial_state=True),
                                   state_key_norm=torch.nn.Identity())
        assert torch.isfinite(out).all(), f"grad {grad}"
