"""RoPE: both layouts against rotation by complex numbers, the in-place inference path against the
differentiable one, and the projections that use either."""

import pytest
import torch

from blocks.kvm import KVMAttention, KVMConfig
from blocks.rope import RotaryEmbedding

THETA = 500.0


def rotated_by_complex_numbers(x: torch.Tensor, start: int, rotary_dim: int, style: str) -> torch.Tensor:
    """x (B, H, T, d) rotated from first principles in float64: pair i at position p is the complex
    number a + ib, multiplied by exp(i p w_i) (llama: pairs (i, i + R/2)) or exp(-i p w_i) (the
    KVM paper: adjacent pairs (2i, 2i + 1), turned the other way)."""
    half = rotary_dim // 2
    pos = torch.arange(start, start + x.shape[-2], dtype=torch.float64)[:, None]
    if style == "kvm_paper":
        freq = (1.0 / THETA) ** torch.linspace(0, 1, half, dtype=torch.float64)
        first, second, sign = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2], -1.0
    else:
        freq = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
        first, second, sign = x[..., :half], x[..., half:rotary_dim], 1.0
    z = torch.complex(first.double(), second.double()) * torch.polar(torch.ones((), dtype=torch.float64), sign * pos * freq)
    out = x.double().clone()
    if style == "kvm_paper":
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = z.real, z.imag
    else:
        out[..., :half], out[..., half:rotary_dim] = z.real, z.imag
    return out


def projection_layout(b: int, h: int, t: int, d: int, dtype=torch.float32) -> torch.Tensor:
    """(B, H, T, d) as projections give it: a transposed view of a (B, T, H, d) tensor."""
    return torch.randn(b, t, h, d).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("style", ["kvm_paper", "llama"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (16, 8), (13, 6)])
def test_forward_and_in_place_rotation_equal_rotation_by_complex_numbers(style, head_dim, rotary_dim):
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim, rotary_dim, THETA, style)
    x, start = projection_layout(2, 3, 40, head_dim), 1000
    expected = rotated_by_complex_numbers(x, start, rotary_dim, style)
    tol = {"atol": 2e-4, "rtol": 1e-4}  # fp32 angles at positions ~1000: ~6e-5 rad off
    torch.testing.assert_close(rope(x, start).double(), expected, **tol)
    angles = rope.angles(start, x.shape[-2], x.device)
    with torch.no_grad():
        inplace = x.clone()  # keeps x's (B, T, H, d) layout
        assert rope.rotate_(inplace, angles) is inplace
    torch.testing.assert_close(inplace.double(), expected, **tol)
    assert torch.equal(inplace[..., rotary_dim:], x[..., rotary_dim:])  # the other dims untouched


@pytest.mark.parametrize("style", ["kvm_paper", "llama"])
def test_in_place_rotation_of_low_precision_tensors_rounds_once_like_forward(style):
    torch.manual_seed(1)
    rope = RotaryEmbedding(16, 8, THETA, style, round_bf16=True)
    x = projection_layout(1, 2, 64, 16, torch.bfloat16)
    with torch.no_grad():
        inplace = rope.rotate_(x.clone(), rope.angles(7, 64, x.device))
    assert inplace.dtype == torch.bfloat16
    torch.testing.assert_close(inplace, rope(x, 7), atol=0, rtol=0.01)  # fp32 inside, one bf16 rounding


@pytest.mark.parametrize("style", ["kvm_paper", "llama"])
def test_the_gradient_is_the_inverse_rotation(style):
    torch.manual_seed(2)
    rope = RotaryEmbedding(16, 12, THETA, style)
    x = projection_layout(1, 2, 20, 16).requires_grad_()
    upstream = torch.randn(1, 2, 20, 16)
    rope(x, 3).backward(upstream)
    cos, sin = rope.angles(3, 20, x.device)
    torch.testing.assert_close(x.grad, rope(upstream, 3, (cos, -sin)), atol=1e-6, rtol=1e-5)


def test_in_place_rotation_refuses_a_tensor_that_needs_its_gradient():
    rope = RotaryEmbedding(8, 8, THETA)
    x = torch.randn(1, 1, 4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"torch.no_grad\(\), or use forward\(\)"):
        rope.rotate_(x, rope.angles(0, 4, x.device))


@pytest.mark.parametrize("style", ["kvm_paper", "llama"])
def test_projections_rotate_in_place_without_autograd_and_equal_the_differentiable_path(style):
    torch.manual_seed(3)
    cfg = KVMConfig(num_heads=4, num_kv_heads=2, chunk_len=8, rope_partial_dim=8, rope_style=style, qk_norm="rmsnorm")
    layer = KVMAttention(cfg, 64)
    x = torch.randn(2, 24, 64)
    kept = x.clone()
    with torch.no_grad():
        q0, k0, v0, _ = layer.project(x, 100, None, None)
    q1, k1, v1, _ = layer.project(x, 100, None, None)  # autograd on: forward()
    assert q1.requires_grad
    for fast, reference in ((q0, q1), (k0, k1), (v0, v1)):
        torch.testing.assert_close(fast, reference.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(x, kept)
