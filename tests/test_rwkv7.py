"""RWKV-7 mixer: the state contract, the v_first stream through ctx, fla's names and init, and parity
with fla.layers.RWKV7Attention (its real kernels, through Triton's interpreter)."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from blocks.config import ConfigError
from blocks.registry import build_mixer, get_mixer, get_mixer_by_symbol
from blocks.rwkv7 import RWKV7Attention, RWKV7State
from blocks.state import LayerState
from fla_interpreter import requires_fla_interpreter, requires_triton, run_with_fla_kernels
from mixer_checks import ContractCase, MixerContract, assert_close, check_loads_fla_state_dict, check_runs_without_fla

D_MODEL, HEAD_DIM = 32, 8
CHUNK = 16  # a small op chunk so that short inputs cross chunk boundaries
T_LONG = 2 * CHUNK + 3

FLA_NAMES = {
    "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k",
    "r_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
    "w_lora.lora.0.weight", "w_lora.lora.2.weight", "w_lora.lora.2.bias",
    "a_lora.lora.0.weight", "a_lora.lora.2.weight", "a_lora.lora.2.bias",
    "g_lora.lora.0.weight", "g_lora.lora.2.weight", "g_norm.weight", "g_norm.bias",
}
V_LORA_NAMES = {"v_lora.lora.0.weight", "v_lora.lora.2.weight", "v_lora.lora.2.bias"}


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Add noise to every parameter: fla's init zeroes o_proj (and LoRA down-projections), which would
    make every output 0 and every check vacuous."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def make_layer(layer_idx: int = 0, seed: int = 0, **options) -> RWKV7Attention:
    options = {"head_dim": HEAD_DIM, "num_hidden_layers": 2, "chunk_size": CHUNK, "backend": "torch", **options}
    torch.manual_seed(seed)
    return perturb(build_mixer("rwkv7", D_MODEL, layer_idx, **options), seed)


@dataclasses.dataclass
class StackState(LayerState):
    """The two RWKV7States of :class:`RWKV7Stack`, flattened into one contract state."""

    kind: ClassVar[str] = "recurrent"

    recurrent0: Tensor
    shift0: Tensor
    recurrent1: Tensor
    shift1: Tensor
    seq_len: int = 0


class RWKV7Stack(nn.Module):
    """Layers 0 and 1 with residuals, one fresh ctx per call: layer 1 reads layer 0's v_first, so the
    contract checks cover the cross-layer stream too."""

    def __init__(self, **options):
        super().__init__()
        self.first = make_layer(0, seed=1, **options)
        self.second = make_layer(1, seed=2, **options)

    def forward(self, x: Tensor, state: StackState | None = None) -> tuple[Tensor, StackState]:
        ctx: dict = {}
        s0 = s1 = None
        if state is not None:
            s0 = RWKV7State(state.recurrent0, state.shift0, state.seq_len)
            s1 = RWKV7State(state.recurrent1, state.shift1, state.seq_len)
        h, s0 = self.first(x, s0, ctx)
        y, s1 = self.second(x + h, s1, ctx)
        return y, StackState(s0.recurrent, s0.shift, s1.recurrent, s1.shift, s1.seq_len)


CONFIGS = {
    "defaults": {},
    "fused-norm-wide-values": {"fuse_norm": True, "value_dim": 2 * D_MODEL, "elementwise_affine": False},
}


def inputs(B=2, T=T_LONG, seed=0) -> Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


class TestContract(MixerContract):
    # Layers 0 and 1 as a stack (v_first through ctx) and layer 0 alone; gradients and state round
    # trips with the defaults; fla's default op chunk (64) crossed too.
    cases = [
        *(ContractCase(f"stack-{name}", functools.partial(RWKV7Stack, **options), D_MODEL,
                       decode_equals_forward=[(2, T_LONG, [0, 1, CHUNK - 1, CHUNK, T_LONG - 2])],
                       continue_by_chunks=[(2, [1, CHUNK - 1, CHUNK, 3]), (2, [CHUNK + 2, T_LONG - CHUNK - 2])],
                       batch_independent=[(3, CHUNK + 3)],
                       gradients=[(2, T_LONG, CHUNK + 1)] if name == "defaults" else [],
                       state_roundtrip=[(3, 20)] if name == "defaults" else [])
          for name, options in CONFIGS.items()),
        *(ContractCase(f"layer0-{name}", functools.partial(make_layer, 0, **options), D_MODEL,
                       continue_by_chunks=[(2, [CHUNK - 1, 1, T_LONG - CHUNK])],
                       state_roundtrip=[(3, 20)] if name == "defaults" else [])
          for name, options in CONFIGS.items()),
        ContractCase("stack-op-chunk-64", functools.partial(RWKV7Stack, chunk_size=64), D_MODEL,
                     decode_equals_forward=[(1, 2 * 64 + 3, [2 * 64])], continue_by_chunks=[(1, [1, 63, 64, 3])]),
    ]


def test_state_holds_the_recurrent_matrix_and_the_shift_tail():
    layer = make_layer(0)
    x = inputs(T=5)
    _, state = layer(x)
    assert state.kind == "recurrent" and state.seq_len == 5
    assert state.recurrent.shape == (2, D_MODEL // HEAD_DIM, HEAD_DIM, HEAD_DIM) and state.recurrent.dtype == torch.float32
    assert torch.equal(state.shift, x[:, -1])
    assert state.nbytes() == 4 * (2 * 4 * 8 * 8 + 2 * D_MODEL)
    with pytest.raises(ValueError, match="shape"):
        layer(x, dataclasses.replace(state, shift=state.shift[:, :3]))


def test_v_first_flows_through_ctx():
    first, second = make_layer(0), make_layer(1)
    x = inputs(T=7)
    ctx: dict = {}
    first(x, None, ctx)
    shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    assert_close(ctx["v_first"], first.v_proj(torch.addcmul(x, shifted - x, first.x_v)), what="v_first")
    y, _ = second(x, None, ctx)
    y_other, _ = second(x, None, {"v_first": torch.randn_like(ctx["v_first"])})
    assert not torch.allclose(y, y_other), "layer 1's output does not depend on v_first"
    with pytest.raises(ValueError, match="v_first"):
        second(x)
    with pytest.raises(ValueError, match="v_first"):
        second(x, None, {"v_first": ctx["v_first"][:, :3]})


def test_v_first_source_follows_layer_idx_unless_set():
    assert not hasattr(make_layer(0), "v_lora") and hasattr(make_layer(1), "v_lora")
    first_in_hybrid = make_layer(3, v_first_source=True, num_hidden_layers=4)
    assert not hasattr(first_in_hybrid, "v_lora")
    ctx: dict = {}
    first_in_hybrid(inputs(T=4), None, ctx)
    assert ctx["v_first"].shape == (2, 4, D_MODEL)


def test_parameter_names_follow_fla():
    assert set(make_layer(0).state_dict()) == FLA_NAMES
    assert set(make_layer(1).state_dict()) == FLA_NAMES | V_LORA_NAMES
    no_affine = make_layer(1, elementwise_affine=False)
    assert set(no_affine.state_dict()) == (FLA_NAMES | V_LORA_NAMES) - {"g_norm.weight", "g_norm.bias"}


def test_fresh_layer_outputs_zero_like_fla():
    """fla zero-initialises o_proj, so an untrained RWKV-7 block starts as the identity of its residual."""
    layer = build_mixer("rwkv7", D_MODEL, 0, head_dim=HEAD_DIM, num_hidden_layers=4)
    y, _ = layer(inputs(T=5))
    assert torch.equal(y, torch.zeros_like(y))
    assert (layer.x_r > -1e-6).all() and (layer.x_r <= 1).all()


def test_registered_and_configured():
    assert get_mixer("rwkv7").cls is RWKV7Attention and get_mixer_by_symbol("R").state_kind == "recurrent"
    default = build_mixer("rwkv7", 128)
    assert (default.num_heads, default.head_dim) == (2, 64)  # fla's default head_dim=64
    assert build_mixer("rwkv7", 128, head_dim=None, num_heads=4).head_dim == 32
    with pytest.raises(ConfigError, match="num_heads"):
        build_mixer("rwkv7", 128, num_heads=4)  # head_dim 64 (default) x 4 heads != 128
    with pytest.raises(ConfigError, match="head_dim"):
        build_mixer("rwkv7", 100, head_dim=64)
    with pytest.raises(ConfigError, match="backend"):
        build_mixer("rwkv7", 128, backend="cuda")
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        build_mixer("rwkv7", 128, layer_idx=2, num_hidden_layers=2)
    with pytest.raises(ValueError, match="T>0"):
        default(torch.zeros(1, 0, 128))


def test_cpu_path_imports_neither_fla_nor_triton():
    check_runs_without_fla("import torch\n"
                           "from blocks.registry import build_mixer\n"
                           "first, second = (build_mixer('rwkv7', 32, i, head_dim=8, num_hidden_layers=2) "
                           "for i in (0, 1))\n"
                           "ctx = {}; x = torch.randn(1, 20, 32)\n"
                           "y, s = second(x + first(x, None, ctx)[0], None, ctx); y.sum().backward()\n")


# fla 0.6's RWKV7Attention cannot be built with elementwise_affine=False (its init writes g_norm.weight)
# nor with value_dim != hidden_size (its init copies d_model-sized bias vectors into value_dim ones)
FLA_BUILDABLE = {"defaults": {}, "fuse-norm": {"fuse_norm": True}}


@requires_triton
@pytest.mark.parity
@pytest.mark.parametrize("options", FLA_BUILDABLE.values(), ids=FLA_BUILDABLE.keys())
@pytest.mark.parametrize("layer_idx", [0, 1])
def test_fla_state_dict_loads_strictly(options, layer_idx):
    from fla.layers import RWKV7Attention as FlaRWKV7

    fla_layer = FlaRWKV7(hidden_size=D_MODEL, head_dim=HEAD_DIM, layer_idx=layer_idx, num_hidden_layers=2, **options)
    ours = build_mixer("rwkv7", D_MODEL, layer_idx, head_dim=HEAD_DIM, num_hidden_layers=2, **options)
    check_loads_fla_state_dict(ours, fla_layer)


# ---------------------------------------------------------------- parity with fla (interpreter, slow)

FLA_T, FLA_PREFILL, FLA_STEPS = 100, 40, 3


def _fla_case(fuse_norm: bool, x: Tensor, seed: int):
    """In the interpreter child: two fla RWKV7Attention layers, full forward (chunk kernel, grad enabled)
    and cached prefill + decode (eval, no grad, < 64 tokens: fused recurrent kernel)."""
    from fla.layers import RWKV7Attention as FlaRWKV7
    from fla.models.utils import Cache

    torch.manual_seed(seed)
    layers = [FlaRWKV7(hidden_size=D_MODEL, head_dim=HEAD_DIM, layer_idx=i, num_hidden_layers=2, fuse_norm=fuse_norm)
              for i in range(2)]
    fresh = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    for i, layer in enumerate(layers):
        perturb(layer, seed=10 + i)

    y0, _, _, v_first = layers[0](x)
    y1, *_ = layers[1](x + y0, v_first=v_first)

    cache, outputs = Cache(), []
    for layer in layers:
        layer.eval()  # fla's layer takes the chunk kernel whenever .training is set, even for one token
    with torch.no_grad():
        for lo, hi in [(0, FLA_PREFILL)] + [(t, t + 1) for t in range(FLA_PREFILL, FLA_PREFILL + FLA_STEPS)]:
            h, _, cache, vf = layers[0](x[:, lo:hi], past_key_values=cache, use_cache=True)
            out, _, cache, _ = layers[1](x[:, lo:hi] + h, past_key_values=cache, use_cache=True, v_first=vf)
            outputs.append(out)
    return {
        "fresh": fresh, "state_dicts": [layer.state_dict() for layer in layers],
        "y0": y0.detach(), "v_first": v_first.detach(), "y1": y1.detach(), "y_cached": torch.cat(outputs, dim=1),
        "recurrent": [cache[i]["recurrent_state"] for i in range(2)], "shift": [cache[i]["conv_state"] for i in range(2)],
    }


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("fuse_norm", [False, True], ids=["layer-default", "model-default-fuse-norm"])
def test_equals_fla_rwkv7_layers(fuse_norm):
    x = inputs(T=FLA_T, seed=3)
    fla = run_with_fla_kernels(_fla_case, fuse_norm=fuse_norm, x=x, seed=0)
    ours = [build_mixer("rwkv7", D_MODEL, i, head_dim=HEAD_DIM, num_hidden_layers=2, fuse_norm=fuse_norm,
                        backend="torch") for i in range(2)]

    # same deterministic init (everything but the random orthogonal / LoRA matrices)
    for layer, fresh in zip(ours, fla["fresh"]):
        for name, value in layer.state_dict().items():
            if name.startswith(("x_", "k_k", "k_a", "r_k", "g_norm")) or name.endswith("lora.2.bias"):
                assert_close(value, fresh[name], rtol=1e-6, what=f"init of {name}")
            if name in ("o_proj.weight",) or name.endswith("lora.0.weight"):
                assert torch.equal(value, fresh[name]), f"{name} must start at zero"

    for layer, state_dict in zip(ours, fla["state_dicts"]):
        layer.load_state_dict(state_dict, strict=True)
    ctx: dict = {}
    with torch.no_grad():
        y0, _ = ours[0](x, None, ctx)
        y1, _ = ours[1](x + y0, None, ctx)
    # with grad, fla's layer runs chunk_rwkv7 with its gate bound (64-token chunks, decays factored as
    # exp(G_i) * exp(-G_j)): ~4e-5 relative error per op (tests/test_ops_dplr.py), ~4e-4 after two layers
    # here. The cached path below runs fla's exact recurrent kernel and is held to the fp32 tolerance.
    assert_close(y0, fla["y0"], rtol=1e-3, what="layer 0 output")
    assert_close(ctx["v_first"], fla["v_first"], what="v_first")
    assert_close(y1, fla["y1"], rtol=1e-3, what="layer 1 output")

    states, outputs = [None, None], []
    with torch.no_grad():
        for lo, hi in [(0, FLA_PREFILL)] + [(t, t + 1) for t in range(FLA_PREFILL, FLA_PREFILL + FLA_STEPS)]:
            ctx = {}
            h, states[0] = ours[0](x[:, lo:hi], states[0], ctx)
            out, states[1] = ours[1](x[:, lo:hi] + h, states[1], ctx)
            outputs.append(out)
    assert_close(torch.cat(outputs, dim=1), fla["y_cached"], what="prefill + decode output")
    for i in range(2):
        assert_close(states[i].recurrent, fla["recurrent"][i], what=f"layer {i} recurrent state")
        assert_close(states[i].shift, fla["shift"][i], what=f"layer {i} token-shift state")
