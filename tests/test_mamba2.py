"""The Mamba2 mixer: the state contract, the SSD-as-simple-GLA mapping against a plain SSM loop,
validation, and parity with fla's ``Mamba2`` (state_dict names in-process; outputs and states
through the interpreter)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from blocks.config import ConfigError
from blocks.mamba2 import Mamba2, Mamba2Config, Mamba2State
from blocks.ops.gla import CHUNK_SIZE_PER_HEAD as CHUNK
from blocks.registry import get_mixer, get_mixer_by_symbol
from blocks.state import StateError
from fla_interpreter import requires_fla_interpreter, requires_triton, run_with_fla_kernels
from mixer_checks import ContractCase, MixerContract, assert_close, check_loads_fla_state_dict, check_runs_without_fla

D_MODEL = 32
SMALL = {"head_dim": 16, "state_size": 8}
CONFIGS = {
    "default": {},
    "groups-hdim-D-norm-first": {"n_groups": 2, "D_has_hdim": True, "norm_before_gate": True, "conv_init": 0.5},
    "no-rmsnorm-dt-limit-bias": {"rmsnorm": False, "dt_limit": [0.01, 0.05], "use_bias": True, "use_conv_bias": False},
}


def make_mixer(options: dict, seed: int = 0, d_model: int = D_MODEL) -> Mamba2:
    torch.manual_seed(seed)
    return Mamba2(Mamba2Config(**{**SMALL, "backend": "torch", **options}), d_model=d_model, layer_idx=2)


def make_x(B=2, T=40, seed=1, d_model=D_MODEL):
    return torch.randn(B, T, d_model, generator=torch.Generator().manual_seed(seed))


def ssm_oracle(mixer: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba2 written as its selective-SSM recurrence, one token at a time in fp64 (the final norm
    and projection in fp32), straight from the mixer's parameters, independent of the simple-GLA mapping."""
    cfg, H, P, N, G = mixer.config, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    with torch.no_grad():
        z, xBC, dt = mixer.in_proj(x).double().split([mixer.intermediate_size, mixer.conv_dim, H], dim=-1)
        w, b = mixer.conv1d.weight.double(), mixer.conv1d.bias
        xBC = F.conv1d(xBC.transpose(1, 2), w, None if b is None else b.double(), padding=w.shape[-1] - 1,
                       groups=mixer.conv_dim)[..., :x.shape[1]].transpose(1, 2)
        xs, Bm, Cm = F.silu(xBC).split([mixer.intermediate_size, G * N, G * N], dim=-1)
        dt = F.softplus(dt + mixer.dt_bias.double()).clamp(*cfg.dt_limit)            # [B, T, H]
        A, D = -torch.exp(mixer.A_log.double()), mixer.D.double().view(H, -1)
        h = torch.zeros(x.shape[0], H, P, N, dtype=torch.float64)
        ys = []
        for t in range(x.shape[1]):
            x_t = xs[:, t].view(-1, H, P)
            B_t, C_t = (m[:, t].view(-1, G, 1, N).expand(-1, G, H // G, N).reshape(-1, H, N) for m in (Bm, Cm))
            h = torch.exp(A * dt[:, t])[..., None, None] * h + (x_t * dt[:, t, :, None])[..., None] * B_t[:, :, None]
            ys.append(torch.einsum("bhpn,bhn->bhp", h, C_t) + D * x_t)
        y, z = torch.stack(ys, dim=1).flatten(-2).float(), z.float()  # the norm and out_proj are not under test
        return mixer.out_proj(mixer.norm(y, z) if cfg.rmsnorm else y * F.silu(z))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("T", [1, CHUNK - 1, 2 * CHUNK + 3])
def test_forward_equals_ssm_recurrence(name, T):
    mixer = make_mixer(CONFIGS[name])
    x = make_x(T=T)
    y, _ = mixer(x)
    assert_close(y, ssm_oracle(mixer, x), what=f"{name}, T={T}")


class TestContract(MixerContract):
    cases = [ContractCase(name, functools.partial(make_mixer, options), D_MODEL, seed=1,
                          decode_equals_forward=[(2, 70, [0, 1, CHUNK - 1, CHUNK, 69])],
                          continue_by_chunks=[(2, [1, CHUNK - 1, CHUNK, 3]), (2, [CHUNK + 1, 2, 5]),
                                              (2, [2 * CHUNK + 3, 1])],
                          batch_independent=[(3, 40)], gradients=[(2, 40, None)], state_roundtrip=[(2, 40)])
             for name, options in CONFIGS.items()]


def test_state_layout_and_size():
    mixer = make_mixer({})
    _, state = mixer(make_x(T=5))
    assert isinstance(state, Mamba2State) and state.kind == "recurrent" and state.seq_len == 5
    assert state.ssm.shape == (2, 4, 8, 16) and state.ssm.dtype == torch.float32  # [B, H, N, P]
    assert state.conv.shape == (2, 64 + 2 * 8, 4)                                   # [B, conv_dim, W]
    assert state.nbytes() == 4 * (2 * 4 * 8 * 16 + 2 * 80 * 4)


def test_default_initialisation_follows_fla():
    mixer = Mamba2(Mamba2Config(), d_model=128)
    assert mixer.num_heads == 4 and mixer.head_dim == 64 and mixer.ssm_state_size == 128
    A = torch.exp(mixer.A_log)
    dt = F.softplus(mixer.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert torch.equal(mixer.D, torch.ones(4)) and torch.equal(mixer.norm.weight, torch.ones(256))
    assert mixer.in_proj.weight.shape == (256 + 256 + 2 * 128 + 4, 128) and mixer.in_proj.bias is None


def test_registered_by_name_and_symbol():
    spec = get_mixer("mamba2")
    assert spec.cls is Mamba2 and spec.symbol == "M" and spec.state_kind == "recurrent"
    assert get_mixer_by_symbol("M") is spec


@pytest.mark.parametrize("options,field", [
    ({"head_dim": 0}, "head_dim"), ({"n_groups": -1}, "n_groups"), ({"hidden_act": "gelu"}, "hidden_act"),
    ({"A_init_range": (0, 4)}, "A_init_range"), ({"A_init_range": (4, 1)}, "A_init_range"),
    ({"dt_limit": [0.1]}, "dt_limit"), ({"dt_min": 0.5}, "dt_min"), ({"backend": "triton"}, "backend"),
    ({"conv_init": -1.0}, "conv_init"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError) as error:
        Mamba2Config(**options)
    assert error.value.field == field


def test_options_that_do_not_fit_d_model_are_refused():
    with pytest.raises(ConfigError, match="head_dim"):
        Mamba2(Mamba2Config(head_dim=24), d_model=D_MODEL)
    with pytest.raises(ConfigError, match="num_heads"):
        Mamba2(Mamba2Config(head_dim=16, num_heads=3), d_model=D_MODEL)
    with pytest.raises(ConfigError, match="n_groups"):
        Mamba2(Mamba2Config(head_dim=16, n_groups=3), d_model=D_MODEL)


def test_bad_input_and_foreign_state_are_refused():
    mixer = make_mixer({})
    with pytest.raises(ValueError, match="x must be"):
        mixer(torch.randn(2, 0, D_MODEL))
    _, other = make_mixer({"state_size": 4})(make_x(T=3))
    with pytest.raises(StateError, match="state.ssm"):
        mixer(make_x(T=2), other)
    _, state = mixer(make_x(T=3))
    with pytest.raises(StateError, match="state.ssm"):
        mixer(make_x(B=1, T=2), state)
    with pytest.raises(StateError, match="continues only a Mamba2State"):
        mixer(make_x(T=2), {"ssm": state.ssm})


def test_cpu_path_imports_neither_fla_nor_triton():
    check_runs_without_fla("import torch, blocks.mamba2 as m\n"
                           "layer = m.Mamba2(m.Mamba2Config(head_dim=16, state_size=8), d_model=32)\n"
                           "y, s = layer(torch.randn(1, 5, 32)); layer(torch.randn(1, 1, 32), s)[0].sum().backward()\n")


@requires_triton
@pytest.mark.parametrize("name", CONFIGS)
def test_fla_state_dict_loads_strictly(name):
    from fla.layers import Mamba2 as FlaMamba2

    fla_layer = FlaMamba2(hidden_size=D_MODEL, **{**SMALL, **CONFIGS[name]})
    check_loads_fla_state_dict(make_mixer(CONFIGS[name]), fla_layer)


def _fla_mamba2_case(T, decode_steps, grouped_steps):
    """In the interpreter child: fla's Mamba2 (a) prefill T tokens with a cache, then one-token
    steps; (b) with n_groups=2, every token through its one-token (mamba_ssm-style) path."""
    from fla.layers import Mamba2 as FlaMamba2
    from fla.models.utils import Cache

    torch.manual_seed(0)
    layer = FlaMamba2(hidden_size=64, layer_idx=0, **SMALL)
    x = torch.randn(2, T + decode_steps, 64)
    cache = Cache()
    with torch.no_grad():
        ys = [layer(x[:, :T], past_key_values=cache, use_cache=True)[0]]
        prefill = {"ssm": cache[0]["recurrent_state"].clone(), "conv": cache[0]["conv_state"].clone()}
        ys += [layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0] for t in range(T, T + decode_steps)]

    torch.manual_seed(1)
    grouped = FlaMamba2(hidden_size=64, layer_idx=0, n_groups=2, **SMALL)
    x_grouped = torch.randn(2, grouped_steps, 64)
    cache = Cache()
    cache.update(recurrent_state=torch.zeros(2, grouped.num_heads, grouped.head_dim, grouped.ssm_state_size),
                 conv_state=torch.zeros(2, grouped.conv_dim, grouped.conv_kernel_size), layer_idx=0, offset=0)
    with torch.no_grad():
        y_grouped = [grouped(x_grouped[:, t:t + 1], past_key_values=cache, use_cache=True)[0]
                     for t in range(grouped_steps)]
    return {"state_dict": layer.state_dict(), "x": x, "y": torch.cat(ys, dim=1), "prefill": prefill,
            "grouped_state_dict": grouped.state_dict(), "x_grouped": x_grouped, "y_grouped": torch.cat(y_grouped, dim=1)}


@requires_fla_interpreter
@pytest.mark.parity
@pytest.mark.slow
def test_equals_fla_layer():
    """fla's Mamba2 (its Triton norm and activation interpreted; SSD in its torch path): same
    weights give the same prefill output, states (fla keeps the SSM state as [B, H, P, N]) and
    decode steps. With n_groups=2 we match fla's one-token path (heads read groups as in mamba_ssm)."""
    T = 70
    fla = run_with_fla_kernels(_fla_mamba2_case, T=T, decode_steps=3, grouped_steps=6)
    ours = make_mixer({}, d_model=64)
    ours.load_state_dict(fla["state_dict"], strict=True)
    x = fla["x"]
    with torch.no_grad():
        y, state = ours(x[:, :T])
        assert_close(state.ssm, fla["prefill"]["ssm"].transpose(-1, -2), what="prefill SSM state")
        assert_close(state.conv, fla["prefill"]["conv"], what="prefill conv state")
        y_rest, _ = ours(x[:, T:], state)
    assert_close(torch.cat([y, y_rest], dim=1), fla["y"], what="prefill + decode outputs")

    grouped = make_mixer({"n_groups": 2}, d_model=64)
    grouped.load_state_dict(fla["grouped_state_dict"], strict=True)
    with torch.no_grad():
        assert_close(grouped(fla["x_grouped"])[0], fla["y_grouped"], what="n_groups=2 vs fla's one-token path")
