"""Gated DeltaNet mixer: the state contract, fla's names and defaults, and parity with
fla.layers.GatedDeltaNet (its real kernels, through Triton's interpreter)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import Tensor, nn

from blocks.config import ConfigError
from blocks.gated_deltanet import GatedDeltaNet, GatedDeltaNetState
from blocks.registry import build_mixer, get_mixer, get_mixer_by_symbol
from fla_interpreter import requires_fla_interpreter, requires_triton, run_with_fla_kernels
from mixer_checks import ContractCase, MixerContract, assert_close, check_loads_fla_state_dict, check_runs_without_fla

D_MODEL = 32
CHUNK = 8  # a small op chunk so that short inputs cross chunk boundaries
T_LONG = 2 * CHUNK + 3

CONFIGS = {
    "defaults-grouped-values": {"head_dim": 8, "num_heads": 2, "num_v_heads": 4},
    "no-gate-no-conv-neg-eigval": {"head_dim": 8, "num_heads": 2, "use_gate": False, "use_short_conv": False,
                                   "allow_neg_eigval": True, "expand_v": 1.5},
    "sigmoid-gate-conv-bias": {"head_dim": 8, "num_heads": 2, "output_gate_activation": "sigmoid",
                               "conv_bias": True, "conv_size": 3},
}


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Add noise to every parameter so that norms, convs and gates all matter in the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def make_layer(seed: int = 0, chunk_size: int = CHUNK, **options) -> GatedDeltaNet:
    torch.manual_seed(seed)
    layer = build_mixer("gated_deltanet", D_MODEL, 0, chunk_size=chunk_size, backend="torch", **options)
    return perturb(layer, seed)


def inputs(B=2, T=T_LONG, seed=0) -> Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


class TestContract(MixerContract):
    cases = [*(ContractCase(name, functools.partial(make_layer, **options), D_MODEL,
                            decode_equals_forward=[(2, T_LONG, [0, 1, CHUNK - 1, CHUNK, T_LONG - 2])],
                            continue_by_chunks=[(2, [1, CHUNK - 1, CHUNK, 3]), (2, [CHUNK + 2, T_LONG - CHUNK - 2])],
                            batch_independent=[(3, CHUNK + 3)], gradients=[(2, T_LONG, CHUNK + 1)],
                            state_roundtrip=[(3, 12)])
               for name, options in CONFIGS.items()),
             ContractCase("op-chunk-64",  # fla's default op chunk
                          functools.partial(make_layer, chunk_size=64, **CONFIGS["defaults-grouped-values"]), D_MODEL,
                          decode_equals_forward=[(1, 2 * 64 + 3, [2 * 64])], continue_by_chunks=[(1, [1, 63, 64, 3])])]


def test_state_holds_the_recurrent_matrix_and_the_conv_tails():
    layer = make_layer(**CONFIGS["defaults-grouped-values"])
    x = inputs(T=5)
    _, state = layer(x)
    assert state.kind == "recurrent" and state.seq_len == 5
    assert state.recurrent.shape == (2, 4, 8, 16) and state.recurrent.dtype == torch.float32
    assert state.q_conv.shape == state.k_conv.shape == (2, 16, 4) and state.v_conv.shape == (2, 64, 4)
    assert_close(state.q_conv[..., -1], layer.q_proj(x[:, -1]), what="q conv tail")  # the last conv input
    assert state.nbytes() == 4 * (2 * 4 * 8 * 16 + 2 * 2 * 16 * 4 + 2 * 64 * 4)
    _, no_conv = make_layer(**CONFIGS["no-gate-no-conv-neg-eigval"])(x)
    assert no_conv.q_conv is None and set(no_conv.state_dict()) == {"recurrent", "seq_len"}
    with pytest.raises(ValueError, match="v_conv"):
        layer(x, dataclasses.replace(state, v_conv=None))


def test_parameter_names_follow_fla():
    base = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "A_log",
            "dt_bias", "o_norm.weight", "o_proj.weight"}
    convs = {"q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"}
    assert set(make_layer(**CONFIGS["defaults-grouped-values"]).state_dict()) == base | convs | {"g_proj.weight"}
    assert set(make_layer(**CONFIGS["no-gate-no-conv-neg-eigval"]).state_dict()) == base
    with_bias = make_layer(**CONFIGS["sigmoid-gate-conv-bias"]).state_dict()
    assert {"q_conv1d.bias", "k_conv1d.bias", "v_conv1d.bias"} <= set(with_bias)


def test_defaults_and_gate_init_follow_fla():
    layer = build_mixer("gated_deltanet", 64)
    assert (layer.num_heads, layer.head_k_dim, layer.head_v_dim) == (6, 256, 512)  # fla's defaults
    assert layer.q_proj.weight.shape == (6 * 256, 64) and layer.v_proj.weight.shape == (6 * 512, 64)
    A = layer.A_log.exp()
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert ((A > 0) & (A <= 16)).all() and ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()


def test_registered_and_configured():
    assert get_mixer("gated_deltanet").cls is GatedDeltaNet and get_mixer_by_symbol("D").state_kind == "recurrent"
    with pytest.raises(ConfigError, match="num_v_heads"):
        build_mixer("gated_deltanet", 32, num_heads=2, num_v_heads=3)
    with pytest.raises(ConfigError, match="expand_v"):
        build_mixer("gated_deltanet", 32, head_dim=7, expand_v=1.5)
    with pytest.raises(ConfigError, match="output_gate_activation"):
        build_mixer("gated_deltanet", 32, output_gate_activation="relu")
    with pytest.raises(ConfigError, match="backend"):
        build_mixer("gated_deltanet", 32, backend="triton")
    with pytest.raises(ValueError, match="T>0"):
        make_layer(**CONFIGS["defaults-grouped-values"])(torch.zeros(1, 0, D_MODEL))


def test_state_from_another_layer_is_refused():
    layer = make_layer(**CONFIGS["defaults-grouped-values"])
    with pytest.raises(ValueError, match="GatedDeltaNetState"):
        layer(inputs(T=3), GatedDeltaNetState(recurrent=torch.zeros(2, 2, 8, 16)))


def test_cpu_path_imports_neither_fla_nor_triton():
    check_runs_without_fla("import torch\n"
                           "from blocks.registry import build_mixer\n"
                           "layer = build_mixer('gated_deltanet', 32, head_dim=8, num_heads=2)\n"
                           "y, s = layer(torch.randn(1, 70, 32)); layer(torch.randn(1, 1, 32), s)[0].sum().backward()\n")


@requires_triton
@pytest.mark.parity
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_fla_state_dict_loads_strictly(options):
    from fla.layers import GatedDeltaNet as FlaGatedDeltaNet

    fla_layer = FlaGatedDeltaNet(hidden_size=D_MODEL, layer_idx=0, **options)
    check_loads_fla_state_dict(build_mixer("gated_deltanet", D_MODEL, **options), fla_layer)


# ---------------------------------------------------------------- parity with fla (interpreter, slow)

FLA_T, FLA_PREFILL, FLA_STEPS = 100, 40, 3
FLA_CONFIGS = [CONFIGS["defaults-grouped-values"], CONFIGS["no-gate-no-conv-neg-eigval"]]


def _fla_case(configs: list[dict], x: Tensor, seed: int):
    """In the interpreter child, per config: fla's GatedDeltaNet full forward (grad enabled: chunk kernel)
    and cached prefill + decode (eval, no grad, <= 64 tokens: fused recurrent kernel)."""
    from fla.layers import GatedDeltaNet as FlaGatedDeltaNet
    from fla.models.utils import Cache

    results = []
    for i, options in enumerate(configs):
        torch.manual_seed(seed + i)
        layer = perturb(FlaGatedDeltaNet(hidden_size=D_MODEL, layer_idx=0, **options), seed=10 + i)
        y, *_ = layer(x)
        layer.eval()
        cache, outputs = Cache(), []
        with torch.no_grad():
            for lo, hi in [(0, FLA_PREFILL)] + [(t, t + 1) for t in range(FLA_PREFILL, FLA_PREFILL + FLA_STEPS)]:
                out, _, cache = layer(x[:, lo:hi], past_key_values=cache, use_cache=True)
                outputs.append(out)
        results.append({"state_dict": layer.state_dict(), "y": y.detach(), "y_cached": torch.cat(outputs, dim=1),
                        "recurrent": cache[0]["recurrent_state"], "conv": cache[0]["conv_state"]})
    return results


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
def test_equals_fla_gated_deltanet():
    x = inputs(T=FLA_T, seed=3)
    results = run_with_fla_kernels(_fla_case, configs=FLA_CONFIGS, x=x, seed=0)
    for options, fla in zip(FLA_CONFIGS, results):
        ours = build_mixer("gated_deltanet", D_MODEL, 0, backend="torch", **options)
        ours.load_state_dict(fla["state_dict"], strict=True)
        with torch.no_grad():
            y, _ = ours(x)
            state, outputs = None, []
            for lo, hi in [(0, FLA_PREFILL)] + [(t, t + 1) for t in range(FLA_PREFILL, FLA_PREFILL + FLA_STEPS)]:
                out, state = ours(x[:, lo:hi], state)
                outputs.append(out)
        assert_close(y, fla["y"], what=f"{options}: output vs chunk kernel")
        assert_close(torch.cat(outputs, dim=1), fla["y_cached"], what=f"{options}: prefill + decode output")
        # fla's layer caches the matrix V-first, [B, HV, V, K]
        assert_close(state.recurrent, fla["recurrent"].mT, what=f"{options}: recurrent state")
        if options.get("use_short_conv", True):
            for ours_tail, fla_tail, name in zip((state.q_conv, state.k_conv, state.v_conv), fla["conv"], "qkv"):
                assert_close(ours_tail, fla_tail, what=f"{options}: {name} conv state")
