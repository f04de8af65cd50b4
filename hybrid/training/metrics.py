"""Training metrics: ``metrics.jsonl`` (one JSON line per logged step) and its loss plot, ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path

from hybrid.formats.atomic import replace_file, write_text


class MetricsLog:
    """``metrics.jsonl``, one JSON object per line. Opening it for a run that starts at step ``s``
    keeps only the lines of steps ``<= s``: a killed run's lines past its last checkpoint (and a
    half-written last line) go, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_through: int):
        self.path = path
        kept = [line for line in _read_lines(path) if line["step"] <= keep_through]
        path.parent.mkdir(parents=True, exist_ok=True)
        if kept or path.exists():
            write_text(path, "".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (unreadable lines skipped)."""
    return _read_lines(Path(path))


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Draw the training and validation loss against the step into ``png_path`` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = _read_lines(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val), "o-", label="validation", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    replace_file(png_path, figure.savefig, suffix=".png")  # the suffix tells savefig the format
