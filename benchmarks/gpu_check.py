"""One command that checks the toolkit on one CUDA device in a short lease: kernel parity, training
and prefill speed against full attention, decode cost against context length.

    python benchmarks/gpu_check.py --out gpu_check.json      # on a CUDA device: full sizes, made to fit 8 minutes
    python benchmarks/gpu_check.py --tiny --out check.json   # tiny sizes, any device (the default without CUDA)

**(a) Parity.** Every mixer with a fla kernel path (GLA, Gated DeltaNet, Mamba-2, RWKV-7, with the
options of their hybrid recipes) and KVM (the paper's growing 16*sqrt(T) layer, so that its updates
both append and merge) run on the device: a forward over a prompt, a continuation of its state by
``DECODE_TOKENS`` one-token steps, and a backward from both, in fp32 and under bf16 autocast. Each is
compared with the same layer, same weights and same inputs, run in fp64 on the CPU through the
torch path: outputs, continuation outputs, the final state's tensors, the input's and every
parameter's gradient. The device side runs ``backend: fla`` on CUDA; on a CPU it can only run the
torch path (fla's kernels need CUDA), in the check's dtype, so a CPU run checks the script and the
torch path's precision, not fla's kernels. KVM is checked twice, each time against the fp64 CPU
layer with autograd: with autograd (the training route, ``blocks/kvm/autograd.py``) and without (the
inference route). ``blocks.kvm.runner.runner_for`` picks the inference route's runner: on CUDA the
PyTorch ``InferenceRunner`` (``blocks/kvm/inference.py``: slots updated in place, every chunk an
exact tile), on a CPU the fused C kernels (``blocks/kvm/native.py``), or the PyTorch runner with its
split read where they are not built.

The error of a tensor is ``|device - reference| / |reference|`` (Frobenius norms: a relative RMS
error); a check's error is its worst tensor's. Tolerances: ``TOLERANCE`` (fp32 5e-3: fla's kernels
may multiply in TF32, 10 mantissa bits; bf16 5e-2: 8 mantissa bits, rounded at every autocast
matmul, and KVM's discrete routing may send a near-tie to another slot).

**(b) Training and prefill speed.** Tokens per second of a training step (forward, backward, AdamW;
batch 1, bf16 autocast) of the 120M all-KVM recipe (``paper/120m/kvm_fixed256``) and the GLA + KVM
hybrid (``hybrids/gla_kvm``) against the full-attention model of the same size
(``hybrid.evaluation.bench.full_attention_config``: causal SDPA, flash on CUDA) at 4k and 16k
tokens; and the seconds of a prefill (one forward without autograd, bf16 weights) at 32k.

**(c) Decode.** Milliseconds per token of the three models in bf16 at 1k-32k tokens of context, from a
state shaped as after that many tokens (``hybrid.evaluation.bench.decode_seconds``), over
``decode_steps`` steps (one KVM chunk: its state update included, amortised as in a long generation).

``--tiny`` runs everything at tiny sizes (``recipes/tiny/``, short lengths), which a CPU does in
about a minute. The output is one table on stdout and the same figures in the ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from blocks.registry import get_mixer
from hybrid.evaluation.bench import Subject, decode_seconds, prefill_seconds, subjects_for
from hybrid.generation.generate import synchronize
from hybrid.model.device import resolve_device
from hybrid.model.model import HybridLM
from hybrid.model.recipe import LayerConfig, ModelConfig, load_recipe
from hybrid.training.loop import accumulate_gradients

TOLERANCE = {"fp32": 5e-3, "bf16": 5e-2}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast
DECODE_TOKENS = 2


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the recipes and the lengths."""

    mixer_recipes: tuple[str, ...]  # recipes whose fla-path mixers are checked
    kvm_recipe: str  # the KVM layer checked against the CPU
    parity_batch: int
    parity_tokens: int  # the prompt of a parity check (then DECODE_TOKENS more, one at a time)
    speed_recipes: tuple[str, ...]  # measured against the full-attention model of their size
    train_lengths: tuple[int, ...]
    train_steps: int  # timed steps after one warm-up step
    prefill_length: int
    decode_contexts: tuple[int, ...]
    decode_steps: int


FULL = Sizes(("hybrids/gla_kvm", "hybrids/gdn_kvm_swa", "hybrids/mamba2_kvm", "hybrids/rwkv7_kvm"),
             "paper/120m/kvm_sqrt16", 2, 4 * 256 + 77, ("paper/120m/kvm_fixed256", "hybrids/gla_kvm"),
             (4096, 16384), 2, 32768, (1024, 2048, 4096, 8192, 16384, 32768), 256)
