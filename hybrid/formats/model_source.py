"""The model a command names: a checkpoint folder, a training run folder (its newest checkpoint), or
a recipe (random weights, for trying a recipe out), opened on a device in a dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import torch

from hybrid.formats.checkpoint import RECIPE_FILE, CheckpointError, load_checkpoint
from hybrid.formats.run_folder import latest_checkpoint
from hybrid.formats.tokenizer import Tokenizer, load_tokenizer
from hybrid.model.device import resolve_device
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, load_recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_from_recipe(recipe: Recipe, seed: int) -> tuple[HybridLM, Tokenizer]:
    """The recipe's model with random weights drawn from ``seed`` (eval mode), and its tokenizer."""
    source = Path(recipe.source)
    tokenizer = load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None,
                               vocab_size=recipe.model.vocab_size)
    torch.manual_seed(seed)
    return HybridLM(recipe.model).eval(), tokenizer


def checkpoint_folder(source: str | Path, log: TextIO) -> Path:
    """The folder ``source`` when it is a checkpoint folder (or no folder at all: loading it says what
    is wrong), else the newest checkpoint of the training run folder it is (said on ``log``)."""
    folder = Path(source)
    if folder.is_dir() and not (folder / RECIPE_FILE).is_file():
        newest = latest_checkpoint(folder)
        if newest is not None:
            print(f"[{source} is a training run: using its newest checkpoint, {newest.name}]", file=log)
            return newest
    return folder


def open_model(source: str, device: str, dtype: str | None, seed: int, log: TextIO
               ) -> tuple[Recipe, HybridLM, Tokenizer]:
    """A checkpoint folder, a training run folder (its newest checkpoint), or a recipe file/name
    (random weights: says so on ``log``), on ``device`` (``hybrid.model.device``: ``auto`` for CUDA
    where there is one) in ``dtype`` (a ``DTYPES`` name; None: as saved)."""
    device = resolve_device(device)
    if Path(source).is_dir():
        return load_checkpoint(checkpoint_folder(source, log), device=device, dtype=DTYPES[dtype] if dtype else None)
    try:
        recipe = load_recipe(source)
    except Exception:
        if Path(source).exists():
            raise
        raise CheckpointError(f"{source!r} is neither a checkpoint folder nor a recipe") from None
    print(f"[{source} is a recipe: random weights, seed {seed}; pass a checkpoint folder for a trained model]",
          file=log)
    model, tokenizer = build_from_recipe(recipe, seed)
    return recipe, model.to(device=device, dtype=DTYPES[dtype] if dtype else None), tokenizer
