"""Softmax attention baselines: the mixer contract and equality with masked reference attention,
with and without attention sinks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from blocks import attention
from blocks.attention import BlockSlidingWindowAttention, CausalAttention, SlidingWindowAttention, WindowState
from blocks.config import ConfigError
from blocks.state import StateError
from blocks.kvm import KVMConfig, kvm_attention
from mixer_checks import ContractCase, MixerContract, assert_close

D_MODEL = 32
LAYERS = {
    "attention": (CausalAttention, {}),
    "swa": (SlidingWindowAttention, dict(window=7)),
    "bswa": (BlockSlidingWindowAttention, dict(chunk_len=4, n_bswa_chunks=2)),
    "swa, sinks": (SlidingWindowAttention, dict(window=5, sink_len=3)),
    "bswa, sinks": (BlockSlidingWindowAttention, dict(chunk_len=4, n_bswa_chunks=1, sink_len=6)),
}


def make(kind: str, **options):
    cls, extra = LAYERS[kind]
    torch.manual_seed(0)
    return cls(cls.Config(num_heads=4, num_kv_heads=2, qk_norm="rmsnorm", qkv_bias=True, **{**extra, **options}),
               d_model=D_MODEL).eval()


def inputs(t: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, t, D_MODEL, generator=torch.Generator().manual_seed(1))


class TestContract(MixerContract):
    cases = [ContractCase(kind, functools.partial(make, kind, token_shift=True), D_MODEL, seed=1,
                          decode_equals_forward=[(2, 30, [1, 3, 4, 8, 9, 29])],
                          continue_by_chunks=[(2, [5, 1, 12, 12]), (2, [1, 1, 2, 7, 19])], batch_independent=[(3, 20)],
                          gradients=[(2, 20, None)], state_roundtrip=[(3, 20)])
             for kind in LAYERS]


@pytest.mark.parametrize("kind", ["attention", "swa", "bswa"])
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
    for config in (SlidingWindowAttention.Config, BlockSlidingWindowAttention.Config):
        with pytest.raises(ConfigError, match="^sink_len: must be an integer >= 0, got -1"):
            config(sink_len=-1)
        with pytest.raises(ConfigError, match="^sink_len: "):
            config(sink_len=1.5)
    with pytest.raises(ConfigError, match="^qk_norm: "):
        CausalAttention.Config(qk_norm="batchnorm")


# ----------------------------------------------------------------------------- attention sinks

def lowest_of(kind: str, options: dict):
    """The reference's lowest visible position of each query position (sinks aside)."""
    if kind == "swa":
        return lambda i: i - options["window"] + 1
    return lambda i: (i // options["chunk_len"] - options["n_bswa_chunks"] + 1) * options["chunk_len"]


SINK_CASES = [("swa", dict(window=w, sink_len=n)) for w, n in [(4, 0), (4, 1), (4, 3), (4, 4), (3, 9), (1, 5), (7, 30)]]
SINK_CASES += [("bswa", dict(chunk_len=4, n_bswa_chunks=nb, sink_len=n)) for nb, n in [(1, 0), (1, 2), (2, 5), (1, 9)]]


@pytest.mark.parametrize("query_block", [1024, 3])  # 3: query blocks whose window slice leaves sinks out
@pytest.mark.parametrize("kind, options", SINK_CASES)
def test_sinks_equal_masked_reference_attention(monkeypatch, kind, options, query_block):
    """Key j is visible to query i iff j <= i and (j < sink_len or j >= lowest(i)); the state holds
    exactly the keys a later query can see: the sinks apart, the window's tail in ``keys``."""
    monkeypatch.setattr(attention, "_QUERY_BLOCK", query_block)
    layer, x, t, sink = make(kind, **options), inputs(25), 25, options["sink_len"]
    lowest = lowest_of(kind, options)
    with torch.no_grad():
        y, state = layer(x)
        q, k, v, _ = layer.project(x, 0, None, None)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = (j <= i) & ((j < sink) | (j >= lowest(i)))
        expected = layer.output(F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                               attn_mask=allowed))
    assert_close(y, expected, 1e-5)
    kept = [p for p in range(t) if p < sink or p >= lowest(t)]  # what the query at position t can see
    sinks = [p for p in kept if p < sink]
    if sink:
        assert torch.equal(state.sink_keys, k[:, :, sinks]) and torch.equal(state.sink_values, v[:, :, sinks])
    else:
        assert state.sink_keys is None
    assert torch.equal(state.keys, k[:, :, kept[len(sinks):]]) and torch.equal(state.values, v[:, :, kept[len(sinks):]])


