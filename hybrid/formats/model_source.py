"""The model a command names: a checkpoint folder, a training run folder (its newest checkpoint), or
a recipe (random weights, for trying a recipe out), opened on a device in a dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import torch

from hybrid.formats.checkpoint import RECIPE_FILE, CheckpointError, load_checkpoint, weights_identity
from hybrid.formats.integrity import first_nonfinite
from hybrid.formats.run_folder import latest_checkpoint
from hybrid.formats.tokenizer import Tokenizer, load_tokenizer
from hybrid.model.device import resolve_device
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, RecipeError, load_recipe, resolve_recipe_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_from_recipe(recipe: Recipe, seed: int) -> tuple[HybridLM, Tokenizer]:
    """The recipe's model with random weights drawn from ``seed`` (eval mode, its ``weights_id`` set),
    and its tokenizer. Weights that come out non-finite (an ``init_std`` too large) are refused."""
    source = Path(recipe.source)
    tokenizer = load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None,
                               vocab_size=recipe.model.vocab_size)
    torch.manual_seed(seed)
    model = HybridLM(recipe.model).eval()
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise RecipeError(f"{recipe.source}: the initialisation gives the weight {bad} NaN or infinite values; "
                          "lower model.init_std (or the sizes it is scaled by)")
    weights_identity(model)
    return model, tokenizer


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


def open_model(source: str, device: str, dtype: str | None, seed: int, log: TextIO, allow_nonfinite: bool = False
               ) -> tuple[Recipe, HybridLM, Tokenizer]:
    """A checkpoint folder, a training run folder (its newest checkpoint), or a recipe file/name
    (random weights: says so on ``log``), on ``device`` (``hybrid.model.device``: ``auto`` for CUDA
    where there is one) in ``dtype`` (a ``DTYPES`` name; None: as saved). ``allow_nonfinite``: load
    a checkpoint whose weights hold NaN or infinite values (see ``load_checkpoint``)."""
    device = resolve_device(device)
    if Path(source).is_dir():
        return load_checkpoint(checkpoint_folder(source, log), device=device, dtype=DTYPES[dtype] if dtype else None,
                               allow_nonfinite=allow_nonfinite)
    try:
        path = resolve_recipe_path(source)
    except RecipeError:
        raise CheckpointError(f"{source!r} is neither a checkpoint folder nor a recipe (see `hybrid recipes`)"
                              ) from None
    recipe = load_recipe(path)
    print(f"[{source} is a recipe: random weights, seed {seed}; pass a checkpoint folder for a trained model]",
          file=log)
    model, tokenizer = build_from_recipe(recipe, seed)
    return recipe, model.to(device=device, dtype=DTYPES[dtype] if dtype else None), tokenizer
