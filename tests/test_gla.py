"""The GLA mixer: the state contract, option and state validation, and parity with fla's
``GatedLinearAttention`` (state_dict names in-process; outputs and states through the interpreter)."""

from __future__ import annotations

import functools

import pytest
import torch

from blocks.config import ConfigError
from blocks.gla import GatedLinearAttention, GLAConfig, GLAState
from blocks.ops.gla import CHUNK_SIZE_PER_KEY as CHUNK
from blocks.registry import build_mixer, get_mixer, get_mixer_by_symbol
from blocks.state import StateError
from fla_interpreter import requires_fla_interpreter, requires_triton, run_with_fla_kernels
from mixer_checks import ContractCase, MixerContract, assert_close, check_loads_fla_state_dict, check_runs_without_fla

D_MODEL = 64
CONFIGS = {
    "default": {},
    "short-conv-gqa": {"use_short_conv": True, "num_heads": 4, "num_kv_heads": 2, "conv_bias": True},
    "unfused-sigmoid-gate": {"fuse_norm": False, "gate_fn": "sigmoid", "feature_map": "relu", "clamp_min": -0.05},
    "no-output-gate": {"use_output_gate": False, "expand_k": 1.0, "elementwise_affine": False},
}


def make_mixer(options: dict, seed: int = 0) -> GatedLinearAttention:
    torch.manual_seed(seed)
    return GatedLinearAttention(GLAConfig(**{"num_heads": 2, "backend": "torch", **options}), d_model=D_MODEL, layer_idx=3)


