"""Training throughput of documents packed and kept apart (document isolation) against packed and not
kept apart, and against one document per row (padded to the sequence length, or bucketed by length).

Every way trains on the same documents: random tokens in documents whose lengths are drawn from a
log-normal distribution (``--median-len``, ``--sigma``), clipped to [``--min-len``, seq_len + 1].
Packed rows come from ``hybrid.training.data.PackedBatches`` as ``hybrid train`` makes them (with the
document starts for isolation); unpacked rows hold one document each, padded with targets that take
no loss, either to seq_len in batches of ``--batch`` rows or, bucketed, sorted by length into batches
of at most batch x seq_len tokens (padding included) padded to their longest. Throughput counts the
input tokens that are not padding, per second of forward + backward + AdamW, fp32, CPU, over all the
batches of the documents after one untimed warm-up batch, the best of ``--passes`` passes (the ways
take turns, so that other processes on the cores slow them alike).

    python benchmarks/bench_varlen.py
    python benchmarks/bench_varlen.py --seq-len 1024 --median-len 300 tiny/gla_kvm
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe
from hybrid.training.data import IGNORE, PackedBatches

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]  # inputs, targets (B, T), starts, real tokens


def document_lengths(tokens: int, seq_len: int, args: argparse.Namespace) -> list[int]:
    """Lengths of documents (log-normal, clipped) until they hold at least ``tokens`` tokens."""
    rng = np.random.default_rng(args.seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        draw = round(math.exp(math.log(args.median_len) + args.sigma * rng.standard_normal()))
        lengths.append(min(max(draw, args.min_len), seq_len + 1))
    return lengths


def packed(documents: list[np.ndarray], batch: int, seq_len: int, isolated: bool) -> list[Batch]:
    """The documents as one stream, cut into the batches ``hybrid train`` makes of it."""
    stream = np.concatenate(documents)
    starts = np.cumsum([0] + [len(d) for d in documents[:-1]]) if isolated else None
    data = PackedBatches(stream, seq_len, batch, seed=0, document_starts=starts)
    batches = [data.batch(step) for step in range(data.steps_per_epoch)]
    return [(b[0], b[1], b[2] if isolated else None, b[0].numel()) for b in batches]


def unpacked(documents: list[np.ndarray], rows: list[list[int]], seq_len: int | None) -> list[Batch]:
    """One document a row, in the batches ``rows`` (indices), each padded to ``seq_len`` (None: to its
    longest document)."""
    batches = []
    for group in rows:
        width = seq_len or max(len(documents[i]) for i in group) - 1
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(group):
            doc = torch.from_numpy(documents[i].astype(np.int64))
            inputs[row, :len(doc) - 1], targets[row, :len(doc) - 1] = doc[:-1], doc[1:]
        batches.append((inputs, targets, None, int((targets != IGNORE).sum())))
    return batches


def bucketed_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Documents sorted by length, batched while the padded batch stays within ``budget`` tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    rows: list[list[int]] = [[]]
    for i in order:
        if rows[-1] and (len(rows[-1]) + 1) * (lengths[i] - 1) > budget:
            rows.append([])
        rows[-1].append(i)
    return rows


def pass_seconds(model: HybridLM, optimizer: torch.optim.Optimizer, batches: list[Batch]) -> float:
    """Seconds of training steps over ``batches``, the first one untimed (a warm-up)."""
    seconds = 0.0
    for i, (inputs, targets, starts, _) in enumerate(batches):
        start = time.perf_counter()
        logits = model(inputs, document_starts=starts).logits  # (B, T, vocab)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start if i else 0.0
    return seconds


def measure(name: str, ways: dict[str, list[Batch]], passes: int) -> dict[str, float]:
    """Way -> real input tokens per second of recipe ``name``: the best of ``passes`` passes, the
    ways taking turns, so that other processes on the cores slow them alike."""
    runs = {}
    for way in ways:
        torch.manual_seed(0)
        model = HybridLM(load_recipe(name).model).train()
        runs[way] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), math.inf)
    for _ in range(passes):
        for way, batches in ways.items():
            model, optimizer, best = runs[way]
            runs[way] = (model, optimizer, min(best, pass_seconds(model, optimizer, batches)))
    return {way: sum(b[3] for b in batches[1:]) / runs[way][2] for way, batches in ways.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=["tiny/gla_kvm", "tiny/kvm_sqrt", "tiny/rwkv7_kvm",
                                                       "tiny/mamba2_kvm", "tiny/gdn_kvm_swa", "tiny/gptalpha"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="packed batches' worth of documents")
    parser.add_argument("--median-len", type=float, default=200.0, help="median document length, tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the document lengths")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the batches (the best counts)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = document_lengths((args.steps + 1) * args.batch * (args.seq_len + 1), args.seq_len, args)
    rng = np.random.default_rng(args.seed + 1)
    documents = [rng.integers(0, 256, n) for n in lengths]
    ways = {
        "packed": packed(documents, args.batch, args.seq_len, False),
        "packed, isolated": packed(documents, args.batch, args.seq_len, True),
        "unpacked, bucketed": unpacked(documents, bucketed_rows(lengths, args.batch * args.seq_len), None),
        "unpacked, padded": unpacked(documents, [list(range(i, min(i + args.batch, len(documents))))
                                                 for i in range(0, len(documents), args.batch)], args.seq_len),
    }
    print(f"# torch {torch.__version__}, {args.threads} threads, fp32; {len(lengths)} documents, lengths "
          f"log-normal (median {args.median_len:g}, sigma {args.sigma:g}) clipped to [{args.min_len}, "
          f"{args.seq_len + 1}]: mean {np.mean(lengths):.0f}, max {max(lengths)}; packed rows {args.batch} x "
          f"{args.seq_len}")
    print(f"{'recipe':<20} {'way':<20} {'batches':>7} {'padding':>8} {'tokens/s':>9} {'vs packed':>10}")
    for name in args.recipes:
        rates = measure(name, ways, args.passes)
        for way, batches in ways.items():
            padding = 1 - sum(b[3] for b in batches[1:]) / sum(b[0].numel() for b in batches[1:])
            print(f"{name:<20} {way:<20} {len(batches):>7} {padding:>7.0%} {rates[way]:>9.0f} "
                  f"{rates[way] / rates['packed']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
