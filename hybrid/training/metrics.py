"""Training metrics: ``metrics.jsonl`` (one JSON line per logged step), its loss plot, ``loss.png``, and
optionally the same numbers as TensorBoard event files (``torch.utils.tensorboard``, which needs the
``tensorboard`` package: the ``tensorboard`` extra)."""

from __future__ import annotations

import json
from pathlib import Path

from hybrid.formats.atomic import replace_file, write_text
from hybrid.training.config import TrainError


class MetricsLog:
    """``metrics.jsonl``, one JSON object per line. Opening it for a run that starts at step ``s``
    keeps only the lines of steps ``<= s``: a killed run's lines past its last checkpoint (and a
    half-written last line) go, so the file reads as one uninterrupted run.

    ``tensorboard``: a folder that also gets every number of every line as a TensorBoard scalar
    (tag = the key, x = the step); its events past step ``s`` are dropped the same way."""

    def __init__(self, path: Path, keep_through: int, tensorboard: Path | None = None):
        self.path = path
        kept = [line for line in _read_lines(path) if line["step"] <= keep_through]
        path.parent.mkdir(parents=True, exist_ok=True)
        if kept or path.exists():
            write_text(path, "".join(json.dumps(line) + "\n" for line in kept))
        self.writer = None if tensorboard is None else _tensorboard_writer(tensorboard, keep_through)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder: Path, keep_through: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package
        raise TrainError(f"train.tensorboard needs the tensorboard package: pip install 'kvm-hybrid[tensorboard]' "
                         f"({err})") from None
    return SummaryWriter(str(folder), purge_step=keep_through + 1)  # events after the resumed step go


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
