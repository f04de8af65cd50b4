"""The KVM state offset (``state_offset: true``): a learned per-query-head number added to the logits
of the slots past the sinks, against references computed directly: 0 reads as without it, -inf
leaves the sinks and the block window (what a sink + block-window attention sees), and a finite
offset is that bias on the out-of-window tokens of a memory that never merges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blocks.kvm import KVMAttention, KVMConfig
from mixer_checks import assert_close
from test_kvm_native import attend_in_splits

C, NB, SINKS = 8, 2, 3


def offset_config(**options) -> KVMConfig:
    return KVMConfig(num_heads=4, num_kv_heads=2, chunk_len=C, n_bswa_chunks=NB, sink_len=SINKS, state_read="mean",
                     use_vlens=False, state_key_zero_dims=0, state_offset=True, **options)


def run_in_splits(q, k, v, config, splits, **read):
    """``attend_in_splits`` with gates of one (as without gating) and no state-key norm: the output."""
    gate = torch.ones(*k.shape[:3], 1)
    return attend_in_splits(q, k, v, gate, config, splits, state_key_norm=torch.nn.Identity(), **read)[0]


def out_of_window(t: int) -> torch.Tensor:
    """(T, T) True where key j is before query p's block window: j < (p // C - NB + 1) * C."""
    p, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return j < (p // C - NB + 1) * C


def qkv(t: int, seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(2, 4, t, 8), torch.randn(2, 2, t, 8), torch.randn(2, 2, t, 8)


@pytest.mark.parametrize("splits", [[70], [19, 1, 1, 30, 19]])
def test_a_finite_offset_is_a_bias_on_the_memorys_tokens_past_the_sinks(splits):
    """With a budget that holds every token, slot j is token j: the offset of query head h is added
    to the logits of the tokens past the sinks that are out of the window, and nothing else changes."""
    t, offset = sum(splits), torch.tensor([0.7, -1.3, 0.0, 2.1])
    q, k, v = qkv(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    shifted = out_of_window(t) & (torch.arange(t)[None, :] >= SINKS)  # (T, T)
    bias = torch.where(shifted, offset[:, None, None], 0.0).masked_fill(~causal, -math.inf)  # (Hq, T, T)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    config = offset_config(budget="fixed", state_min_len=128)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = run_in_splits(q, k, v, config, splits, state_offset=offset)
        assert_close(got, expected, 1e-5, f"grad {grad}, splits {splits}")


@pytest.mark.parametrize("splits", [[70], [19, 1, 1, 30, 19]])
def test_an_offset_of_minus_infinity_leaves_the_sinks_and_the_window(splits):
    """However the memory merged, at -inf only the sink slots (the first tokens, never merged into) and
    the block window are read: sink + block-window attention."""
    t = sum(splits)
    q, k, v = qkv(t, seed=1)
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & ~(out_of_window(t) & (torch.arange(t)[None, :] >= SINKS))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    config = offset_config(budget="fixed", state_min_len=8)  # 8 slots: the memory merges from position 32 on
    suppressed = torch.full((4,), -math.inf)
    with torch.no_grad():
        assert_close(run_in_splits(q, k, v, config, splits, state_offset=suppressed), expected, 1e-5, f"{splits}")
        assert (run_in_splits(q, k, v, config, splits, state_offset=torch.zeros(4)) - expected).abs().max() > 1e-3


def test_an_offset_of_zero_reads_as_without_it_and_learns():
    t = 60
    q, k, v = qkv(t, seed=2)
    config = offset_config(budget="fixed", state_min_len=8)
    plain = KVMConfig(**{**config.__dict__, "state_offset": False})
    with torch.no_grad():
        assert_close(run_in_splits(q, k, v, config, [t], state_offset=torch.zeros(4)),
                     run_in_splits(q, k, v, plain, [t]), 1e-6, "offset 0")
    layer = KVMAttention(offset_config(budget="fixed", state_min_len=8, head_dim=8), d_model=32)
    assert torch.equal(layer.state_offset, torch.zeros(4))
    layer(torch.randn(2, t, 32))[0].square().mean().backward()
    assert layer.state_offset.grad is not None and layer.state_offset.grad.abs().min() > 0, "every head learns"
