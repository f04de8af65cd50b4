"""Long-context recall: the experiment behind the KVM paper's central claim, at CPU scale.

The claim (``docs/kvm.md``): a KVM layer whose compressed memory *grows* with the context keeps
recalling where memories of a fixed size (a linear RNN, KVM with a fixed budget, a sliding window)
fade. A growing memory can only beat a fixed one when there is more to remember in a longer
context, so in this task the number of facts grows with the length: one key/value pair per
``tokens_per_pair`` tokens, spread through the whole context, and the queries at the end ask about
pairs from anywhere. At 16 times the training length the pairs outnumber a fixed memory's slots
several times over. The experiment trains tiny models of (nearly) equal size on the task at one
length, with several seeds, and measures recall at 1, 2, 4, 8 and 16 times that length, the state
each model holds there, and a needle in a haystack far beyond it.

The task (``RecallTask.sample``), multi-query associative recall with the pairs spread::

    BOS  f k1 v1 f f f f f | f f f k2 v2 f f f | ... | f k1 v1 f f f f f | f f   QUERY  kq1 vq1 ... kqQ vqQ
         `- tokens_per_pair -'                       `-- a repeat -------'             `- n_queries queries -'

The body between BOS and QUERY is cut into segments of ``tokens_per_pair`` tokens; each segment
holds one pair at a random offset, filler around it (the body's last, shorter, segment only
filler). A share ``repeat_share`` of the segments after the first repeat a pair of an earlier
segment, drawn uniformly; the others hold new pairs, whose keys are distinct. Each final query
repeats the key of a different pair, drawn uniformly from all of them, and its answer is that
pair's value. Keys, values and filler come from disjoint ranges of token ids. Loss and accuracy are
taken only on the answers: the target at a query key's position, and in training at a repeated
key's, is the pair's value; every other target is -100 (``F.cross_entropy``'s ``ignore_index``).
The repeats add answers at every distance to the training signal; the evaluation scores the final
queries only.

The needle (``RecallTask.needle``), in the style of RULER's single-needle task: a body of filler
alone with one pair at a chosen relative depth (0: first, 1: last before the query), then QUERY and
that pair's key. The models read token ids of this task, not text, so ``hybrid eval --niah``'s
English prompts mean nothing to them; this is the same test in their vocabulary.

Sequences are a pure function of (seed, stream, index): training batch ``step`` is stream 0, the
recall evaluation at length ``T`` stream ``T``, the needle at length ``T`` stream ``-T``, so no
evaluation reuses a training sequence and the lengths never share one.

``python -m hybrid.evaluation.recall`` runs the experiment (``--help``): trains every (recipe, seed) of
``recipes/recall/``, a few in parallel, evaluates each, and writes the tables (mean and standard
deviation over the seeds), a CSV of every run and a plot into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from blocks.config import require
from hybrid.formats.checkpoint import load_checkpoint
from hybrid.model.device import resolve_device
from hybrid.model.recipe import RECIPES_DIR, load_recipe
from hybrid.model.state_shapes import state_at
from hybrid.training.config import config_from_recipe
from hybrid.training.loop import train
from hybrid.training.metrics import read_metrics

IGNORE = -100
"""Target id that takes no loss (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""

TRAIN_STREAM = 0


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """The task's shape. Token ids: 0 = BOS, 1 = QUERY, then the key, value and filler ranges."""

    tokens_per_pair: int = 8  # one segment, and so one pair, per this many body tokens
    repeat_share: float = 0.25  # share of the segments after the first that repeat an earlier pair
    n_queries: int = 8  # queries at the end, each asking a different pair
    n_keys: int = 256  # key vocabulary; a sequence's pairs have distinct keys, so it bounds them
    n_values: int = 64  # value vocabulary (chance accuracy: 1 / n_values)
    n_filler: int = 64  # filler vocabulary

    BOS = 0
    QUERY = 1

    def __post_init__(self):
        for name in ("tokens_per_pair", "n_queries", "n_keys", "n_values", "n_filler"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.tokens_per_pair >= 2, "tokens_per_pair", f"must be >= 2 (a pair takes two), got {self.tokens_per_pair}")
        require(0 <= self.repeat_share < 1, "repeat_share", f"must be in [0, 1), got {self.repeat_share}")
        require(self.n_queries <= self.n_keys, "n_queries", f"must be <= n_keys ({self.n_keys}), got {self.n_queries}")

    @property
    def first_key(self) -> int:
        return 2

    @property
    def first_value(self) -> int:
        return self.first_key + self.n_keys

    @property
    def first_filler(self) -> int:
        return self.first_value + self.n_values

    @property
    def vocab_size(self) -> int:
        """Token ids used: a model needs at least this many embeddings."""
        return self.first_filler + self.n_filler

    def n_segments(self, length: int) -> int:
        """Whole segments in the body of a sequence of ``length`` tokens (between BOS and QUERY)."""
        return (length - 2 - 2 * self.n_queries) // self.tokens_per_pair

    def n_repeats(self, length: int) -> int:
        """Segments that repeat an earlier pair."""
        return int(self.repeat_share * max(self.n_segments(length) - 1, 0))

    def n_pairs(self, length: int) -> int:
        """Distinct pairs in a sequence of ``length`` tokens: what a memory has to hold."""
        return self.n_segments(length) - self.n_repeats(length)

    @property
    def min_length(self) -> int:
        """The shortest sequence: a distinct pair for every query."""
        length = 2 + 2 * self.n_queries
        while self.n_pairs(length) < self.n_queries:
            length += self.tokens_per_pair
        return length

    @property
    def max_length(self) -> int:
        """The longest sequence whose distinct pairs the keys suffice for."""
        length = self.min_length
        while self.n_pairs(length + self.tokens_per_pair) <= self.n_keys:
            length += self.tokens_per_pair
        return length + self.tokens_per_pair - 1

    def query_positions(self, length: int, n_queries: int | None = None) -> np.ndarray:
        """Positions of the final queries' keys in a sequence of ``length`` tokens."""
        n = self.n_queries if n_queries is None else n_queries
        return np.arange(length - 2 * n, length, 2)

    def sample(self, batch: int, length: int, seed: int, stream: int, index: int, repeats_scored: bool = True
               ) -> tuple[Tensor, Tensor]:
        """``batch`` sequences of ``length`` tokens -> (inputs, targets), both (batch, length) int64.

        ``inputs`` is the whole sequence; ``targets[:, t]`` is ``inputs[:, t + 1]`` where position t
        holds the key of a final query or (``repeats_scored``) of a repeated pair, and ``IGNORE``
        everywhere else. A pure function of (seed, stream, index) and the shapes."""
        require(self.min_length <= length <= self.max_length, "length",
                f"must be in [{self.min_length}, {self.max_length}] (a pair per query, a key per pair), got {length}")
        rng = np.random.default_rng([seed, stream % 2**32, index])
        segments, n_repeats, n_pairs, span = (self.n_segments(length), self.n_repeats(length), self.n_pairs(length),
                                              self.tokens_per_pair)
        keys = np.argsort(rng.random((batch, self.n_keys)), axis=1)[:, :n_pairs] + self.first_key  # (B, P) distinct
        values = rng.integers(0, self.n_values, (batch, n_pairs)) + self.first_value  # (B, P)
        repeated = np.zeros((batch, segments), dtype=bool)  # (B, S): which segments repeat a pair
        np.put_along_axis(repeated, np.argsort(rng.random((batch, segments - 1)), axis=1)[:, :n_repeats] + 1, True, 1)
        new_before = np.cumsum(~repeated, axis=1) - ~repeated  # (B, S): new pairs in the segments before
        pair = np.where(repeated, (rng.random((batch, segments)) * new_before).astype(np.int64), new_before)  # (B, S)
        offsets = rng.integers(0, span - 1, (batch, segments))  # (B, S): where in its segment each pair starts
        asked = np.argsort(rng.random((batch, n_pairs)), axis=1)[:, :self.n_queries]  # (B, Q) distinct pairs

        seq = self._filler(rng, batch, length)
        key_positions = 1 + np.arange(segments) * span + offsets  # (B, S)
        segment_values = np.take_along_axis(values, pair, axis=1)
        np.put_along_axis(seq, key_positions, np.take_along_axis(keys, pair, axis=1), axis=1)
        np.put_along_axis(seq, key_positions + 1, segment_values, axis=1)
        targets = self._ask(seq, np.take_along_axis(keys, asked, axis=1), np.take_along_axis(values, asked, axis=1))
        if repeats_scored:
            np.put_along_axis(targets, key_positions, np.where(repeated, segment_values, IGNORE), axis=1)
        return torch.from_numpy(seq), torch.from_numpy(targets)

    def needle(self, batch: int, length: int, depth: float, seed: int, stream: int, index: int
               ) -> tuple[Tensor, Tensor]:
        """``batch`` needle sequences of ``length`` tokens -> (inputs, targets) as ``sample``'s: filler
        with one pair whose key sits at relative ``depth`` of the body (0: its first position, 1: its
        last pair position), then QUERY and the pair's key; its value is the one target."""
        require(0 <= depth <= 1, "depth", f"must be in [0, 1], got {depth}")
        require(length >= 6, "length", f"must be >= 6 (BOS, the pair, QUERY and the query), got {length}")
        rng = np.random.default_rng([seed, stream % 2**32, index])
        keys = rng.integers(0, self.n_keys, (batch, 1)) + self.first_key  # (B, 1)
        values = rng.integers(0, self.n_values, (batch, 1)) + self.first_value
        seq = self._filler(rng, batch, length)
        position = 1 + round(depth * (length - 6))  # the body is [1, length - 3); its last pair starts at length - 5
        seq[:, position], seq[:, position + 1] = keys[:, 0], values[:, 0]
        targets = self._ask(seq, keys, values)
        return torch.from_numpy(seq), torch.from_numpy(targets)

    def _filler(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """(batch, length) int64: BOS, then filler up to the end (the caller writes pairs and queries)."""
        seq = rng.integers(0, self.n_filler, (batch, length)) + self.first_filler
        seq[:, 0] = self.BOS
        return seq

    def _ask(self, seq: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Write QUERY and the queries (keys, values: (B, Q)) at the end of ``seq`` -> targets (B, T),
        the values at the query keys' positions."""
        positions = self.query_positions(seq.shape[1], keys.shape[1])
        seq[:, positions[0] - 1] = self.QUERY
        seq[:, positions], seq[:, positions + 1] = keys, values
        targets = np.full_like(seq, IGNORE)
        targets[:, positions] = values
        return targets


class RecallBatches:
    """Training batches of the task for ``hybrid.training.loop.train(..., batches=)``: ``batch(step)`` is a pure
    function of (seed, step), so a resumed run continues the same stream."""

    def __init__(self, task: RecallTask, seq_len: int, batch_size: int, seed: int):
        self.task, self.seq_len, self.batch_size, self.seed = task, seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        return self.task.sample(self.batch_size, self.seq_len, self.seed, TRAIN_STREAM, step)


@torch.no_grad()
def answer_accuracy(model, batches) -> float:
    """The share of answers (targets other than ``IGNORE``) the model's greedy prediction gets right,
    over ``batches`` of (inputs, targets)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(model.device), targets.to(model.device)
        scored = targets != IGNORE
        logits = model(inputs).logits
        correct += int((logits.argmax(-1)[scored] == targets[scored]).sum())
        total += int(scored.sum())
    model.train(was_training)
    return correct / total


def evaluate_length(model, task: RecallTask, length: int, n_sequences: int, batch_size: int, seed: int) -> float:
    """Recall accuracy on ``n_sequences`` held-out sequences of ``length`` tokens (evaluation stream
    ``length``); chance is 1 / n_values."""
    sizes = [min(batch_size, n_sequences - start) for start in range(0, n_sequences, batch_size)]
    return answer_accuracy(model, (task.sample(size, length, seed, length, index, repeats_scored=False)
                                   for index, size in enumerate(sizes)))


def evaluate_needle(model, task: RecallTask, length: int, depths: list[float], per_depth: int, seed: int
                    ) -> dict[float, float]:
    """Needle accuracy at ``length`` tokens: depth -> the share of ``per_depth`` needles recalled
    (evaluation stream ``-length``, one batch per depth)."""
    return {depth: answer_accuracy(model, [task.needle(per_depth, length, depth, seed, -length, index)])
            for index, depth in enumerate(depths)}


def state_bytes(model, length: int) -> int:
    """Bytes of the decoding state the model holds for one sequence after ``length`` tokens (exact,
    from the layers' schedules: ``hybrid.model.state_shapes.state_at``)."""
    return state_at(model, length, device="meta").nbytes()


# ----------------------------------------------------------------------------- one run

RECALL_RECIPES = RECIPES_DIR / "recall"
MODELS = ("gptalpha", "bswa", "kvm_fixed", "kvm_sqrt", "kvm_saturate", "gla", "gla_kvm")
"""The experiment's recipes under ``recipes/recall/``, in table order."""

LABELS = {"gptalpha": "full attention", "bswa": "BSWA (window 17-32)", "kvm_fixed": "KVM fixed 32",
          "kvm_sqrt": "KVM 4*sqrt(T)", "kvm_saturate": "KVM saturating 128", "gla": "GLA (short conv)",
          "gla_kvm": "GLA + KVM 4*sqrt(T)"}


@dataclasses.dataclass
class Evaluation:
    """What a run is evaluated on: recall at ``lengths`` (``sequences`` each), needles at ``needle_lengths``
    (``needles_per_depth`` at each of ``depths``), in batches of ``batch_size``."""

    lengths: list[int]
    sequences: int = 128
    needle_lengths: list[int] = dataclasses.field(default_factory=list)
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needles_per_depth: int = 2
    batch_size: int = 16


@dataclasses.dataclass
class RunResult:
    """One (model, seed) run."""

    name: str
    seed: int
    params: int
    steps: int  # optimizer steps trained
    train_s: float  # seconds of this call's training (0 when an earlier run had finished it)
    final_loss: float | None  # mean answer loss over the last logged steps
    recall: dict[int, float]  # length -> recall accuracy
    needle: dict[int, dict[float, float]]  # length -> depth -> needle accuracy
    state_bytes: dict[int, int]  # length -> decoding state per sequence (recall and needle lengths)

    def needle_accuracy(self, length: int) -> float:
        """Needle accuracy at ``length`` over every depth (each depth has as many needles)."""
        return statistics.fmean(self.needle[length].values())


def run_model(name: str, task: RecallTask, evaluation: Evaluation, out_dir: Path, *, seed: int = 0,
              steps: int | None = None, budget_s: float | None = None, overrides: dict | None = None,
              progress: bool = False) -> RunResult:
    """Train ``recipes/recall/<name>.yaml`` with ``seed`` on the task into ``out_dir/<name>/seed_<seed>``
    (continuing a run found there), then evaluate its last checkpoint. ``steps``/``budget_s`` override
    the recipe's ``max_steps`` and set ``time_limit_s`` (the run stops early, with a checkpoint, when
    the budget is spent); ``overrides``: more ``train:`` settings (``device``, ``batch_size``...)."""
    recipe = load_recipe(RECALL_RECIPES / f"{name}.yaml")
    settings = {"out_dir": str(out_dir / name / f"seed_{seed}"), "seed": seed, **(overrides or {})}
    if steps is not None:
        settings.update(max_steps=steps, ckpt_every=steps)
    if budget_s is not None:
        settings["time_limit_s"] = budget_s
    config = config_from_recipe(recipe, settings)
    require(task.vocab_size <= recipe.model.vocab_size, "vocab_size",
            f"{name}: the task uses {task.vocab_size} token ids, the model has {recipe.model.vocab_size}")
    summary = train(recipe, config, progress=progress,
                    batches=RecallBatches(task, config.seq_len, config.batch_size, config.seed))
    _, model, _ = load_checkpoint(summary.checkpoint, device=resolve_device(config.device, "train.device"))
    recall = {n: evaluate_length(model, task, n, evaluation.sequences, evaluation.batch_size, seed + 1)
              for n in evaluation.lengths}
    needle = {n: evaluate_needle(model, task, n, evaluation.depths, evaluation.needles_per_depth, seed + 1)
              for n in evaluation.needle_lengths}
    sizes = {n: state_bytes(model, n) for n in sorted({*evaluation.lengths, *evaluation.needle_lengths})}
    losses = [r["loss"] for r in read_metrics(Path(config.out_dir) / "metrics.jsonl") if "loss" in r]
    return RunResult(name, seed, model.num_parameters(), summary.step,
                     summary.elapsed_s if summary.step > summary.start_step else 0.0,
                     losses[-1] if losses else None, recall, needle, sizes)


# ----------------------------------------------------------------------------- over seeds

@dataclasses.dataclass
class Spread:
    """Mean and sample standard deviation of one figure over seeds (deviation 0 for one seed)."""

    mean: float
    sd: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    def percent(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.sd:.1f}"


@dataclasses.dataclass
class ModelSummary:
    """One model over its seeds: the rows of the tables."""

    name: str
    label: str
    params: int
    seeds: list[int]
    steps: int  # the fewest any seed trained
    final_loss: Spread | None  # None when no seed logged a loss
    recall: dict[int, Spread]
    needle: dict[int, Spread]  # over seeds, of each seed's accuracy over every depth
    state_bytes: dict[int, int]


def summarize(results: list[RunResult]) -> list[ModelSummary]:
    """Group the runs by model (in order of first appearance) and aggregate each over its seeds."""
    by_model: dict[str, list[RunResult]] = {}
    for r in results:
        by_model.setdefault(r.name, []).append(r)
    summaries = []
    for name, runs in by_model.items():
        losses = [r.final_loss for r in runs if r.final_loss is not None]
        first = runs[0]
        summaries.append(ModelSummary(
            name, LABELS.get(name, name), first.params, [r.seed for r in runs], min(r.steps for r in runs),
            Spread.of(losses) if losses else None,
            {n: Spread.of([r.recall[n] for r in runs]) for n in first.recall},
            {n: Spread.of([r.needle_accuracy(n) for r in runs]) for n in first.needle},
            first.state_bytes))
    return summaries


# ----------------------------------------------------------------------------- reports

def recall_table(summaries: list[ModelSummary], train_len: int) -> str:
    """Recall accuracy (%) per evaluation length, mean ± standard deviation over seeds, with each
    model's size, steps and final answer loss."""
    lengths = list(summaries[0].recall)
    heads = [f"{n}{' (train)' if n == train_len else ''}" for n in lengths]
    lines = ["| model | params | seeds | steps | final loss | " + " | ".join(heads) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(lengths)]
    for s in summaries:
        loss = f"{s.final_loss.mean:.3f}" if s.final_loss is not None else "-"
        cells = " | ".join(s.recall[n].percent() for n in lengths)
        lines.append(f"| {s.label} (`{s.name}`) | {s.params:,} | {len(s.seeds)} | {s.steps} | {loss} | {cells} |")
    return "\n".join(lines) + "\n"


def needle_table(summaries: list[ModelSummary]) -> str:
    """Needle accuracy (%) per length, over every depth, mean ± standard deviation over seeds."""
    lengths = list(summaries[0].needle)
    lines = ["| model | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for s in summaries:
        lines.append(f"| {s.label} | " + " | ".join(s.needle[n].percent() for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def state_table(summaries: list[ModelSummary]) -> str:
    """State bytes per sequence at every length evaluated, in KiB."""
    lengths = sorted(summaries[0].state_bytes)
    lines = ["| model | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for s in summaries:
        lines.append(f"| {s.label} | " + " | ".join(f"{s.state_bytes[n] / 1024:,.1f}" for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def report(summaries: list[ModelSummary], task: RecallTask, evaluation: Evaluation, train_len: int) -> str:
    """results.md: the three tables with what they measure."""
    parts = [f"Recall accuracy in % over the answers of {evaluation.sequences} held-out sequences per length "
             f"(mean ± standard deviation over seeds); pairs per sequence at each length: " +
             ", ".join(f"{n}: {task.n_pairs(n)}" for n in evaluation.lengths) +
             f"; chance {100 / task.n_values:.1f}%.\n", recall_table(summaries, train_len)]
    if evaluation.needle_lengths:
        parts += [f"\nNeedle accuracy in % at each length ({evaluation.needles_per_depth} needles at each depth "
                  f"{', '.join(f'{d:g}' for d in evaluation.depths)}; mean ± standard deviation over seeds).\n",
                  needle_table(summaries)]
    parts += ["\nDecoding state per sequence after that many tokens, KiB (fp32).\n", state_table(summaries)]
    return "\n".join(parts)


def write_csv(results: list[RunResult], path: Path) -> None:
    """One row per (model, seed, test, length, depth): ``test`` is recall (depth empty) or needle."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "seed", "params", "steps", "train_s", "final_loss", "test", "length", "depth",
                         "accuracy", "state_bytes"])
        for r in results:
            common = [r.name, r.seed, r.params, r.steps, f"{r.train_s:.1f}",
                      "" if r.final_loss is None else f"{r.final_loss:.4f}"]
            for n, accuracy in r.recall.items():
                writer.writerow(common + ["recall", n, "", f"{accuracy:.4f}", r.state_bytes[n]])
            for n, by_depth in r.needle.items():
                for depth, accuracy in by_depth.items():
                    writer.writerow(common + ["needle", n, depth, f"{accuracy:.4f}", r.state_bytes[n]])


def plot(summaries: list[ModelSummary], task: RecallTask, train_len: int, path: Path) -> None:
    """Recall and needle accuracy against length (log2 axes), mean with a bar of ± one standard
    deviation over seeds; chance marked, and the training length on the recall panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("recall", "recall accuracy (%)", "sequence length (pairs grow with it)")]
    if summaries[0].needle:
        panels.append(("needle", "needle accuracy (%)", "sequence length (one pair in filler)"))
    figure = Figure(figsize=(6.5 * len(panels), 4.8), dpi=100)
    FigureCanvasAgg(figure)
    for i, (field, ylabel, xlabel) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for s in summaries:
            figures = getattr(s, field)
            lengths = list(figures)
            axes.errorbar(lengths, [100 * figures[n].mean for n in lengths], yerr=[100 * figures[n].sd for n in lengths],
                          marker="o", markersize=4, capsize=3, label=s.label)
        axes.axhline(100 / task.n_values, color="gray", linestyle=":", label="chance")
        if field == "recall":
            axes.axvline(train_len, color="gray", linestyle="--", linewidth=0.8, label="training length")
        axes.set_xscale("log", base=2)
        ticks = sorted({n for s in summaries for n in getattr(s, field)})
        axes.set_xticks(ticks, [str(n) for n in ticks])
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_ylim(-2, 102)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------- the experiment

def _run_job(name: str, seed: int, task: RecallTask, evaluation: Evaluation, out: Path, steps: int | None,
             budget_s: float | None, overrides: dict) -> RunResult:
    """One (model, seed) run, in a worker process or in this one."""
    if overrides.get("threads"):
        torch.set_num_threads(overrides["threads"])
    return run_model(name, task, evaluation, out, seed=seed, steps=steps, budget_s=budget_s, overrides=overrides)


def run_all(models: list[str], seeds: list[int], task: RecallTask, evaluation: Evaluation, out: Path, *,
            steps: int | None = None, budget_s: float | None = None, overrides: dict | None = None, jobs: int = 1,
            log=print) -> list[RunResult]:
    """Every (model, seed) run, ``jobs`` at a time in separate processes (one: in this process), each
    with ``overrides`` of its ``train:`` settings; results in (model, seed) order."""
    grid = [(name, seed) for name in models for seed in seeds]
    args = (task, evaluation, out, steps, budget_s, overrides or {})
    results: dict[tuple[str, int], RunResult] = {}

    def done(result: RunResult) -> None:
        results[result.name, result.seed] = result
        log(f"{result.name} seed {result.seed}: {result.steps} steps in {result.train_s:.0f} s, recall " +
            ", ".join(f"{n}: {100 * a:.1f}%" for n, a in result.recall.items()) +
            ("; needle " + ", ".join(f"{n}: {100 * result.needle_accuracy(n):.1f}%" for n in result.needle)
             if result.needle else ""))

    if jobs == 1:
        for name, seed in grid:
            done(_run_job(name, seed, *args))
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_run_job, name, seed, *args) for name, seed in grid]
            for future in concurrent.futures.as_completed(futures):
                done(future.result())
    return [results[key] for key in grid]


def main(argv: list[str] | None = None) -> int:
    default = RecallTask()
    parser = argparse.ArgumentParser(
        prog="python -m hybrid.evaluation.recall",
        description="Train the recipes of recipes/recall/ on long-context recall (pairs spread through the context, "
                    "more of them in longer sequences) with several seeds, evaluate each run at several lengths and "
                    "on needles in a haystack, and write results.md (tables over seeds), runs.csv and recall.png "
                    "into --out. A run whose folder already holds a finished run is only evaluated.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="recipe names under recipes/recall/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every model")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the recipe's max_steps)")
    parser.add_argument("--budget-s", type=float, help="wall-clock seconds of training per run at most")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="recall evaluation lengths (default: 1, 2, 4, 8 and 16 times the training length)")
    parser.add_argument("--needle-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384],
                        help="needle-in-a-haystack lengths (none: skip the test)")
    parser.add_argument("--needles", type=int, default=2, help="needles per depth and length")
    parser.add_argument("--tokens-per-pair", type=int, default=default.tokens_per_pair,
                        help="body tokens per key/value pair: the pairs' density")
    parser.add_argument("--repeat-share", type=float, default=default.repeat_share,
                        help="share of the segments that repeat an earlier pair (scored in training)")
    parser.add_argument("--queries", type=int, default=default.n_queries, help="queries per sequence")
    parser.add_argument("--eval-sequences", type=int, default=128, help="held-out sequences per recall length")
    parser.add_argument("--device", default="auto",
                        help="train.device: auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--out", type=Path, default=Path("runs/recall"))
    parser.add_argument("--progress", action="store_true", help="progress bars while training (with --jobs 1)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    task = RecallTask(tokens_per_pair=args.tokens_per_pair, repeat_share=args.repeat_share, n_queries=args.queries)
    train_len = config_from_recipe(load_recipe(RECALL_RECIPES / f"{args.models[0]}.yaml")).seq_len
    evaluation = Evaluation(args.lengths or [train_len * m for m in (1, 2, 4, 8, 16)], args.eval_sequences,
                            args.needle_lengths, needles_per_depth=args.needles)
    _claim_out_dir(args.out, task)
    torch.set_num_threads(args.threads)
    overrides = {"device": args.device, "threads": args.threads}
    if args.progress and args.jobs == 1:
        results = [run_model(name, task, evaluation, args.out, seed=seed, steps=args.steps, budget_s=args.budget_s,
                             progress=True, overrides=overrides) for name in args.models for seed in args.seeds]
    else:
        results = run_all(args.models, args.seeds, task, evaluation, args.out, steps=args.steps,
                          budget_s=args.budget_s, overrides=overrides, jobs=args.jobs,
                          log=lambda line: print(line, flush=True))
    summaries = summarize(results)
    text = report(summaries, task, evaluation, train_len)
    (args.out / "results.md").write_text(text)
    write_csv(results, args.out / "runs.csv")
    plot(summaries, task, train_len, args.out / "recall.png")
    print(text + f"\nwrote {args.out / 'results.md'}, runs.csv and recall.png in "
                 f"{time.monotonic() - started:.0f} s", flush=True)
    return 0


def _claim_out_dir(out: Path, task: RecallTask) -> None:
    """Record the task in ``out/task.json``; refuse a folder whose runs were trained on another task
    (they would be reused as finished runs)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "task.json"
    identity = {"task": dataclasses.asdict(task)}
    if path.is_file() and json.loads(path.read_text()) != identity:
        raise SystemExit(f"{out} holds runs of another task ({path.read_text().strip()}); choose another --out")
    path.write_text(json.dumps(identity) + "\n")


if __name__ == "__main__":
    sys.exit(main())
