"""benchmarks/gpu_check.py at tiny sizes on the CPU (every check present, every check passed, every
timing positive), its error measure, and what a CUDA run relies on that a CPU can test: KVM on a
device other than the CPU never synchronises with the host and never calls the C kernels, and KVM
and a hybrid model train under bf16 autocast close to fp32."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blocks.kvm.attention
from blocks.kvm.autograd import AutogradRunner
from blocks.kvm.inference import InferenceRunner
from blocks.kvm.runner import runner_for
from blocks.native import kvm_cpu
from blocks.registry import get_mixer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
MIXERS = ("gla", "gated_deltanet", "mamba2", "rwkv7")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every check passed" in done.stdout
    return json.loads(out.read_text())


def test_tiny_run_has_every_parity_check_and_each_passed(tiny_report):
    assert tiny_report["tiny"] and tiny_report["device_type"] == "cpu"
    parity = {r["name"]: r for r in tiny_report["results"] if r["section"] == "parity"}
    expected = {f"{m} train {d}" for m in MIXERS for d in ("fp32", "bf16")}
    expected |= {f"kvm {route} {d}" for route in ("train", "inference") for d in ("fp32", "bf16")}
    assert set(parity) == expected
    for name, check in parity.items():
        assert check["passed"] and check["error"] <= check["tolerance"], name
        assert 0 < check["error"], name  # fp32/bf16 against fp64: a real comparison is never exact
        groups = {"output", "continuation", "state"} | ({"grad.input", "grad.params"} if "inference" not in name else set())
        assert set(check["errors"]) == groups, name
        assert check["reference"] == "torch path, fp64, cpu"
    assert parity["kvm inference fp32"]["device_path"] == "kvm on cpu"
    assert parity["gla train bf16"]["device_path"] == "torch on cpu"  # fla's kernels need CUDA
    syncs = [r for r in tiny_report["results"] if r["section"] == "syncs"]
    assert syncs == [{"section": "syncs", "name": "kvm host syncs", "device_path": "kvm on meta", "passed": True,
                      "problem": None}]


def test_tiny_run_times_every_model_against_its_full_attention(tiny_report):
    sizes = tiny_report["sizes"]
    rows = [r for r in tiny_report["results"] if r["section"] in ("train", "prefill", "decode")]
    models = {r["model"] for r in rows}
    assert set(sizes["speed_recipes"]) <= models
    baselines = {r["baseline"] for r in rows}
    assert baselines == {r["model"] for r in rows if r["model"] == r["baseline"]}  # each baseline measured too
    expected = {("train", n) for n in sizes["train_lengths"]} | {("prefill", sizes["prefill_length"])}
    expected |= {("decode", n) for n in sizes["decode_contexts"]}
    for model in models:
        assert {(r["section"], r["tokens"]) for r in rows if r["model"] == model} == expected, model
    fields = {"train": "tokens_per_s", "prefill": "seconds", "decode": "ms_per_token"}
    for r in rows:
        assert math.isfinite(r[fields[r["section"]]]) and r[fields[r["section"]]] > 0, r
        assert r["vs_full_attention"] > 0 and (r["model"] != r["baseline"] or r["vs_full_attention"] == 1.0), r
    assert tiny_report["seconds"] > tiny_report["parity_seconds"] > 0


def test_errors_are_relative_per_group_and_a_missing_tensor_fails():
    check = load_script()
    reference = {"output": torch.ones(4, dtype=torch.float64), "state.slot_keys": torch.full((2,), 2.0, dtype=torch.float64),
                 "grad.input": torch.ones(3, dtype=torch.float64), "grad.a": torch.full((4,), 3.0, dtype=torch.float64),
                 "grad.b": torch.ones(1, dtype=torch.float64)}
    device = {name: t.clone() for name, t in reference.items()}
    device["output"][0] += 0.5  # |(0.5, 0, 0, 0)| / |(1, 1, 1, 1)| = 0.25
    device["grad.b"][0] = 0.0  # one small gradient of two: counted against both parameters' norm, sqrt(1 / 37)
    errors = check.relative_errors(device, reference)
    assert errors == pytest.approx({"output": 0.25, "state": 0.0, "grad.input": 0.0, "grad.params": (1 / 37) ** 0.5})
    del device["state.slot_keys"]
    assert check.relative_errors(device, reference)["state"] == math.inf


def kvm_layer():
    recipe = load_recipe("tiny/kvm_sqrt")
    layer = recipe.model.layers[0]
    torch.manual_seed(0)
    return get_mixer("kvm").cls(layer.options, d_model=recipe.model.d_model, layer_idx=0, n_layers=2), layer.options


def run_kvm(mixer, x):
    """Forward over x (B, T, D) but its last token, then that token from the state -> both outputs."""
    y, state = mixer(x[:, :-1], None, {})
    step, _ = mixer(x[:, -1:], state, {})
    return torch.cat([y, step], 1)


def test_kvm_off_the_cpu_never_syncs_nor_calls_the_c_kernels(monkeypatch):
    """On the meta device (no data: every host sync raises) KVM runs the route a CUDA device takes:
    ``runner_for`` picks the autograd runner, or without autograd the PyTorch inference runner with
    every chunk an exact tile, and every entry point of the C kernels is made to fail if anything
    asks for it; on the CPU the same call does ask."""
    mixer, options = kvm_layer()
    x = torch.randn(2, options.chunk_len * 9 + 3, mixer.d_model)

    def refuse(*args, **kwargs):
        raise AssertionError("the C kernels were asked for")

    kernels = [name for name in dir(kvm_cpu) if not name.startswith("_")
               and getattr(getattr(kvm_cpu, name), "__module__", None) == kvm_cpu.__name__]
    assert {"library", "blas_kernels", "absorb", "run_chunks", "incoming"} <= set(kernels)
    for name in kernels:
        monkeypatch.setattr(kvm_cpu, name, refuse)
    picked = []

    def recording_runner_for(*args):
        picked.append(runner_for(*args))
        return picked[-1]

    monkeypatch.setattr(blocks.kvm.attention, "runner_for", recording_runner_for)
    with torch.no_grad(), pytest.raises(AssertionError, match="C kernels"):
        run_kvm(mixer, x)
    meta = mixer.to("meta")
    for grad in (False, True):
        picked.clear()
        with torch.set_grad_enabled(grad):
            inputs = x.to("meta").requires_grad_(grad)
            y = run_kvm(meta, inputs)
            assert y.shape == x.shape and y.device.type == "meta"
            if grad:
                y.sum().backward()
                assert inputs.grad.shape == x.shape
        assert len(picked) == 2  # the forward and the one-token step
        if grad:
            assert all(type(runner) is AutogradRunner for runner in picked)
        else:
            assert all(type(runner) is InferenceRunner and not runner.split_reads for runner in picked)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


BF16_OUTPUT_TOLERANCE = 3e-2  # bf16 keeps 8 mantissa bits (2^-9 = 2e-3 per rounding), rounded at every matmul
BF16_GRAD_TOLERANCE = 8e-2  # gradients pass through twice as many bf16 products


def test_kvm_layer_trains_under_bf16_autocast_close_to_fp32():
    mixer, options = kvm_layer()
    x = torch.randn(2, options.chunk_len * 9 + 3, mixer.d_model)
    results = []
    for autocast in (False, True):
        mixer.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = run_kvm(mixer, inputs)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in mixer.parameters() if p.grad is not None])
        results.append((y.detach(), inputs.grad, grads))
    (y32, dx32, dw32), (y16, dx16, dw16) = results
    assert y16.dtype == torch.bfloat16 and dw16.dtype == torch.float32  # autocast ran; the weights stay fp32
    assert all(torch.isfinite(t).all() for t in results[1])
    assert relative_error(y16, y32) < BF16_OUTPUT_TOLERANCE
    assert relative_error(dx16, dx32) < BF16_GRAD_TOLERANCE
    assert relative_error(dw16, dw32) < BF16_GRAD_TOLERANCE


def test_hybrid_model_trains_under_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = HybridLM(load_recipe("tiny/gla_kvm").model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8 * 9 + 4), generator=torch.Generator().manual_seed(1))
    results = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logits.float().detach(), loss.detach(), grads))
    (logits32, loss32, grads32), (logits16, loss16, grads16) = results
    assert torch.isfinite(logits16).all() and torch.isfinite(grads16).all()
    assert relative_error(logits16, logits32) < BF16_OUTPUT_TOLERANCE
    assert abs(float(loss16 - loss32)) < 1e-2 * float(loss32)
    assert relative_error(grads16, grads32) < BF16_GRAD_TOLERANCE
