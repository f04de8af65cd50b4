"""Decode speed and state memory against context length, for whole models built from recipes.

For each recipe and each context length T, the model's state is shaped as after T tokens
(``hybrid.state_shapes.state_at``: decode cost depends only on state shapes, and a real 32k prefill
of a full-attention model would dominate the run), then ``--steps`` tokens are decoded one at a
time. The per-token time is the mean over those steps: with the default of one KVM chunk (256
steps) it includes the one chunk-boundary state update a KVM layer makes per chunk, amortised as in
a long generation. The first recipe is the baseline for the speed ratios.

    python benchmarks/bench_decode.py                       # the issue's three 12-layer models
    python benchmarks/bench_decode.py --contexts 1024 4096 --steps 32 recipes/tiny/gla_kvm.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hybrid.model import HybridLM
from hybrid.recipe import load_recipe
from hybrid.state_shapes import state_at

DEFAULT_RECIPES = ["paper/120m/gptalpha", "hybrids/gla_kvm", "paper/120m/kvm_fixed256"]


@torch.no_grad()
def decode_seconds_per_token(model: HybridLM, context: int, steps: int, generator: torch.Generator) -> tuple[float, dict]:
    state = state_at(model, context)
    bytes_at_context = state.bytes_by_kind()
    token = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator)
    model(token, state)  # warm-up step (allocator, lazy init); its state is discarded
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, state, last_only=True)
        times.append(time.perf_counter() - start)
        state = out.state
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return statistics.fmean(times), bytes_at_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=DEFAULT_RECIPES, help="recipe paths or names (first = baseline)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--steps", type=int, default=256, help="decode steps timed per context (default: one KVM chunk)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    print(f"decode, batch 1, fp32, {args.threads} threads, mean over {args.steps} steps after a state shaped as "
          f"after T tokens")
    results: dict[str, dict[int, tuple[float, dict]]] = {}
    for name in args.recipes:
        recipe = load_recipe(name)
        torch.manual_seed(args.seed)
        model = HybridLM(recipe.model).eval()
        print(f"\n{name}: {recipe.model.n_layers} layers, d_model {recipe.model.d_model}, "
              f"{model.num_parameters() / 1e6:.1f}M parameters")
        print(f"{'T':>7} {'ms/token':>9} {'tokens/s':>9} {'vs T0':>6}  state bytes by kind")
        results[name] = {}
        for context in args.contexts:
            seconds, nbytes = decode_seconds_per_token(model, context, args.steps, generator)
            results[name][context] = (seconds, nbytes)
            first = results[name][args.contexts[0]][0]
            kinds = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(nbytes.items()))
            print(f"{context:>7} {seconds * 1e3:>9.2f} {1 / seconds:>9.1f} {seconds / first:>5.2f}x  {kinds}",
                  flush=True)

    base = args.recipes[0]
    print(f"\nat T = {args.contexts[-1]}: tokens/s relative to {base}; state bytes relative to its state")
    base_seconds, base_bytes = results[base][args.contexts[-1]]
    for name in args.recipes:
        seconds, nbytes = results[name][args.contexts[-1]]
        print(f"  {name:<40} {base_seconds / seconds:6.2f}x speed   "
              f"{100 * sum(nbytes.values()) / sum(base_bytes.values()):6.2f}% state")


if __name__ == "__main__":
    main()
