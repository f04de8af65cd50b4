"""Linear-RNN torch ops on this CPU: training throughput against fla's naive references, and
decode time per token against context length.

1. Forward+backward tokens/s at T=2048 (B=1, H=4, K=V=64, fp32) of each chunked torch op in
   ``blocks/ops``, against fla's pure-torch naive references for the same recurrence (these need
   triton to import; without it they are skipped with a message). Speed-up = reference time / ours.
2. Decode: the state after a real prefill of 1k / 8k / 32k tokens, then one-token steps; the time
   per token should not grow with the context (the state has a fixed size). One-token steps are
   too small to split across threads (on a shared 2-core machine a second OpenMP thread turns
   35 us steps into 8 ms waits for a scheduler slice), so they run on ``--decode-threads`` (1).

Every figure is measured in this run (best of ``--repeats`` after a warm-up; a reference runs once
after a 16-token warm-up, as some take many seconds, so its figure is noisier). Ops register in ``OPS`` with ``register``; one section per op family.

    python benchmarks/bench_lrnn_ops.py
    python benchmarks/bench_lrnn_ops.py --ops gla --contexts 1024 8192 --no-reference
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from blocks.ops.delta_rule import gated_delta_rule
from blocks.ops.dplr import dplr_delta_rule
from blocks.ops.gla import chunk_gla_torch

B, H, K, V = 1, 4, 64, 64
TRAIN_T = 2048
DECODE_STEPS = 200

Inputs = dict[str, Tensor]


@dataclasses.dataclass(frozen=True)
class OpBench:
    """One op to benchmark.

    ``make_inputs(T, generator)`` returns the op's tensor arguments (fp32, [B, T, H, D] layout);
    ``run(inputs, initial_state)`` returns ``(o, final_state)`` with the torch op;
    ``references`` maps a name to ``fn(inputs) -> o`` calling fla's naive code, imported inside
    (they need triton).
    """

    name: str
    make_inputs: Callable[[int, torch.Generator], Inputs]
    run: Callable[[Inputs, Tensor | None], tuple[Tensor, Tensor]]
    references: dict[str, Callable[[Inputs], Tensor]]


OPS: dict[str, OpBench] = {}


def register(bench: OpBench) -> None:
    if bench.name in OPS:
        raise ValueError(f"op {bench.name!r} is registered twice")
    OPS[bench.name] = bench


# --- GLA family: per-key gates (GLA) and one gate per head (simple GLA = Mamba2's SSD) -----------

def _gla_inputs(per_key: bool) -> Callable[[int, torch.Generator], Inputs]:
    def make(T: int, gen: torch.Generator) -> Inputs:
        logits = torch.randn(B, T, H, K, generator=gen) if per_key else torch.randn(B, T, H, generator=gen)
        return {"q": torch.randn(B, T, H, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen),
                "v": torch.randn(B, T, H, V, generator=gen), "g": F.logsigmoid(logits) / 16}  # fla GLA's gate range
    return make


def _gla_run(x: Inputs, state: Tensor | None) -> tuple[Tensor, Tensor]:
    return chunk_gla_torch(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5, initial_state=state, output_final_state=True)


def _naive_gla(x: Inputs) -> Tensor:
    from fla.ops.gla.naive import naive_recurrent_gla  # fixed scale K ** -0.5, as in _gla_run

    return naive_recurrent_gla(x["q"], x["k"], x["v"], x["g"])[0]


def _naive_recurrent_simple_gla(x: Inputs) -> Tensor:
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    return naive_recurrent_simple_gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5)[0]


def _naive_chunk_simple_gla(x: Inputs) -> Tensor:
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    return naive_chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5)[0]


register(OpBench("gla", _gla_inputs(per_key=True), _gla_run, {"naive_recurrent_gla": _naive_gla}))
register(OpBench("simple_gla", _gla_inputs(per_key=False), _gla_run,
                 {"naive_recurrent_simple_gla": _naive_recurrent_simple_gla,
                  "naive_chunk_simple_gla": _naive_chunk_simple_gla}))


# --- delta rules: Gated DeltaNet (per-head gate) and RWKV-7 (DPLR, per-key decay) ---------------

def _gated_delta_inputs(T: int, gen: torch.Generator) -> Inputs:
    return {"q": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),  # the layer L2-normalises q, k
            "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
            "v": torch.randn(B, T, H, V, generator=gen),
            "g": F.logsigmoid(torch.randn(B, T, H, generator=gen)) / 16,
            "beta": torch.rand(B, T, H, generator=gen)}


def _gated_delta_run(x: Inputs, state: Tensor | None) -> tuple[Tensor, Tensor]:
    return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=K**-0.5, initial_state=state,
                            output_final_state=True, backend="torch")


def _naive_recurrent_gated_delta(x: Inputs) -> Tensor:
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # takes beta before g

    return naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=K**-0.5)[0]


def _naive_chunk_gated_delta(x: Inputs) -> Tensor:
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

    return naive_chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=K**-0.5)[0]


def _dplr_inputs(T: int, gen: torch.Generator) -> Inputs:
    """RWKV-7's operands: a = -kk, b = kk * iclr (kk unit-norm), per-key log decay in [-exp(-1/2), 0)."""
    kk = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    return {"q": torch.randn(B, T, H, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen) * 0.1,
            "v": torch.randn(B, T, H, V, generator=gen), "a": -kk, "b": kk * torch.rand(B, T, H, K, generator=gen),
            "w": -0.6065306597126334 * torch.rand(B, T, H, K, generator=gen)}


