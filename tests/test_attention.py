"""Softmax attention baselines: the mixer contract and equality with masked reference attention."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from blocks import attention
from blocks.attention import BlockSlidingWindowAttention, CausalAttention, SlidingWindowAttention
from blocks.config import ConfigError
from blocks.kvm import KVMConfig, kvm_attention
from mixer_checks import ContractCase, MixerContract, assert_close

D_MODEL = 32
LAYERS = {
    "attention": (CausalAttention, {}),
    "swa": (SlidingWindowAttention, dict(window=7)),
    "bswa": (BlockSlidingWindowAttention, dict(chunk_len=4, n_bswa_chunks=2)),
}


def make(kind: str, **options):
    cls, extra = LAYERS[kind]
    torch.manual_seed(0)
    return cls(cls.Config(num_heads=4, num_kv_heads=2, qk_norm="rmsnorm", qkv_bias=True, **extra, **options),
               d_model=D_MODEL).eval()


def inputs(t: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, t, D_MODEL, generator=torch.Generator().manual_seed(1))


class TestContract(MixerContract):
    cases = [ContractCase(kind, functools.partial(make, kind, token_shift=True), D_MODEL, seed=1,
                          decode_equals_forward=[(2, 30, [1, 3, 4, 8, 9, 29])],
                          continue_by_chunks=[(2, [5, 1, 12, 12])], batch_independent=[(3, 20)],
                          gradients=[(2, 20, None)], state_roundtrip=[(3, 20)])
             for kind in LAYERS]


@pytest.mark.parametrize("kind", LAYERS)
def test_equals_masked_reference_attention(kind):
    layer = make(kind)
    x = inputs(25)
    with torch.no_grad():
        y, state = layer(x)
        q, k, v, _ = layer.project(x, 0, None, None)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        pos = torch.arange(25)
        allowed = pos[None, :] <= pos[:, None]
        if kind == "swa":
            allowed &= pos[None, :] > pos[:, None] - 7
        if kind == "bswa":
            allowed &= pos[None, :] // 4 >= pos[:, None] // 4 - 1
        expected = layer.output(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
    assert_close(y, expected, 1e-5)
    expected_cached = {"attention": 25, "swa": 6, "bswa": 5}[kind]  # next query: position 25
    assert state.keys.shape[2] == expected_cached, "the state keeps exactly what later queries can see"
    assert state.kind == ("kv" if kind == "attention" else "window")


def _decode(layer, x, state, steps: range):
    """One-token steps over x[:, steps] -> their outputs (B, n, d_model) and each step's state."""
    outs, states = [], []
    for i in steps:
        y, state = layer(x[:, i:i + 1], state)
        outs.append(y)
        states.append(state)
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("spare_min, spare_share", [(256, 0.125), (3, 0.0)])  # room for all / a new buffer every 4 steps
def test_full_attention_decode_appends_in_place(monkeypatch, spare_min, spare_share):
    monkeypatch.setattr(attention, "SPARE_MIN_TOKENS", spare_min)
    monkeypatch.setattr(attention, "SPARE_SHARE", spare_share)
    layer, x = make("attention", token_shift=True), inputs(30)
    with torch.no_grad():
        full, _ = layer(x)
        _, state = layer(x[:, :10])
        out, states = _decode(layer, x, state, range(10, 30))
    assert_close(out, full[:, 10:], 1e-5, "decode")
    storages = [s.keys.data_ptr() for s in states]
    regrown = sum(a != b for a, b in zip(storages, storages[1:]))  # the first step copies the prefill's cache in
    assert regrown == (0 if spare_min == 256 else 19 // (spare_min + 1)), f"cache copied {regrown} times in 19 steps"
    assert all(s.keys.shape[2] == s.seq_len for s in states)
    with torch.no_grad():
        assert layer(x[:, :1], layer(x[:, :3])[1])[1].buffer is not None
    with torch.inference_mode():  # a cache grown in inference mode, continued outside it: copied, not refused
        _, state = layer(x[:, 1:2], layer(x[:, :1])[1])
    with torch.no_grad():
        out, _ = _decode(layer, x, state, range(2, 4))
    assert_close(out, full[:, 2:4], 1e-5, "decode outside inference mode")
    assert layer(x[:, :1], layer(x[:, :3])[1])[1].buffer is None, "with autograd, tensors no later step writes to"


def test_an_older_cache_state_continued_again_leaves_the_newer_one_intact():
    """Branching (beam search, retrying a step): the second branch from one state copies the cache
    instead of writing over the token the first branch appended."""
    layer, x = make("attention"), inputs(14)
    other = inputs(14, b=2).flip(1)  # different tokens for the second branch
    with torch.no_grad():
        _, root = layer(x[:, :10])
        _, root = layer(x[:, 10:11], root)  # a state that owns its buffer
        first, first_states = _decode(layer, x, root, range(11, 14))
        second, _ = layer(other[:, 11:12], root)  # root again, after the first branch grew the buffer
        again, _ = _decode(layer, x, first_states[0], range(12, 14))  # and the first branch, continued again
        full, _ = layer(x)
        branch = torch.cat([x[:, :11], other[:, 11:12]], 1)
        full_second, _ = layer(branch)
    assert_close(first, full[:, 11:14], 1e-5, "first branch")
    assert_close(second, full_second[:, 11:12], 1e-5, "second branch")
    assert_close(again, full[:, 12:14], 1e-5, "first branch, continued again from its first step")


def test_block_sliding_window_is_kvm_without_its_state():
    """Before position W, KVM is plain attention; BSWA continues that window without any memory."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    out, _ = kvm_attention(q, k, v, None, KVMConfig(num_heads=2, chunk_len=4, n_bswa_chunks=4),
                           state_key_norm=torch.nn.LayerNorm(8))
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-6)


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="^window: "):
        SlidingWindowAttention.Config(window=0)
    with pytest.raises(ConfigError, match="^chunk_len: "):
        BlockSlidingWindowAttention.Config(chunk_len=-1)
    with pytest.raises(ConfigError, match="^qk_norm: "):
        CausalAttention.Config(qk_norm="batchnorm")