def test_window_and_sinks_covering_the_sequence_are_full_attention():
    """A query at i sees [0, sink_len) and [i - window + 1, i]: all of its past while i < window + sink_len."""
    x = inputs(25)
    full = make("attention")
    with torch.no_grad():
        expected, _ = full(x)
        for window, sink, equal in [(10, 15, True), (20, 5, True), (1, 24, True), (10, 14, False)]:
            swa = make("swa", window=window, sink_len=sink)
            swa.load_state_dict(full.state_dict())
            y, _ = swa(x)
            prefix, state = swa(x[:, :7])
            decoded, _ = _decode(swa, x, state, range(7, 25))
            assert_close(torch.cat([prefix, decoded], 1), y, 1e-5, "prefill 7 + decode")
            if equal:
                assert_close(y, expected, 1e-5, f"window {window} + {sink} sinks")
            else:
                assert (y[:, -1] - expected[:, -1]).abs().max() > 1e-4, "the last query misses key 14"


@pytest.mark.parametrize("kind", ["swa, sinks", "bswa, sinks"])
def test_sinks_decode_grows_the_window_in_place_and_saved_states_continue(monkeypatch, kind):
    """Prefills shorter and longer than the sinks, then one token at a time, new buffers every few steps;
    a state saved (``state_dict``) at any point continues like never stopping; rows are independent."""
    monkeypatch.setattr(attention, "SPARE_MIN_TOKENS", 3)
    monkeypatch.setattr(attention, "SPARE_SHARE", 0.0)
    layer, x = make(kind, token_shift=True), inputs(30)
    with torch.no_grad():
        full, _ = layer(x)
        for prefill in (1, 2, 6, 11):
            _, state = layer(x[:, :prefill])
            out, states = _decode(layer, x, state, range(prefill, 30))
            assert_close(out, full[:, prefill:], 1e-5, f"prefill {prefill} + decode")
            copies = sum(new.buffer is not old.buffer and old.keys.shape[2] > 0  # a held window moved
                         for old, new in zip(states, states[1:]))
            assert copies <= len(states) // 4 + 1, f"the window was copied {copies} times in {len(states)} steps"
            for s in states[::5]:
                saved = WindowState.from_state_dict({k: v.clone() for k, v in s.state_dict().items()})
                rest, _ = layer(x[:, s.seq_len:], saved)
                assert_close(rest, full[:, s.seq_len:], 1e-5, f"continued from a state saved at {s.seq_len}")
        for row in range(2):
            alone, _ = layer(x[row:row + 1, :13])
            rest, _ = layer(x[row:row + 1, 13:], layer(x[row:row + 1, :13])[1])
            assert_close(torch.cat([alone, rest], 1), full[row:row + 1], 1e-5, f"row {row} alone")


def test_a_state_without_its_sinks_is_refused():
    plain, sinks, x = make("swa", window=5), make("swa", window=5, sink_len=3), inputs(12)
    with torch.no_grad():
        _, state = plain(x)
        with pytest.raises(StateError, match="3 sink tokens"):
            sinks(x[:, :1], state)
        _, state = sinks(x)
        with pytest.raises(StateError, match="0 sink tokens"):
            plain(x[:, :1], state)
