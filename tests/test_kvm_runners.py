"""The ways of running a KVM call (blocks/kvm/runner.py): the chunk schedule they all follow against
the budget and window functions, each runner against the autograd reference, and the tiles' window
masks (one per call for every whole chunk) against the window rule and against masks built per chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blocks.kvm.attention
from blocks.kvm import KVMConfig, runs_update, slots_after, window_begin
from blocks.kvm.autograd import AutogradRunner
from blocks.kvm.inference import InferenceRunner
from blocks.kvm.native import NativeHelpersRunner, NativeRunner
from blocks.kvm.reads import TileMasks
from blocks.kvm.schedule import plan_call
from blocks.native import kvm_cpu
from mixer_checks import assert_close
from test_kvm import BUDGETS  # the tiny budgets of the KVM block's own tests
from test_kvm_native import attend_in_splits

C = 8


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("nb", [1, 2, 3])
def test_the_call_schedule_follows_the_budget_and_the_window(budget, nb):
    config = KVMConfig(num_heads=2, chunk_len=C, n_bswa_chunks=nb, **BUDGETS[budget])
    total = 9 * C
    whole = plan_call(0, total, config)
    for n0 in range(total):
        for n1 in range(n0 + 1, total + 1):
            schedule = plan_call(n0, n1, config)
            assert (schedule.slots_before, schedule.slots) == (slots_after(n0, config), slots_after(n1, config))
            assert schedule.runs_update == runs_update(n0, n1, config), (n0, n1)
            assert (schedule.start, schedule.end) == (window_begin(n0, config), window_begin(n1, config))
            queries = list(schedule.plain) + [p for step in schedule.steps for p in step.queries]
            assert queries == list(range(n0, n1)), f"({n0}, {n1}): every query read once, in order"
            assert list(schedule.first_chunk) == list(range(n0, min(n1, C)))
            for step in schedule.steps:
                assert step.window == step.chunk * C + C - nb * C and step.queries.start >= nb * C
            # the updates a call runs are those of one call from 0, at the chunk boundaries it crosses
            expected = [s.update for s in whole.steps if s.update and n0 <= s.chunk * C < n1]
            assert [s.update for s in schedule.steps if s.update] == expected, (n0, n1)


def _runner(name):
    """A replacement for ``runner_for`` that builds the named runner and records that it did."""
    factories = {
        "autograd": lambda codec, scales, view: AutogradRunner(codec, scales),
        "inference": InferenceRunner,
        # as off CPU: every chunk a tile
        "inference_tiles": lambda codec, scales, view: InferenceRunner(codec, scales, view, split_reads=False),
        "native": NativeRunner,
        "native_helpers": NativeHelpersRunner,
    }
    built = []

    def runner_for(codec, scales, tensors, kept_view):
        built.append(factories[name](codec, scales, kept_view))
        return built[-1]
    return runner_for, built


RUNNER_OPTIONS = [dict(), dict(num_kv_heads=2, use_vlens=False, sink_len=2),
                  dict(merge_gate_appends=False, merge_gate_keys=False, rope_partial_dim=0)]
MEAN_READ = dict(num_kv_heads=2, use_vlens=False, state_read="mean", rope_partial_dim=0)  # PyTorch runners only
OFFSET = [dict(MEAN_READ, state_offset=True, sink_len=2), dict(num_kv_heads=2, state_offset=True)]  # PyTorch only


@pytest.mark.parametrize("name, options", [(name, options) for name in ("inference", "inference_tiles")
                                           for options in (*RUNNER_OPTIONS, MEAN_READ, *OFFSET)]
                         + [(name, options) for name in ("native", "native_helpers") for options in RUNNER_OPTIONS])
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_runner_equals_the_autograd_reference(monkeypatch, name, budget, options):
    if name.startswith("native") and not (kvm_cpu.blas_kernels() if name == "native" else kvm_cpu.library()):
        pytest.skip("the C kernels (with torch's BLAS for the fused ones) are not available here")
    config = KVMConfig(num_heads=4, chunk_len=C, **{"rope_partial_dim": 4, **options}, **BUDGETS[budget])
    hkv, t = config.num_kv_heads or 4, 10 * C + 5
    torch.manual_seed(6)
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, hkv, t, 16), torch.randn(2, hkv, t, 16)
    g = 1 + F.elu(torch.randn(2, hkv, t, 1))
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(16)), norm.bias.add_(0.3 * torch.randn(16))
    temps = 1 + 0.2 * torch.randn(4), 1 + 0.2 * torch.randn(4)
    offset = torch.randn(4) if config.state_offset else None

    def run(splits):
        return attend_in_splits(q, k, v, g, config, splits, state_key_norm=norm, window_temp=temps[0],
                                state_temp=temps[1], state_offset=offset)

    for splits in ([t], [2 * C + 3, 1, 1, 4 * C + 1, 2 * C - 1, 1, t - 8 * C - 5]):  # decode steps across boundaries
        reference_for, references = _runner("autograd")
        monkeypatch.setattr(blocks.kvm.attention, "runner_for", reference_for)
        reference, reference_state = run(splits)
        runner_for, runners = _runner(name)
        monkeypatch.setattr(blocks.kvm.attention, "runner_for", runner_for)
        with torch.no_grad():
            got, state = run(splits)
        assert len(references) == len(runners) == len(splits)
        assert_close(got, reference.detach(), 1e-5, f"output, splits {splits}")
        for key, value in state.state_dict().items():
            assert_close(value, reference_state.state_dict()[key].detach(), 1e-5, f"state '{key}', splits {splits}")


@pytest.mark.parametrize("nb", [1, 2, 3])
def test_tile_masks_let_each_query_see_its_window_up_to_itself(nb):
    config = KVMConfig(num_heads=2, chunk_len=C, n_bswa_chunks=nb, budget="fixed")
    total = (nb + 4) * C
    for n0 in range(total):
        for n1 in range(n0 + 1, total + 1):
            masks = TileMasks(config, torch.device("cpu"))
            for step in plan_call(n0, n1, config).steps:
                keys = torch.arange(step.window, step.queries.stop)  # the positions of the tile's window keys
                expected = keys[None, :] <= torch.tensor(list(step.queries))[:, None]
                got = masks.of(step)
                assert got.dtype == torch.bool and torch.equal(got, expected), (n0, n1, step)
                assert not step.whole or got is masks.of(step)  # built once for every whole chunk of the call


@pytest.mark.parametrize("name", ["autograd", "inference_tiles"])
@pytest.mark.parametrize("chunk", [C, 32])  # tiles of at most SMALL_TILE queries, and larger ones (one SDPA call)
def test_tile_masks_built_once_per_call_give_the_outputs_of_masks_built_per_chunk(monkeypatch, name, chunk):
    config = KVMConfig(num_heads=4, num_kv_heads=2, chunk_len=chunk, rope_partial_dim=4, **BUDGETS["power_law"])
    t = 7 * chunk + 5
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
    g = 1 + F.elu(torch.randn(2, 2, t, 1))
    norm = torch.nn.LayerNorm(16)
    runner_for, _ = _runner(name)
    monkeypatch.setattr(blocks.kvm.attention, "runner_for", runner_for)

    def run(splits):
        inputs = [x.clone().requires_grad_(name == "autograd") for x in (q, k, v)]
        with torch.set_grad_enabled(name == "autograd"):
            out, state = attend_in_splits(*inputs, g, config, splits, state_key_norm=norm)
            if name == "autograd":
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.detach(), *(x.grad for x in inputs if x.grad is not None),
                *(value.detach() for value in state.state_dict().values())]

    of = TileMasks.of
    for splits in ([t], [chunk + 3, 1, 2 * chunk + 1, 1, t - 3 * chunk - 6]):
        monkeypatch.setattr(TileMasks, "of", of)
        hoisted = run(splits)
        # every tile's mask built anew, as each chunk once built its own
        monkeypatch.setattr(TileMasks, "of", lambda masks, step: of(TileMasks(masks.config, masks.device), step))
        per_chunk = run(splits)
        assert len(hoisted) == len(per_chunk)
        for a, b in zip(hoisted, per_chunk):
            assert torch.equal(a, b), f"splits {splits}"
