"""``hybrid eval``'s default measure: perplexity and loss by position on text.

**Perplexity and loss by position** (``score_documents``). Every document is tokenized and cut into
windows of ``max_len + 1`` tokens that overlap by one token, so every token after a document's first
is predicted exactly once; each window starts from an empty state and runs through the model
``chunk`` tokens per forward (the state carries between chunks, so memory is bounded and the
result is that of one long forward). The loss of predicting the token at window position p + 1 is
binned by p into ``bucket``-token buckets: the paper's per-position plot (1024-position buckets up
to 32k); for a tiny CPU model pick small buckets and windows. Perplexity = exp(total NLL / number
of predictions), so the buckets' losses weighted by their prediction counts average to the
overall loss.

The default text is the built-in corpus's held-out tail (``heldout_text``): the last 0.5 % of its
bytes, in the order training reads the corpus (sorted play files), which is the end of *Timon of
Athens*, about 26.6 KB, cut to start at a line. ``hybrid train`` on the built-in corpus with its
default ``val_fraction`` (0.01) holds out the last 1 % of the token stream for validation, about
twice as much, so a model trained that way has never seen this text.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid.formats.tokenizer import Tokenizer
from hybrid.model.model import HybridLM
from hybrid.training.data import DataError, builtin_corpus, find_documents

HELDOUT_FRACTION = 0.005


# ----------------------------------------------------------------------------- text

def heldout_text() -> str:
    """The built-in corpus's held-out tail (see the module docstring)."""
    data = [doc.text.encode("utf-8") for doc in find_documents([builtin_corpus()])]
    want = int(sum(map(len, data)) * HELDOUT_FRACTION)
    tail = data[-1][-want:]
    tail = tail[tail.index(b"\n") + 1:]  # start at a line (and never inside a UTF-8 sequence)
    return tail.decode("utf-8")


def load_texts(paths: Sequence[str] | None) -> list[str]:
    """The documents of text/JSONL files and folders (as ``hybrid train`` reads them); None: the
    held-out tail of the built-in corpus."""
    if not paths:
        return [heldout_text()]
    return [doc.text for doc in find_documents(paths)]


# ----------------------------------------------------------------------------- perplexity

@torch.no_grad()
def token_losses(model: HybridLM, ids: Sequence[int], chunk: int = 1024) -> torch.Tensor:
    """NLL (nats, fp32) of each token ``ids[1:]`` given the ones before it, one sequence from an empty
    state, ``chunk`` tokens per forward. Returns a tensor of ``len(ids) - 1`` losses."""
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=model.device)[None]
    state, losses = None, []
    for start in range(0, tokens.shape[1] - 1, chunk):
        inputs = tokens[:, start:min(start + chunk, tokens.shape[1] - 1)]
        out = model(inputs, state)
        state = out.state
        targets = tokens[0, start + 1:start + 1 + inputs.shape[1]]
        losses.append(F.cross_entropy(out.logits[0].float(), targets, reduction="none"))
    return torch.cat(losses).cpu() if losses else torch.zeros(0)


@dataclasses.dataclass
class ScoreResult:
    """Summed losses of every prediction, and per position bucket (bucket b: window positions
    ``[b * bucket, (b + 1) * bucket)``)."""

    bucket: int
    total_nll: float = 0.0
    count: int = 0
    bucket_nll: list[float] = dataclasses.field(default_factory=list)
    bucket_count: list[int] = dataclasses.field(default_factory=list)
    windows: int = 0

    @property
    def loss(self) -> float:
        return self.total_nll / self.count if self.count else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def add(self, losses: torch.Tensor) -> None:
        """Add one window's losses (position p at index p)."""
        n_buckets = math.ceil(len(losses) / self.bucket)
        while len(self.bucket_nll) < n_buckets:
            self.bucket_nll.append(0.0)
            self.bucket_count.append(0)
        for b in range(n_buckets):
            part = losses[b * self.bucket:(b + 1) * self.bucket].double()
            self.bucket_nll[b] += float(part.sum())
            self.bucket_count[b] += len(part)
        self.total_nll += float(losses.double().sum())
        self.count += len(losses)
        self.windows += 1

    def by_position(self) -> list[tuple[int, int, int, float]]:
        """(first position, last position + 1, predictions, mean loss) of every non-empty bucket."""
        return [(b * self.bucket, (b + 1) * self.bucket, n, nll / n)
                for b, (nll, n) in enumerate(zip(self.bucket_nll, self.bucket_count)) if n]


def score_documents(model: HybridLM, tokenizer: Tokenizer, texts: Sequence[str], max_len: int = 32768,
                    chunk: int = 1024, bucket: int = 1024,
                    progress: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Perplexity and loss by position of ``texts`` (see the module docstring)."""
    if min(max_len, chunk, bucket) < 1:
        raise ValueError(f"max_len, chunk and bucket must be >= 1, got {max_len}, {chunk}, {bucket}")
    result = ScoreResult(bucket)
    windows = []
    for text in texts:
        ids = tokenizer.encode(text)
        windows += [ids[s:s + max_len + 1] for s in range(0, max(len(ids) - 1, 0), max_len)]
    for i, window in enumerate(windows):
        result.add(token_losses(model, window, chunk))
        if progress is not None:
            progress(i + 1, len(windows))
    if result.count == 0:
        raise DataError("the texts hold no token to predict: each document needs at least two tokens; give longer texts")
    return result


def write_loss_by_position(result: ScoreResult, out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``loss_by_position.csv`` and ``loss_by_position.png`` (mean loss per bucket against position)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result.by_position()
    csv_path = out_dir / "loss_by_position.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position_start", "position_end", "predictions", "loss", "perplexity"])
        for start, end, n, loss in rows:
            writer.writerow([start, end, n, f"{loss:.6f}", f"{math.exp(loss):.6g}"])
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([(start + end) / 2 for start, end, _, _ in rows], [loss for *_, loss in rows], marker="o", markersize=3)
    ax.set_xlabel(f"position in the window (buckets of {result.bucket} tokens)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = out_dir / "loss_by_position.png"
    fig.savefig(png_path, dpi=120)
    return csv_path, png_path
