"""Training throughput (forward + backward + AdamW step) of recipes, against a full-attention baseline.

Every tiny recipe ships one mix of mixer kinds; `tiny/gptalpha` (full attention, same width and
depth as the others) is the baseline, measured in the same run. Random tokens, fp32, CPU.

    python benchmarks/bench_train.py                         # every tiny recipe
    python benchmarks/bench_train.py --seq-len 2048 --batch 2 tiny/gla_kvm tiny/gptalpha
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from blocks.registry import get_mixer
from hybrid.model import HybridLM
from hybrid.recipe import RECIPES_DIR, load_recipe

BASELINE = "tiny/gptalpha"


def step_seconds(model: HybridLM, batch: int, seq_len: int, steps: int, generator: torch.Generator) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, lazy init) and is not timed
        tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        start = time.perf_counter()
        logits = model(tokens[:, :-1]).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in (RECIPES_DIR / "tiny").glob("*.yaml"))
    parser.add_argument("recipes", nargs="*", default=default, help=f"recipes to measure (baseline {BASELINE} is added)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [BASELINE] + [r for r in args.recipes if r != BASELINE]

    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, batch {args.batch} x {args.seq_len} tokens, "
          f"median of {args.steps} steps (forward + backward + AdamW)")
    print(f"{'recipe':<28} {'layers':<10} {'params':>8} {'s/step':>8} {'spread':>7} {'tokens/s':>9} {'vs baseline':>11}")
    base_rate = None
    for name in names:
        recipe = load_recipe(name)
        torch.manual_seed(0)
        model = HybridLM(recipe.model).train()
        times = step_seconds(model, args.batch, args.seq_len, args.steps, torch.Generator().manual_seed(0))
        median = statistics.median(times)
        rate = args.batch * args.seq_len / median
        base_rate = base_rate or rate
        layers = "".join(get_mixer(layer.mixer).symbol for layer in recipe.model.layers)
        print(f"{name:<28} {layers:<10} {model.num_parameters() / 1e6:>7.2f}M {median:>8.3f} "
              f"{max(times) - min(times):>7.3f} {rate:>9.0f} {rate / base_rate:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
