"""The contract every token mixer keeps, as checks and as a test suite the per-mixer test files run.

Every mixer follows ``forward(x, state=None, ctx=None) -> (y, state)`` (see blocks/registry.py).
Each check below runs a mixer on a small fp32 input ``x`` [B, T, d_model] and raises
``AssertionError`` with the worst difference when the contract breaks:

* ``check_decode_equals_forward``: prefill p tokens, then decode one token at a time == full forward;
* ``check_continue_by_chunks``: consecutive calls over any split of the sequence == full forward;
* ``check_batch_independent``: each batch row alone == that row in the batch;
* ``check_gradients``: gradients reach the input (also through a carried state) and the parameters;
* ``check_state_roundtrip``: ``state_dict`` / ``from_state_dict`` / ``load_state_dict`` / ``select`` /
  ``nbytes`` preserve what the state means.

The checks never rely on a state being left unmodified by ``forward``; they snapshot it themselves.
Tolerances are for fp32: the worst absolute difference, relative to the largest reference value.

The mixers that follow an fla layer keep two promises besides, checked by
``check_runs_without_fla`` (their CPU path imports neither fla nor Triton) and
``check_loads_fla_state_dict`` (they load the fla layer's weights strictly).

``MixerContract`` runs the five checks as tests: a test file lists its mixer configurations as
``ContractCase``s in a subclass named ``Test...``, and pytest collects one test per check and run.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from blocks.state import LayerState, StateError

RTOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, what: str = "output") -> None:
    """``max|actual - expected| <= rtol * max(max|expected|, 1e-6)``, with a message naming ``what``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.float().abs().max().item() if expected.numel() else 0.0, 1e-6)
    if not diff <= rtol * scale:  # also catches NaN
        raise AssertionError(f"{what}: max abs diff {diff:.3e} exceeds {rtol:.0e} x max|expected| ({scale:.3e})")


def _clone_state(state: LayerState) -> LayerState:
    """A deep copy through the public state_dict round trip (independent of in-place updates)."""
    return type(state).from_state_dict({k: v.clone() for k, v in state.state_dict().items()})


def _seq_len(state: LayerState) -> int | None:
    return getattr(state, "seq_len", None)


def _run_in_pieces(mixer, x: Tensor, lengths: Sequence[int], state: LayerState | None = None):
    """Feed ``x`` through ``mixer`` in consecutive pieces of the given lengths; returns (y, state)."""
    ys, start = [], 0
    for n in lengths:
        y, state = mixer(x[:, start:start + n], state)
        if y.shape[:2] != (x.shape[0], n):
            raise AssertionError(f"a call on {n} tokens returned output of shape {tuple(y.shape)}")
        ys.append(y)
        start += n
    return torch.cat(ys, dim=1), state


@torch.no_grad()
def check_decode_equals_forward(mixer, x: Tensor, prefill_lens: Sequence[int], rtol: float = RTOL) -> None:
    """For each p in ``prefill_lens``: prefill ``x[:, :p]`` in one call (none when p == 0), then
    decode the remaining tokens one call per token; the concatenated outputs equal one full forward
    and the final state counts every token."""
    total = x.shape[1]
    y_full, _ = mixer(x)
    for p in prefill_lens:
        if not 0 <= p <= total:
            raise ValueError(f"prefill length {p} outside [0, {total}]")
        y, state = _run_in_pieces(mixer, x, ([p] if p else []) + [1] * (total - p))
        assert_close(y, y_full, rtol, f"prefill {p} + {total - p} decode steps vs full forward")
        if _seq_len(state) is not None and _seq_len(state) != total:
            raise AssertionError(f"state.seq_len is {_seq_len(state)} after {total} tokens")


@torch.no_grad()
def check_continue_by_chunks(mixer, x: Tensor, splits: Sequence[int], rtol: float = RTOL) -> None:
    """Run ``x`` as consecutive calls of lengths ``splits`` (summing to T), each continuing the
    previous call's state; outputs and the final state equal those of one full call."""
    if sum(splits) != x.shape[1] or any(n <= 0 for n in splits):
        raise ValueError(f"splits {list(splits)} must be positive and sum to T={x.shape[1]}")
    y_full, state_full = mixer(x)
    y, state = _run_in_pieces(mixer, x, splits)
    assert_close(y, y_full, rtol, f"continuing by chunks {list(splits)} vs full forward")
    full = state_full.state_dict()
    for name, value in state.state_dict().items():
        assert_close(value, full[name], rtol, f"final state '{name}' after chunks {list(splits)}")