def _dplr_run(x: Inputs, state: Tensor | None) -> tuple[Tensor, Tensor]:
    return dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], x["w"], scale=K**-0.5, initial_state=state,
                           output_final_state=True, backend="torch")


def _naive_dplr(x: Inputs) -> Tensor:
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence  # [B, H, T, D], fixed scale K ** -0.5

    q, k, v, a, b, w = (x[name].transpose(1, 2) for name in ("q", "k", "v", "a", "b", "w"))
    return dplr_recurrence(q, k, v, a, b, w)[0]


register(OpBench("delta_rule", _gated_delta_inputs, _gated_delta_run,
                 {"naive_recurrent_gated_delta": _naive_recurrent_gated_delta,
                  "naive_chunk_gated_delta": _naive_chunk_gated_delta}))
register(OpBench("dplr", _dplr_inputs, _dplr_run, {"dplr_recurrence": _naive_dplr}))


# --- measurement ----------------------------------------------------------------------------------

def fwd_bwd_seconds(fn: Callable[[Inputs], Tensor], inputs: Inputs, repeats: int, warmup: bool = True) -> float:
    """Best wall-clock time of forward + backward of ``sum(o * w)`` over ``repeats`` runs (after a
    warm-up run unless ``warmup`` is False)."""
    leaves = {name: t.clone().requires_grad_(t.is_floating_point()) for name, t in inputs.items()}
    weight = None
    times = []
    for i in range(repeats + warmup):
        start = time.perf_counter()
        o = fn(leaves)
        weight = torch.randn_like(o) if weight is None else weight
        (o * weight).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        for t in leaves.values():
            t.grad = None
    return min(times)


@torch.no_grad()
def decode_seconds_per_token(bench: OpBench, context: int, gen: torch.Generator) -> float:
    """Median time of one-token steps continuing the state left by a ``context``-token prefill."""
    _, state = bench.run(bench.make_inputs(context, gen), None)
    steps = bench.make_inputs(DECODE_STEPS, gen)
    tokens = [{name: t[:, i:i + 1].contiguous() for name, t in steps.items()} for i in range(DECODE_STEPS)]
    times = []
    for token in tokens:
        start = time.perf_counter()
        _, state = bench.run(token, state)
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])  # the first steps warm caches up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=None, help=f"subset of {sorted(OPS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--no-reference", action="store_true", help="skip fla's naive references (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--decode-threads", type=int, default=1, help="torch threads for one-token steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.ops or []) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; registered: {sorted(OPS)}")
    benches = [OPS[name] for name in (args.ops or OPS)]
    have_triton = importlib.util.find_spec("triton") is not None
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B={B} H={H} K={K} V={V}")

    print(f"\n## forward+backward at T={TRAIN_T} (best of {args.repeats}; references run once)")
    print(f"{'op':<12} {'impl':<28} {'seconds':>9} {'tokens/s':>10} {'speed-up':>9}")
    for bench in benches:
        inputs = bench.make_inputs(TRAIN_T, torch.Generator().manual_seed(0))
        ours = fwd_bwd_seconds(lambda x: bench.run(x, None)[0], inputs, args.repeats)
        print(f"{bench.name:<12} {'torch chunked (blocks.ops)':<28} {ours:>9.4f} {TRAIN_T / ours:>10.0f}")
        for ref_name, ref in bench.references.items():
            if args.no_reference or not have_triton:
                why = "--no-reference" if args.no_reference else "triton not installed (fla's naive refs import it)"
                print(f"{'':<12} {ref_name:<28} skipped: {why}")
                continue
            ref(bench.make_inputs(16, torch.Generator().manual_seed(0)))  # imports fla, first-call costs
            seconds = fwd_bwd_seconds(ref, inputs, repeats=1, warmup=False)
            print(f"{'':<12} {ref_name:<28} {seconds:>9.4f} {TRAIN_T / seconds:>10.0f} {seconds / ours:>8.1f}x")

    torch.set_num_threads(args.decode_threads)
    print(f"\n## decode: microseconds per token after a prefill of N tokens (median of {DECODE_STEPS} steps, "
          f"{torch.get_num_threads()} thread(s))")
    print(f"{'op':<12} " + " ".join(f"{f'N={n}':>10}" for n in args.contexts))
    for bench in benches:
        gen = torch.Generator().manual_seed(1)
        per_token = [decode_seconds_per_token(bench, n, gen) for n in args.contexts]
        print(f"{bench.name:<12} " + " ".join(f"{s * 1e6:>10.1f}" for s in per_token))


if __name__ == "__main__":
    main()
