"""What the tests of the linear-RNN ops (tests/test_ops_*.py) share: an op's gradients against those
of its defining recurrence run token by token in fp64."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mixer_checks import assert_close


def check_gradients_equal_the_token_loop(op: Callable, oracle: Callable, inputs: Sequence[Tensor],
                                         initial_state: Tensor, scale: float, names: Sequence[str], rtol: float,
                                         **options) -> None:
    """``op(*inputs, scale=scale, initial_state=..., output_final_state=True, **options)`` and
    ``oracle(*inputs, scale, initial_state)`` (on fp64 copies) give the same gradients of
    ``sum(o * w_o) + sum(state * w_s)``, for random weights w, with respect to every input and the
    initial state (``names``, in that order, name them in the messages)."""
    leaves = [x.clone().requires_grad_() for x in (*inputs, initial_state)]
    o, state = op(*leaves[:-1], scale=scale, initial_state=leaves[-1], output_final_state=True, **options)
    w_o, w_s = torch.randn_like(o), torch.randn_like(state)
    grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    o_ref, state_ref = oracle(*ref_leaves[:-1], scale, ref_leaves[-1])
    ref_grads = torch.autograd.grad((o_ref * w_o.double()).sum() + (state_ref * w_s.double()).sum(), ref_leaves)
    assert len(names) == len(leaves)
    for name, grad, ref in zip(names, grads, ref_grads):
        assert_close(grad, ref, rtol=rtol, what=f"d/d{name}")
