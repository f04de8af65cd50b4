"""blocks/token_buffer.py: states that grow along the token axis, appended in place where that is safe."""

from __future__ import annotations

import pytest
import torch

from blocks.token_buffer import TokenBuffer, extend


@pytest.fixture(autouse=True)
def _inference():
    """The buffers are the inference path: without autograd (one test turns it back on)."""
    with torch.no_grad():
        yield


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 1, generator=g)


def test_views_always_equal_the_concatenation_and_move_only_when_full():
    held, buffer, moves, expected = _tokens(5, 0), None, 0, _tokens(5, 0)
    for step in range(12):
        new = _tokens(1 + step % 2, step + 1)
        before = buffer
        buffer, held = extend(buffer, held, new, spare=4)
        moves += buffer is not before
        expected = tuple(torch.cat([x, y], 2) for x, y in zip(expected, new))
        assert all(torch.equal(x, y) for x, y in zip(held, expected)), f"step {step}"
    assert moves == 4, "a new buffer at the first step, then whenever 4 spare tokens are used up"


def test_a_sliding_window_appends_in_place():
    buffer, held = extend(None, _tokens(6, 0), _tokens(2, 1), spare=8)
    window = tuple(x[:, :, -3:] for x in held)  # a state keeps only its last 3 tokens
    again, grown = extend(buffer, window, _tokens(1, 2), spare=8)
    assert again is buffer and grown[0].shape[2] == 4
    assert torch.equal(grown[0][:, :, :3], window[0]) and torch.equal(grown[0][:, :, 3:], _tokens(1, 2)[0])


def test_an_older_state_extended_again_is_copied_and_the_newer_one_stays():
    buffer, first = extend(None, _tokens(4, 0), _tokens(1, 1), spare=8)  # 5 tokens
    _, newer = extend(buffer, first, _tokens(1, 2), spare=8)  # 6, in place
    newer_copy = tuple(x.clone() for x in newer)
    branch_buffer, branch = extend(buffer, first, _tokens(1, 3), spare=8)  # first again: not at the end any more
    assert branch_buffer is not buffer
    assert all(torch.equal(x, y) for x, y in zip(newer, newer_copy)), "the branch wrote over the newer state"
    assert torch.equal(branch[0][:, :, 5:], _tokens(1, 3)[0]) and torch.equal(branch[0][:, :, :5], first[0])


def test_tensors_from_elsewhere_or_in_another_dtype_are_copied():
    buffer, held = extend(None, _tokens(4, 0), _tokens(1, 1), spare=8)
    lookalike = tuple(x.clone() for x in held)  # same values and shapes, other storage (a loaded state)
    assert extend(buffer, lookalike, _tokens(1, 2), spare=8)[0] is not buffer
    doubles = tuple(x.double() for x in _tokens(1, 2))
    moved, grown = extend(buffer, held, doubles, spare=8)
    assert moved is not buffer and grown[0].dtype == torch.float64


def test_inference_tensors_are_not_written_outside_inference_mode():
    with torch.inference_mode():
        buffer, held = extend(None, _tokens(4, 0), _tokens(1, 1), spare=8)
    moved, grown = extend(buffer, held, _tokens(1, 2), spare=8)  # torch would refuse the write: copied
    assert moved is not buffer and not grown[0].is_inference()
    assert isinstance(moved, TokenBuffer) and moved.capacity == 6 + 8


def test_with_autograd_it_concatenates_and_keeps_no_buffer():
    held, new = _tokens(4, 0), _tokens(1, 1)
    with torch.enable_grad():
        buffer, grown = extend(None, held, new, spare=8)
    assert buffer is None and all(torch.equal(x, torch.cat([a, b], 2)) for x, a, b in zip(grown, held, new))