@torch.no_grad()
def check_batch_independent(mixer, x: Tensor, rtol: float = RTOL) -> None:
    """Each row of a batch gives the same output alone, and changing one row changes no other."""
    if x.shape[0] < 2:
        raise ValueError("check_batch_independent needs a batch of at least 2 rows")
    y, _ = mixer(x)
    for b in range(x.shape[0]):
        y_b, _ = mixer(x[b:b + 1])
        assert_close(y_b, y[b:b + 1], rtol, f"batch row {b} alone vs in the batch")
    x_changed = x.clone()
    x_changed[0] = torch.randn_like(x[0])
    y_changed, _ = mixer(x_changed)
    assert_close(y_changed[1:], y[1:], rtol, "other rows after changing row 0")
    if torch.allclose(y_changed[0], y[0]):
        raise AssertionError("changing row 0's input did not change its output")


def check_gradients(mixer, x: Tensor, param_names: Sequence[str] | None = None, prefill: int | None = None) -> None:
    """Backpropagate a random projection of the output; gradients must be finite and non-zero for
    the input and for ``param_names`` (default: every parameter that requires grad). Then, with the
    loss on the continuation only, gradients must reach the prefix through the carried state."""
    mixer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, _ = mixer(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all() or not x.grad.abs().sum() > 0:
        raise AssertionError("no finite, non-zero gradient reached the input")
    params = dict(mixer.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad] if param_names is None else list(param_names)
    for name in names:
        if name not in params:
            raise KeyError(f"unknown parameter {name!r}; the mixer has {sorted(params)}")
        grad = params[name].grad
        if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
            raise AssertionError(f"parameter {name!r} got no finite, non-zero gradient")

    split = x.shape[1] // 2 if prefill is None else prefill
    if not 0 < split < x.shape[1]:
        raise ValueError(f"prefill split {split} must leave tokens on both sides of T={x.shape[1]}")
    x2 = x.detach().clone().requires_grad_(True)
    _, state = mixer(x2[:, :split])
    y_rest, _ = mixer(x2[:, split:], state)
    (y_rest * weights[:, split:]).sum().backward()
    if not torch.isfinite(x2.grad).all() or not x2.grad[:, :split].abs().sum() > 0:
        raise AssertionError("no gradient reached the prefix through the carried state")
    mixer.zero_grad(set_to_none=True)


@torch.no_grad()
def check_state_roundtrip(mixer, x: Tensor, rtol: float = RTOL) -> None:
    """A state saved with ``state_dict`` and rebuilt with ``from_state_dict`` (or loaded in place)
    continues exactly like the original; ``select`` reorders rows consistently; ``nbytes`` counts
    the tensors; a state saved by another configuration is refused."""
    total = x.shape[1]
    if x.shape[0] < 2 or total < 2:
        raise ValueError("check_state_roundtrip needs at least 2 rows and 2 tokens")
    split = total // 2
    _, state = mixer(x[:, :split])
    if state.kind == "":
        raise AssertionError(f"{type(state).__name__} declares no state kind")
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    if not all(isinstance(v, Tensor) for v in saved.values()):
        raise AssertionError("state_dict() must map names to tensors")
    expected, _ = mixer(x[:, split:], _clone_state(state))

    rebuilt = type(state).from_state_dict(saved)
    y, _ = mixer(x[:, split:], rebuilt)
    assert_close(y, expected, rtol, "continuing from from_state_dict(state_dict())")

    _, other = mixer(x[:, :1])
    other.load_state_dict(saved)
    y, _ = mixer(x[:, split:], other)
    assert_close(y, expected, rtol, "continuing from load_state_dict(state_dict())")

    order = list(range(x.shape[0]))[::-1]
    y, _ = mixer(x[order, split:], _clone_state(state).select(order))
    assert_close(y, expected[order], rtol, f"continuing from select({order})")

    tensor_bytes = sum(v.numel() * v.element_size() for v in state.state_dict().values() if v.dim() > 0)
    if state.nbytes() <= 0 or state.nbytes() < tensor_bytes:
        raise AssertionError(f"nbytes() = {state.nbytes()} but the state's tensors hold {tensor_bytes} bytes")
    if state.kind == "recurrent":
        _, longer = mixer(x)
        if longer.nbytes() != state.nbytes():
            raise AssertionError(f"a recurrent state grew from {state.nbytes()} to {longer.nbytes()} bytes")

    if any(v.dim() > 1 for v in saved.values()):  # some tensor has a non-batch dim to widen
        wrong = {k: (torch.cat([v, v], dim=-1) if v.dim() > 1 else v) for k, v in saved.items()}
        try:
            other.load_state_dict(wrong)
        except StateError:
            pass
        else:
            raise AssertionError("load_state_dict accepted tensors of the wrong shape")


# ----------------------------------------------------------------------------- the fla-compatible mixers

def check_runs_without_fla(code: str) -> None:
    """``code``, which builds a mixer and runs it on the CPU, runs in a fresh interpreter without
    importing fla or Triton."""
    code += ("import sys\nbad = sorted(n for n in sys.modules if n.split('.')[0] in ('fla', 'triton'))\n"
             "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def check_loads_fla_state_dict(ours: nn.Module, fla_layer: nn.Module) -> None:
    """``ours`` loads the fla layer's ``state_dict`` with ``strict=True``: the same tensor names."""
    ours.load_state_dict(fla_layer.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(fla_layer.state_dict())


# ----------------------------------------------------------------------------- the checks as a test suite

@dataclasses.dataclass(frozen=True)
class ContractCase:
    """One mixer configuration and the runs of each check on it. A run gives the input's batch rows
    B and what the check needs besides; a check with no runs here is run by another case."""

    name: str
    make: Callable[[], nn.Module]  # builds the mixer, with the same weights at every call
    d_model: int
    seed: int = 0  # of the inputs: torch.randn(B, T, d_model) from a generator with this seed
    decode_equals_forward: Sequence[tuple[int, int, Sequence[int]]] = ()  # (B, T, prefill lengths)
    continue_by_chunks: Sequence[tuple[int, Sequence[int]]] = ()  # (B, call lengths), T = their sum
    batch_independent: Sequence[tuple[int, int]] = ()  # (B >= 2, T)
    gradients: Sequence[tuple[int, int, int | None]] = ()  # (B, T, prefill split or None for T // 2)
    state_roundtrip: Sequence[tuple[int, int]] = ()  # (B >= 2, T)

    def inputs(self, b: int, t: int) -> Tensor:
        return torch.randn(b, t, self.d_model, generator=torch.Generator().manual_seed(self.seed))


class MixerContract:
    """The five checks as a pytest class. A test file runs them for its mixer with

        class TestContract(MixerContract):
            cases = [ContractCase("default", make_default, d_model=32, decode_equals_forward=[...]), ...]

    and pytest collects ``test_<check>[<case>]`` for each run of each case (``[<case>-<i>]`` where a
    case has several runs of a check). Every check needs at least one run: a mixer passes all five."""

    cases: ClassVar[Sequence[ContractCase]] = ()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        check = metafunc.function.__name__.removeprefix("test_")
        params = []
        for case in self.cases:
            runs = getattr(case, check)
            params += [pytest.param(case, run, id=case.name if len(runs) == 1 else f"{case.name}-{i}")
                       for i, run in enumerate(runs)]
        if not params:
            raise ValueError(f"{type(self).__name__}: no case runs {check}; every mixer must pass every check")
        metafunc.parametrize("case, run", params)

    def test_decode_equals_forward(self, case: ContractCase, run) -> None:
        b, t, prefill_lens = run
        check_decode_equals_forward(case.make(), case.inputs(b, t), prefill_lens)

    def test_continue_by_chunks(self, case: ContractCase, run) -> None:
        b, splits = run
        check_continue_by_chunks(case.make(), case.inputs(b, sum(splits)), splits)

    def test_batch_independent(self, case: ContractCase, run) -> None:
        check_batch_independent(case.make(), case.inputs(*run))

    def test_gradients(self, case: ContractCase, run) -> None:
        b, t, prefill = run
        check_gradients(case.make().train(), case.inputs(b, t), prefill=prefill)

    def test_state_roundtrip(self, case: ContractCase, run) -> None:
        check_state_roundtrip(case.make(), case.inputs(*run))