def make_x(B=2, T=2 * CHUNK + 3, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


class TestContract(MixerContract):
    cases = [ContractCase(name, functools.partial(make_mixer, options), D_MODEL, seed=1,
                          decode_equals_forward=[(2, 2 * CHUNK + 3, [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 2])],
                          continue_by_chunks=[(2, [1, CHUNK - 1, CHUNK, 3]), (2, [CHUNK + 1, 1, CHUNK + 1]),
                                              (2, [4 * CHUNK + 3, 64])],
                          batch_independent=[(3, 2 * CHUNK + 3)], gradients=[(2, 2 * CHUNK + 3, None)],
                          state_roundtrip=[(2, 2 * CHUNK + 3)])
             for name, options in CONFIGS.items()]


def test_state_layout_and_size():
    mixer = make_mixer(CONFIGS["short-conv-gqa"])
    _, state = mixer(make_x(T=5))
    assert isinstance(state, GLAState) and state.kind == "recurrent" and state.seq_len == 5
    assert state.recurrent.shape == (2, 4, 8, 16) and state.recurrent.dtype == torch.float32  # [B, H, K, V]
    assert state.conv_q.shape == (2, 32, 4) and state.conv_k.shape == (2, 16, 4) and state.conv_v.shape == (2, 32, 4)
    assert state.nbytes() == 4 * (2 * 4 * 8 * 16 + 2 * (32 + 16 + 32) * 4)


def test_registered_and_buildable_by_name():
    spec = get_mixer("gla")
    assert spec.cls is GatedLinearAttention and spec.symbol == "G" and spec.state_kind == "recurrent"
    assert get_mixer_by_symbol("G") is spec
    mixer = build_mixer("gla", d_model=D_MODEL, layer_idx=1, num_heads=4, use_short_conv=True)
    assert mixer.head_k_dim == 8 and mixer.head_v_dim == 16 and hasattr(mixer, "q_conv1d")


@pytest.mark.parametrize("options,field", [
    ({"num_heads": 0}, "num_heads"), ({"num_kv_heads": 3}, "num_kv_heads"), ({"feature_map": "tanh"}, "feature_map"),
    ({"gate_fn": "nope"}, "gate_fn"), ({"clamp_min": 0.5}, "clamp_min"), ({"gate_logit_normalizer": 0}, "gate_logit_normalizer"),
    ({"backend": "cuda"}, "backend"), ({"conv_size": 0}, "conv_size"), ({"expand_k": -1}, "expand_k"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError) as error:
        GLAConfig(**options)
    assert error.value.field == field


def test_options_that_do_not_fit_d_model_are_refused():
    with pytest.raises(ConfigError, match="num_heads"):
        GatedLinearAttention(GLAConfig(num_heads=3), d_model=D_MODEL)
    with pytest.raises(ConfigError, match="expand_k"):
        GatedLinearAttention(GLAConfig(expand_k=0.3), d_model=D_MODEL + 1)


def test_bad_input_and_foreign_state_are_refused():
    mixer = make_mixer(CONFIGS["default"])
    with pytest.raises(ValueError, match="x must be"):
        mixer(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match="x must be"):
        mixer(torch.randn(5, D_MODEL))
    _, other_layer_state = make_mixer(CONFIGS["no-output-gate"])(make_x(T=3))  # K = 32, not 16
    with pytest.raises(StateError, match="state.recurrent"):
        mixer(make_x(T=2), other_layer_state)
    _, state = mixer(make_x(T=3))
    with pytest.raises(StateError, match="state.recurrent"):
        mixer(make_x(B=3, T=2), state)  # batch differs
    with pytest.raises(StateError, match="convolution tails"):
        make_mixer({"use_short_conv": True})(make_x(T=2), state)
    with pytest.raises(StateError, match="continues only a GLAState"):
        mixer(make_x(T=2), object())


def test_cpu_path_imports_neither_fla_nor_triton():
    check_runs_without_fla("import torch, blocks.gla as m\n"
                           "layer = m.GatedLinearAttention(m.GLAConfig(use_short_conv=True), d_model=32)\n"
                           "y, s = layer(torch.randn(1, 5, 32)); layer(torch.randn(1, 1, 32), s)[0].sum().backward()\n")


@requires_triton
@pytest.mark.parametrize("name", CONFIGS)
def test_fla_state_dict_loads_strictly(name):
    from fla.layers import GatedLinearAttention as FlaGLA

    fla_layer = FlaGLA(hidden_size=D_MODEL, **{"num_heads": 2, **CONFIGS[name]})
    check_loads_fla_state_dict(make_mixer(CONFIGS[name]), fla_layer)


def _fla_gla_case(cases, decode_steps):
    """In the interpreter child: fla's GLA layer, prefill with a cache then a few one-token steps,
    plus parameter gradients of the full forward."""
    from fla.layers import GatedLinearAttention as FlaGLA
    from fla.models.utils import Cache

    results = []
    for options, T, seed, with_grads in cases:
        torch.manual_seed(seed)
        layer = FlaGLA(hidden_size=D_MODEL, layer_idx=0, **{"num_heads": 2, **options})
        x = torch.randn(2, T + decode_steps, D_MODEL)
        w = torch.randn(2, T, D_MODEL)
        grads = None
        if with_grads:
            (layer(x[:, :T])[0] * w).sum().backward()
            grads = {n: p.grad for n, p in layer.named_parameters()}
        cache = Cache()
        with torch.no_grad():
            y = [layer(x[:, :T], past_key_values=cache, use_cache=True)[0]]
            prefill_state = {k: v for k, v in cache[0].items() if v is not None}
            prefill_state = {"recurrent_state": prefill_state["recurrent_state"].clone(),
                             "conv_state": [c.clone() for c in prefill_state.get("conv_state", ())]}
            for t in range(T, T + decode_steps):
                y.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
        results.append({"state_dict": layer.state_dict(), "x": x, "y": torch.cat(y, dim=1), "w": w, "grads": grads,
                        "prefill_state": prefill_state})
    return results


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
def test_equals_fla_layer():
    """fla's GatedLinearAttention (its Triton kernels, interpreted): T=100 takes its chunk kernel,
    T=40 its fused recurrent one. Same weights give the same outputs, prefill states (fla keeps
    [B, H, V, K]), decode steps, and (T=100; the interpreter's backward is slow) parameter gradients."""
    cases = [({}, 100, 0, True), (CONFIGS["short-conv-gqa"], 40, 1, False)]
    results = run_with_fla_kernels(_fla_gla_case, cases=cases, decode_steps=3)
    for (options, T, _, with_grads), fla in zip(cases, results):
        ours = make_mixer(options)
        ours.load_state_dict(fla["state_dict"], strict=True)
        x = fla["x"]
        if with_grads:
            (ours(x[:, :T])[0] * fla["w"]).sum().backward()
        with torch.no_grad():
            y, state = ours(x[:, :T])
            assert_close(state.recurrent, fla["prefill_state"]["recurrent_state"].transpose(-1, -2),
                         what=f"prefill state, T={T}")
            for ours_conv, fla_conv in zip((state.conv_q, state.conv_k, state.conv_v), fla["prefill_state"]["conv_state"]):
                assert_close(ours_conv, fla_conv, what="conv state")
            y_rest, _ = ours(x[:, T:], state)
        assert_close(torch.cat([y, y_rest], dim=1), fla["y"], what=f"prefill {T} + decode outputs")
        for name, param in ours.named_parameters() if with_grads else ():
            assert_close(param.grad, fla["grads"][name], rtol=1e-4, what=f"grad of {name}, T={T}")
