"""Long-context recall: a synthetic task and the experiment behind the KVM paper's central claim.

The claim (``../shared/docs/kvm.md`` §1, Table 1): a KVM layer whose compressed memory *grows* with
the context keeps recall far beyond the window where fixed-state models (a linear RNN, KVM with a
fixed budget, a sliding window) fade. The experiment trains tiny models of (nearly) equal size on
one task at one length and measures recall at that length and at 2, 4 and 8 times it.

The task (multi-query associative recall, MQAR, with a long gap)::

    BOS  k1 v1  k2 v2 ... kn vn   f f f ... f   QUERY  kq1 vq1  kq2 vq2 ... kqm vqm
         `--- n_pairs pairs ---'  `- filler -'         `--- n_queries queries ----'

The keys of a sequence are distinct; each query repeats the key of a different pair and its answer
is that pair's value. Keys, values and filler come from disjoint ranges of token ids, so only the
pairs carry information. Loss and accuracy are taken only on the answers: the target at a query
key's position is its value, every other target is -100 (``F.cross_entropy``'s ``ignore_index``).
The filler length is what changes with the sequence length, so a longer sequence puts the pairs
further behind the queries; with a KVM window (and a BSWA window) far shorter than the training
length, the answers must come out of the compressed memory even at the training length.

Sequences are a pure function of (seed, stream, index): training batch ``step`` is stream 0,
evaluation at length ``T`` its own stream per length, so evaluation never reuses a training sequence.

``python -m hybrid.evaluation.recall`` runs the experiment (``--help``): trains the recipes of
``recipes/recall/`` one after the other, evaluates each at every length and writes a markdown table,
a CSV and a plot of accuracy against length.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from blocks.config import require
from hybrid.formats.checkpoint import load_checkpoint
from hybrid.model.device import resolve_device
from hybrid.model.recipe import RECIPES_DIR, load_recipe
from hybrid.training.config import config_from_recipe
from hybrid.training.loop import train
from hybrid.training.metrics import read_metrics

IGNORE = -100
"""Target id that takes no loss (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""

TRAIN_STREAM = 0


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """The task's shape. Token ids: 0 = BOS, 1 = QUERY, then the key, value and filler ranges."""

    n_pairs: int = 8  # key/value pairs written at the start of each sequence
    n_queries: int = 8  # queries at the end, each asking a different pair (<= n_pairs)
    n_keys: int = 64  # key vocabulary
    n_values: int = 64  # value vocabulary (chance accuracy: 1 / n_values)
    n_filler: int = 64  # filler vocabulary

    BOS = 0
    QUERY = 1

    def __post_init__(self):
        for name in ("n_pairs", "n_queries", "n_keys", "n_values", "n_filler"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.n_queries <= self.n_pairs, "n_queries", f"must be <= n_pairs ({self.n_pairs}), got {self.n_queries}")
        require(self.n_pairs <= self.n_keys, "n_pairs", f"must be <= n_keys ({self.n_keys}): keys are distinct")

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

    @property
    def min_length(self) -> int:
        """The shortest sequence: BOS, the pairs, QUERY and the queries, no filler."""
        return 2 + 2 * self.n_pairs + 2 * self.n_queries

    def filler_length(self, length: int) -> int:
        return length - self.min_length

    def query_positions(self, length: int) -> np.ndarray:
        """Positions of the query keys in a sequence of ``length`` tokens: the predictions scored."""
        start = length - 2 * self.n_queries
        return np.arange(start, length, 2)

    def sample(self, batch: int, length: int, seed: int, stream: int, index: int) -> tuple[Tensor, Tensor]:
        """``batch`` sequences of ``length`` tokens -> (inputs, targets), both (batch, length) int64.

        ``inputs`` is the whole sequence; ``targets[:, t]`` is ``inputs[:, t + 1]`` where position t
        holds a query key (the answer is the next token) and ``IGNORE`` everywhere else. A pure
        function of (seed, stream, index) and the shapes."""
        require(length >= self.min_length, "length", f"must be >= {self.min_length} (pairs + queries), got {length}")
        rng = np.random.default_rng([seed, stream, index])
        keys = np.argsort(rng.random((batch, self.n_keys)), axis=1)[:, :self.n_pairs] + self.first_key
        values = rng.integers(0, self.n_values, (batch, self.n_pairs)) + self.first_value
        asked = np.argsort(rng.random((batch, self.n_pairs)), axis=1)[:, :self.n_queries]
        filler = rng.integers(0, self.n_filler, (batch, self.filler_length(length))) + self.first_filler

        seq = np.empty((batch, length), dtype=np.int64)
        seq[:, 0] = self.BOS
        seq[:, 1:1 + 2 * self.n_pairs:2] = keys
        seq[:, 2:2 + 2 * self.n_pairs:2] = values
        gap_start = 1 + 2 * self.n_pairs
        seq[:, gap_start:gap_start + filler.shape[1]] = filler
        positions = self.query_positions(length)
        seq[:, positions[0] - 1] = self.QUERY
        seq[:, positions] = np.take_along_axis(keys, asked, axis=1)
        seq[:, positions + 1] = np.take_along_axis(values, asked, axis=1)

        targets = np.full_like(seq, IGNORE)
        targets[:, positions] = seq[:, positions + 1]
        return torch.from_numpy(seq), torch.from_numpy(targets)


class RecallBatches:
    """Training batches of the task for ``hybrid.training.loop.train(..., batches=)``: ``batch(step)`` is a pure
    function of (seed, step), so a resumed run continues the same stream."""

    def __init__(self, task: RecallTask, seq_len: int, batch_size: int, seed: int):
        self.task, self.seq_len, self.batch_size, self.seed = task, seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        return self.task.sample(self.batch_size, self.seq_len, self.seed, TRAIN_STREAM, step)


@torch.no_grad()
def evaluate_length(model, task: RecallTask, length: int, n_sequences: int, batch_size: int, seed: int
                    ) -> tuple[float, int]:
    """(accuracy, state bytes per sequence) of the model on ``n_sequences`` held-out sequences of
    ``length`` tokens: the share of answers its greedy prediction gets right (chance: 1 / n_values),
    and the size of the decoding state it holds after a whole sequence (``ModelState.nbytes``).
    Evaluation stream ``length`` keeps every length's sequences apart from each other and from
    training (stream 0)."""
    was_training = model.training
    model.eval()
    correct = total = state_bytes = 0
    for index, start in enumerate(range(0, n_sequences, batch_size)):
        inputs, targets = task.sample(min(batch_size, n_sequences - start), length, seed, length, index)
        inputs, targets = inputs.to(model.device), targets.to(model.device)
        scored = targets != IGNORE
        logits, state = model(inputs)
        correct += int((logits.argmax(-1)[scored] == targets[scored]).sum())
        total += int(scored.sum())
        state_bytes = state.nbytes() // inputs.shape[0]
    model.train(was_training)
    return correct / total, state_bytes


# ----------------------------------------------------------------------------- the experiment

RECALL_RECIPES = RECIPES_DIR / "recall"
MODELS = ("gptalpha", "bswa", "kvm_fixed", "kvm_sqrt", "gla", "gla_kvm")
"""The experiment's recipes under ``recipes/recall/``, in table order."""

LABELS = {"gptalpha": "full attention", "bswa": "BSWA (window 17-32)", "kvm_fixed": "KVM fixed 32",
          "kvm_sqrt": "KVM 4*sqrt(T)", "gla": "GLA", "gla_kvm": "GLA + KVM 4*sqrt(T)"}


@dataclasses.dataclass
class ModelResult:
    """One model's row of the table."""

    name: str
    label: str
    params: int
    steps: int  # optimizer steps trained
    train_s: float  # seconds of this call's training (0 when an earlier run had finished it)
    final_loss: float | None  # mean answer loss over the last logged steps
    accuracy: dict[int, float]  # length -> recall accuracy
    state_kib: dict[int, float]  # length -> decoding state per sequence, KiB


def run_model(name: str, task: RecallTask, lengths: list[int], out_dir: Path, *, steps: int | None = None,
              budget_s: float | None = None, eval_sequences: int = 128, seed: int = 0,
              overrides: dict | None = None, progress: bool = False) -> ModelResult:
    """Train ``recipes/recall/<name>.yaml`` on the task into ``out_dir/<name>`` (continuing a run found
    there), then evaluate its last checkpoint at every length. ``steps``/``budget_s`` override the
    recipe's ``max_steps`` and set ``time_limit_s`` (the run stops early, with a checkpoint, when the
    budget is spent); ``overrides``: more ``train:`` settings (``device``, ``batch_size``...)."""
    recipe = load_recipe(RECALL_RECIPES / f"{name}.yaml")
    settings = {"out_dir": str(out_dir / name), "seed": seed, **(overrides or {})}
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
    accuracy, state_kib = {}, {}
    for length in lengths:
        accuracy[length], state_bytes = evaluate_length(model, task, length, eval_sequences, config.batch_size,
                                                        seed + 1)
        state_kib[length] = state_bytes / 1024
    losses = [r["loss"] for r in read_metrics(Path(config.out_dir) / "metrics.jsonl") if "loss" in r]
    return ModelResult(name, LABELS.get(name, name), model.num_parameters(), summary.step,
                       summary.elapsed_s if summary.step > summary.start_step else 0.0,
                       losses[-1] if losses else None, accuracy, state_kib)


def markdown_table(results: list[ModelResult], lengths: list[int], task: RecallTask, train_len: int) -> str:
    """The results as a markdown table: accuracy (%) per evaluation length, with the training length
    marked, the size of each model and its state at the longest length."""
    heads = [f"acc@{n}{' (train)' if n == train_len else ''}" for n in lengths]
    lines = ["| model | params | steps | train s | final loss | " + " | ".join(heads) +
             f" | state KiB @{lengths[-1]} |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(lengths) + "---:|"]
    for r in results:
        loss = f"{r.final_loss:.3f}" if r.final_loss is not None else "-"
        accs = " | ".join(f"{100 * r.accuracy[n]:.1f}" for n in lengths)
        lines.append(f"| {r.label} (`{r.name}`) | {r.params:,} | {r.steps} | {r.train_s:.0f} | {loss} | {accs} | "
                     f"{r.state_kib[lengths[-1]]:.0f} |")
    lines.append(f"\nAccuracy in % over the answers of held-out sequences; chance is {100 / task.n_values:.1f}%.")
    return "\n".join(lines) + "\n"


def write_csv(results: list[ModelResult], lengths: list[int], path: Path) -> None:
    """One row per (model, length): name, label, params, steps, train_s, final_loss, length, accuracy, state_kib."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "label", "params", "steps", "train_s", "final_loss", "length", "accuracy",
                         "state_kib"])
        for r in results:
            for n in lengths:
                writer.writerow([r.name, r.label, r.params, r.steps, f"{r.train_s:.1f}",
                                 "" if r.final_loss is None else f"{r.final_loss:.4f}", n,
                                 f"{r.accuracy[n]:.4f}", f"{r.state_kib[n]:.1f}"])


def plot(results: list[ModelResult], lengths: list[int], task: RecallTask, train_len: int, path: Path) -> None:
    """Accuracy against evaluation length (log2 axis), one line per model, chance and training length marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for r in results:
        axes.plot(lengths, [100 * r.accuracy[n] for n in lengths], "o-", label=r.label)
    axes.axhline(100 / task.n_values, color="gray", linestyle=":", label="chance")
    axes.axvline(train_len, color="gray", linestyle="--", linewidth=0.8, label="training length")
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.set_xlabel("sequence length (tokens between the pairs and the queries grow)")
    axes.set_ylabel("recall accuracy (%)")
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid.evaluation.recall",
        description="Train the recipes of recipes/recall/ one after the other on multi-query associative recall "
                    "at the training length, evaluate each at several lengths, and write results.md (the table), "
                    "results.csv and recall.png into --out. A model whose run folder already holds a finished run "
                    "is only evaluated.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="recipe names under recipes/recall/")
    parser.add_argument("--steps", type=int, help="optimizer steps per model (default: the recipe's max_steps)")
    parser.add_argument("--budget-s", type=float, help="wall-clock seconds of training per model at most")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="evaluation lengths (default: 1, 2, 4 and 8 times the training length)")
    parser.add_argument("--pairs", type=int, default=RecallTask.n_pairs, help="key/value pairs per sequence")
    parser.add_argument("--queries", type=int, help="queries per sequence (default: all pairs, at most 8)")
    parser.add_argument("--eval-sequences", type=int, default=128, help="held-out sequences per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="train.device: cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("runs/recall"))
    parser.add_argument("--progress", action="store_true", help="progress bars while training")
    args = parser.parse_args(argv)

    task = RecallTask(n_pairs=args.pairs, n_queries=args.queries or min(args.pairs, 8))
    train_len = config_from_recipe(load_recipe(RECALL_RECIPES / f"{args.models[0]}.yaml")).seq_len
    lengths = args.lengths or [train_len * m for m in (1, 2, 4, 8)]
    _claim_out_dir(args.out, task, args.seed)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        result = run_model(name, task, lengths, args.out, steps=args.steps, budget_s=args.budget_s,
                           eval_sequences=args.eval_sequences, seed=args.seed, progress=args.progress,
                           overrides={"device": args.device, "threads": args.threads})
        results.append(result)
        print(f"{name}: {result.params:,} params, {result.steps} steps in {result.train_s:.0f} s, accuracy " +
              ", ".join(f"{n}: {100 * a:.1f}%" for n, a in result.accuracy.items()), flush=True)
    table = markdown_table(results, lengths, task, train_len)
    (args.out / "results.md").write_text(table)
    write_csv(results, lengths, args.out / "results.csv")
    plot(results, lengths, task, train_len, args.out / "recall.png")
    print(table + f"\nwrote {args.out / 'results.md'}, results.csv and recall.png")
    return 0


def _claim_out_dir(out: Path, task: RecallTask, seed: int) -> None:
    """Record the task and seed in ``out/task.json``; refuse a folder whose runs were trained on
    another task (they would be reused as finished runs)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "task.json"
    identity = {"task": dataclasses.asdict(task), "seed": seed}
    if path.is_file() and json.loads(path.read_text()) != identity:
        raise SystemExit(f"{out} holds runs of another task or seed ({path.read_text().strip()}); "
                         "choose another --out")
    path.write_text(json.dumps(identity) + "\n")


if __name__ == "__main__":
    sys.exit(main())
