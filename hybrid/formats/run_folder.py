"""A training run's folder: the names of its files, its step folders, and which one is the newest.

What ``hybrid train`` (and each stage of ``hybrid convert``) writes into its output folder::

    out_dir/
      step_000200/           a checkpoint folder: what ``hybrid generate out_dir/step_000200`` loads
        recipe.yaml          (the expanded recipe, its train: section the settings of this run)
        model.safetensors
        trainer.safetensors  optimizer moments and step counts, RNG states: tensors only, no pickle
        trainer.json         step, data position, schedule, loss window, settings, fingerprints,
                             and the names that tie each tensor in trainer.safetensors to its parameter
      latest                 the name of the newest checkpoint folder (``hybrid generate out/$(cat out/latest)``)
      metrics.jsonl          one JSON line per logged step: loss, lr, grad norm, tokens/s, val loss/ppl
      loss.png               the training and validation loss curves
      tensorboard/           the same metrics as TensorBoard event files, with train.tensorboard

A step folder is complete once it holds ``trainer.json`` (``hybrid.training.checkpointing`` renames
it into place whole). Files and folders being written carry hidden temporary names
(``hybrid.formats.atomic``), which ``remove_leftovers`` deletes after a killed run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
LATEST_FILE = "latest"
STEP_FOLDER = re.compile(r"step_(\d{6,})")


def step_folder(out_dir: Path, step: int) -> Path:
    """The checkpoint folder of ``step`` in ``out_dir``."""
    return out_dir / f"step_{step:06d}"


def step_folders(out_dir: Path) -> list[Path]:
    """The complete checkpoint folders in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / TRAINER_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (by step number, which a crash between the folder's
    rename and the ``latest`` update cannot make stale), or None."""
    folders = step_folders(out_dir)
    return folders[-1] if folders else None


def remove_leftovers(out_dir: Path) -> None:
    """Delete what a killed run can leave half-written: hidden staging folders and temporary files
    of the run folder's own names (a complete checkpoint is never among them)."""
    if not out_dir.is_dir():
        return
    names = "|".join(re.escape(name) for name in (LATEST_FILE, METRICS_FILE, PLOT_FILE))
    pattern = re.compile(rf"\.+step_\d{{6,}}\..+|\.({names})\..+")
    for path in out_dir.iterdir():
        if not pattern.fullmatch(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