TINY = Sizes(("tiny/gla_kvm", "tiny/gdn_kvm_swa", "tiny/mamba2_kvm", "tiny/rwkv7_kvm"),
             "tiny/kvm_sqrt", 2, 4 * 8 + 5, ("tiny/kvm_fixed", "tiny/gla_kvm"),
             (32, 64), 1, 256, (32, 64, 128), 8)


# ----------------------------------------------------------------------------- (a) parity

def parity_layers(sizes: Sizes) -> list[tuple[str, ModelConfig, LayerConfig, int]]:
    """(check name, model config, layer, layer index) of every mixer to check: the first layer of each
    mixer with a ``backend`` option in ``sizes.mixer_recipes``, then the KVM recipe's first layer."""
    found, seen = [], set()
    for name in sizes.mixer_recipes:
        model = load_recipe(name).model
        for index, layer in enumerate(model.layers):
            if hasattr(layer.options, "backend") and layer.mixer not in seen:
                seen.add(layer.mixer)
                found.append((layer.mixer, model, layer, index))
    model = load_recipe(sizes.kvm_recipe).model
    index = next(i for i, layer in enumerate(model.layers) if layer.mixer == "kvm")
    return found + [("kvm", model, model.layers[index], index)]


def build_layer(model: ModelConfig, layer: LayerConfig, index: int, backend: str | None):
    """The layer's mixer alone (``backend`` set where the mixer has one), with seed-0 weights."""
    options = layer.options if backend is None else dataclasses.replace(layer.options, backend=backend)
    torch.manual_seed(0)
    return get_mixer(layer.mixer).cls(options, d_model=model.d_model, layer_idx=index, n_layers=model.n_layers)


def run_layer(mixer, x: Tensor, weights: tuple[Tensor, Tensor], autocast: torch.dtype | None,
              grad: bool) -> dict[str, Tensor]:
    """Forward over ``x`` (B, T, D), continuation by ``DECODE_TOKENS`` one-token steps, and (``grad``)
    backward of ``sum(y * w)`` over both -> every compared tensor, fp64 on the CPU, by name."""
    device = next(mixer.parameters()).device
    x = x.detach().to(device, copy=True).requires_grad_(grad)
    prompt = x.shape[1] - DECODE_TOKENS
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.set_grad_enabled(grad), cast:
        y, state = mixer(x[:, :prompt], None, {})  # (B, T - DECODE_TOKENS, D)
        steps = []
        for t in range(prompt, x.shape[1]):
            step, state = mixer(x[:, t:t + 1], state, {})  # (B, 1, D)
            steps.append(step)
        continued = torch.cat(steps, 1)
    out = {"output": y, "continuation": continued}
    out.update({f"state.{k}": v for k, v in state.state_dict().items() if v.is_floating_point()})
    if grad:
        w_y, w_c = (w.to(device) for w in weights)
        ((y.float() * w_y).sum() + (continued.float() * w_c).sum()).backward()
        out["grad.input"] = x.grad
        out.update({f"grad.{name}": p.grad for name, p in mixer.named_parameters() if p.grad is not None})
    return {name: t.detach().to("cpu", torch.float64) for name, t in out.items()}


def group_of(name: str) -> str:
    """The group a compared tensor's error counts in: the parameters' gradients are one vector, and so
    are the state's tensors (a parameter whose gradient is a sum over everything, such as a
    temperature, would otherwise weigh as much as a whole projection)."""
    if name.startswith("state."):
        return "state"
    if name.startswith("grad.") and name != "grad.input":
        return "grad.params"
    return name


