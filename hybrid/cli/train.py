"""``hybrid train``: train the model a recipe describes with the settings of its ``train:`` section,
resuming from the newest checkpoint of its output folder."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hybrid.cli.options import output_folder, parse_set
from hybrid.model.recipe import load_recipe

DIVERGED_EXIT = 3  # `hybrid train` stopped by a NaN/inf loss


def add_train(commands) -> None:
    trn = commands.add_parser("train", help="train a recipe's model (resumes from the last checkpoint)",
                              description="Train the model a recipe describes with the settings of its train: "
                                          "section (see hybrid/training/config.py for every key). Writes "
                                          "checkpoint folders (OUT/step_NNNNNN, loadable by generate), OUT/latest, "
                                          "OUT/metrics.jsonl and OUT/loss.png (and OUT/tensorboard); run it again "
                                          "to continue from the newest checkpoint. "
                                          f"Exit code {DIVERGED_EXIT} when the loss becomes NaN/inf "
                                          "(the last good checkpoint is kept). Started by torchrun "
                                          "(torchrun --nproc_per_node=N -m hybrid train ...), it trains "
                                          "data-parallel (train.parallel: ddp or fsdp; batch_size is the global "
                                          "batch).")
    trn.add_argument("recipe", help="recipe file, or a name under recipes/")
    trn.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                     help="override a train: setting, the value read as YAML (repeatable), e.g. "
                          "--set train.lr=3e-4 --set train.data=[corpus.txt]")
    trn.add_argument("--out", type=output_folder,
                     help="output folder (default: train.out_dir, else runs/<recipe name>)")
    trn.add_argument("--no-resume", action="store_true",
                     help="start from step 0; refuses an output folder that already holds checkpoints")
    trn.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    trn.add_argument("--tensorboard", action="store_true",
                     help="also write the metrics as TensorBoard events to OUT/tensorboard (train.tensorboard; needs "
                          "the tensorboard package)")
    trn.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from hybrid.training import distributed
    from hybrid.training.config import config_from_recipe
    from hybrid.training.loop import TrainingDiverged, train

    recipe = load_recipe(args.recipe)
    overrides = parse_overrides(args.set)
    if args.out is not None:
        overrides["out_dir"] = args.out
    if args.tensorboard:
        overrides["tensorboard"] = True
    config = config_from_recipe(recipe, overrides)
    try:
        summary = train(recipe, config, resume=not args.no_resume, progress=not args.no_progress)
    except TrainingDiverged as err:
        print(f"hybrid train: stopped: {err}", file=sys.stderr)
        return DIVERGED_EXIT
    except KeyboardInterrupt:
        print("hybrid train: interrupted; run the same command again to resume from the newest checkpoint",
              file=sys.stderr)
        return 130
    if distributed.is_main():  # under torchrun every process returns the summary: one prints it
        print(summary.describe())
    return 0


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "train.data=[a.txt, b/]"]`` -> ``{"lr": 0.0003, "data": ["a.txt", "b/"]}``.

    Values are read as YAML (so lists, null and numbers work as in a recipe)."""
    def only_train(path: list[str]) -> str | None:
        if path[0] in ("model", "tokenizer", "extends"):
            return (f"only the train: section can be set here; {path[0]}: changes belong in a recipe that extends "
                    f"this one (a file with 'extends: <this recipe>' and a {path[0]}: section)")
        if path[0] != "train" or len(path) < 2:
            return f"only the train: section can be set here: write train.{'.'.join(path)}=..."
        return None

    out: dict[str, Any] = {}
    for path, value in parse_set(items, "train.KEY=VALUE, e.g. --set train.lr=3e-4", only_train):
        node = out
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out
