"""Training throughput (forward + backward + AdamW step) of recipes, against full attention of the same size.

Each recipe is measured with its full-attention baseline (``hybrid.evaluation.bench.full_attention_config``:
every mixer replaced by attention with the same heads, same width and depth), measured in the
same run; recipes that share a baseline measure it once. Random tokens, fp32, CPU.

    python benchmarks/bench_train.py                         # every tiny recipe
    python benchmarks/bench_train.py --seq-len 2048 --batch 2 tiny/gla_kvm tiny/gptalpha
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hybrid.evaluation.bench import Timing, describe_layers, subjects_for
from hybrid.model.model import HybridLM
from hybrid.model.recipe import RECIPES_DIR, load_recipe


def step_seconds(model: HybridLM, batch: int, seq_len: int, steps: int, generator: torch.Generator) -> Timing:
    """``steps`` timed training steps, after one untimed warm-up step (allocator, lazy init)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    for i in range(steps + 1):
        tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        start = time.perf_counter()
        logits = model(tokens[:, :-1]).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in (RECIPES_DIR / "tiny").glob("*.yaml"))
    parser.add_argument("recipes", nargs="*", default=default, help="recipes to measure (each with its baseline)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    named = []
    for name in args.recipes:
        torch.manual_seed(0)
        named.append((name, HybridLM(load_recipe(name).model)))

    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, batch {args.batch} x {args.seq_len} tokens, "
          f"median of {args.steps} steps (forward + backward + AdamW)")
    print(f"{'recipe':<36} {'layers':<10} {'params':>8} {'s/step':>8} {'spread':>7} {'tokens/s':>9} {'vs baseline':>11}")
    rates: dict[str, float] = {}
    for subject in subjects_for(named):
        timing = step_seconds(subject.model.train(), args.batch, args.seq_len, args.steps,
                              torch.Generator().manual_seed(0))
        rate = args.batch * args.seq_len / timing.median
        rates[subject.name] = rate
        print(f"{subject.name[:36]:<36} {describe_layers(subject.model.config):<10} "
              f"{subject.model.num_parameters() / 1e6:>7.2f}M {timing.median:>8.3f} {timing.spread:>7.3f} "
              f"{rate:>9.0f} {rate / rates[subject.baseline]:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