def relative_errors(device: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """``|device - reference| / |reference|`` of every group of tensors (``group_of``), inf where the
    device run lacks a tensor of the reference or has another shape."""
    difference: dict[str, float] = {}
    norm: dict[str, float] = {}
    for name, ref in reference.items():
        group = group_of(name)
        got = device.get(name)
        if got is None or got.shape != ref.shape:
            difference[group] = float("inf")
            got = ref
        difference[group] = difference.get(group, 0.0) + float((got - ref).square().sum())
        norm[group] = norm.get(group, 0.0) + float(ref.square().sum())
    return {group: (difference[group] / max(norm[group], 1e-300)) ** 0.5 for group in difference}


def parity_checks(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Every (mixer, dtype) parity check of section (a), and KVM's inference route (see the module docstring)."""
    checks = []
    for name, model, layer, index in parity_layers(sizes):
        has_backend = hasattr(layer.options, "backend")
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(sizes.parity_batch, sizes.parity_tokens + DECODE_TOKENS, model.d_model, generator=generator)
        weights = (torch.randn(sizes.parity_batch, sizes.parity_tokens, model.d_model, generator=generator),
                   torch.randn(sizes.parity_batch, DECODE_TOKENS, model.d_model, generator=generator))
        reference_layer = build_layer(model, layer, index, "torch" if has_backend else None).double()
        reference = run_layer(reference_layer, x.double(), tuple(w.double() for w in weights), None, grad=True)
        backend = ("fla" if device.type == "cuda" else "torch") if has_backend else None
        routes = [("train", True)] + ([("inference", False)] if name == "kvm" else [])
        for dtype, autocast in DTYPES.items():
            for route, grad in routes:
                started = time.perf_counter()
                candidate = build_layer(model, layer, index, backend).to(device)
                errors = relative_errors(run_layer(candidate, x, weights, autocast, grad),
                                         reference if grad else _without_gradients(reference))
                worst = max(errors, key=errors.get)
                check = {"section": "parity", "name": f"{name} {route} {dtype}", "mixer": name, "route": route,
                         "dtype": dtype, "device_path": f"{backend or 'kvm'} on {device.type}",
                         "reference": "torch path, fp64, cpu", "error": errors[worst], "worst": worst, "errors": errors,
                         "tolerance": TOLERANCE[dtype], "passed": errors[worst] <= TOLERANCE[dtype],
                         "seconds": time.perf_counter() - started}
                checks.append(check)
                log(f"parity {check['name']}: error {check['error']:.2e} ({worst}), "
                    f"{'ok' if check['passed'] else 'FAILED'}")
    return checks


def kvm_sync_check(sizes: Sizes, device: torch.device) -> dict:
    """KVM's layer with host synchronisation forbidden: a forward, a continuation by ``DECODE_TOKENS``
    one-token steps and a backward with autograd, the same without autograd. On CUDA under
    ``torch.cuda.set_sync_debug_mode("error")``; elsewhere on the meta device, which holds no data, so
    that every host sync (``item``, ``bool``, ``int``, ``tolist``, ``nonzero``) raises, and which
    ``blocks.kvm.runner.runner_for`` treats as it treats CUDA (the C kernels only take fp32 CPU
    tensors, the split read only CPU ones): the route a CUDA device takes, without one."""
    _, model, layer, index = parity_layers(sizes)[-1]
    target = device if device.type == "cuda" else torch.device("meta")
    mixer = build_layer(model, layer, index, None).to(target)
    x = torch.randn(sizes.parity_batch, sizes.parity_tokens + DECODE_TOKENS, model.d_model, device=target)
    forbid = torch.cuda.set_sync_debug_mode if target.type == "cuda" else lambda mode: None
    problem = None
    forbid("error")
    try:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                inputs = x.detach().requires_grad_(grad)
                y, state = mixer(inputs[:, :-DECODE_TOKENS], None, {})  # (B, T, D)
                for t in range(x.shape[1] - DECODE_TOKENS, x.shape[1]):
                    step, state = mixer(inputs[:, t:t + 1], state, {})
                    y = y + step.mean()
                if grad:
                    y.sum().backward()
    except (RuntimeError, NotImplementedError, ValueError) as err:
        problem = f"{type(err).__name__}: {err}"
    finally:
        forbid("default")
    return {"section": "syncs", "name": "kvm host syncs", "device_path": f"kvm on {target.type}",
            "passed": problem is None, "problem": problem}


def _without_gradients(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t for name, t in tensors.items() if not name.startswith("grad.")}


# ----------------------------------------------------------------------------- (b) and (c) speed

def speed_subjects(sizes: Sizes, device: torch.device) -> list[Subject]:
    """The models of ``sizes.speed_recipes`` on ``device``, each after the full-attention model of its
    size (``hybrid.evaluation.bench.subjects_for``: a baseline shared by several recipes comes once)."""
    named = []
    for name in sizes.speed_recipes:
        torch.manual_seed(0)
        named.append((name, HybridLM(load_recipe(name).model).to(device)))
    return subjects_for(named)


def train_tokens_per_s(model: HybridLM, length: int, steps: int, device: torch.device) -> float:
    """Training tokens per second of batch-1 steps of ``length`` random tokens under bf16 autocast (the
    fastest of ``steps`` timed steps, after one warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    fastest = float("inf")
    for step in range(steps + 1):
        tokens = torch.randint(0, model.config.vocab_size, (1, length + 1), generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        accumulate_gradients(model, tokens[:, :-1], tokens[:, 1:], 1, torch.bfloat16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step:
            fastest = min(fastest, time.perf_counter() - started)
    return length / fastest


def speed_checks(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Section (b), training then prefill, and section (c), decode, each model against its baseline."""
    rows = []
    subjects = speed_subjects(sizes, device)

    def add(section: str, subject: Subject, tokens: int, field: str, value: float, faster: dict[str, float]) -> None:
        """One row; ``faster``: each subject's speed (larger is faster), its baseline's already in."""
        ratio = faster[subject.name] / faster[subject.baseline]
        rows.append({"section": section, "name": f"{subject.name} {section} {tokens}", "model": subject.name,
                     "baseline": subject.baseline, "tokens": tokens, field: value, "vs_full_attention": ratio})
        log(f"{section} {subject.name} {tokens}: {value:,.4g} {field} ({ratio:.2f}x its full attention)")

    for length in sizes.train_lengths:
        rates: dict[str, float] = {}
        for subject in subjects:
            rates[subject.name] = train_tokens_per_s(subject.model, length, sizes.train_steps, device)
            add("train", subject, length, "tokens_per_s", rates[subject.name], rates)
    for subject in subjects:
        subject.model.to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    speeds: dict[str, float] = {}
    for subject in subjects:
        prefill_seconds(subject.model, min(256, sizes.prefill_length), None, generator)  # warm-up
        seconds = prefill_seconds(subject.model, sizes.prefill_length, None, generator)
        speeds[subject.name] = 1 / seconds
        add("prefill", subject, sizes.prefill_length, "seconds", seconds, speeds)
    for context in sizes.decode_contexts:
        speeds = {}
        for subject in subjects:
            torch.manual_seed(0)  # state_at's random contents
            ms = 1e3 * decode_seconds(subject.model, context, sizes.decode_steps, generator)
            speeds[subject.name] = 1 / ms
            add("decode", subject, context, "ms_per_token", ms, speeds)
    return rows


# ----------------------------------------------------------------------------- the report

def table(results: list[dict]) -> str:
    """Every check and measure, one line each, the check column as wide as its longest name."""
    width = max([len("check"), *(len(r["name"]) for r in results)])
    lines = [f"{'section':<8} {'check':<{width}} {'result':>16} {'vs full attention / tolerance':>30}"]
    for r in results:
        if r["section"] == "parity":
            result, other = f"{r['error']:.2e}", f"<= {r['tolerance']:.0e} {'ok' if r['passed'] else 'FAILED'}"
        elif r["section"] == "syncs":
            result, other = "none" if r["passed"] else "some", f"{r['device_path']} {'ok' if r['passed'] else 'FAILED'}"
        elif r["section"] == "train":
            result, other = f"{r['tokens_per_s']:,.0f} tok/s", f"{r['vs_full_attention']:.2f}x"
        elif r["section"] == "prefill":
            result, other = f"{r['seconds']:.3f} s", f"{r['vs_full_attention']:.2f}x"
        else:
            result, other = f"{r['ms_per_token']:.3f} ms/tok", f"{r['vs_full_attention']:.2f}x"
        lines.append(f"{r['section']:<8} {r['name']:<{width}} {result:>16} {other:>30}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default without a CUDA device)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    tiny = args.tiny or device.type != "cuda"
    sizes = TINY if tiny else FULL
    started = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = parity_checks(sizes, device, log)
    results.append(kvm_sync_check(sizes, device))
    log(f"kvm host syncs on {results[-1]['device_path']}: {results[-1]['problem'] or 'none'}")
    parity_s = time.perf_counter() - started
    results += speed_checks(sizes, device, log)
    elapsed = time.perf_counter() - started
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "device_type": device.type, "torch": torch.__version__, "tiny": tiny, "sizes": dataclasses.asdict(sizes),
              "parity_seconds": parity_s, "seconds": elapsed, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"# {report['device']} ({device.type}), torch {torch.__version__}, {'tiny' if tiny else 'full'} sizes, "
          f"{elapsed:.0f} s")
    print(table(results))
    failed = [r["name"] for r in results if "passed" in r and not r["passed"]]
    print(f"wrote {args.out}; " + (f"{len(failed)} checks FAILED: {', '.join(failed)}" if failed
                                    else "every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
