"""Checkpoints: a folder that holds everything needed to run a model again.

::

    my-model/
      recipe.yaml          the expanded recipe (explicit layer list, every option): Recipe.to_yaml()
      model.safetensors    the weights; metadata: format name and version, the model's fingerprint
      tokenizer.json       only for a file tokenizer (recipe.yaml then says {type: file, path: tokenizer.json})
      config.json          what transformers reads (hybrid.formats.hf_config): with ``import hybrid.hf``,
                           ``AutoModelForCausalLM.from_pretrained(my-model)`` loads the folder

Reading never unpickles anything: weights go through safetensors, the recipe through
``yaml.safe_load``. Every way a folder can be wrong (missing, truncated, edited, another model's)
is a ``CheckpointError`` that says what is wrong and where.

Saving is atomic at the folder level: everything is written into a temporary sibling folder, which
is then renamed into place. An existing checkpoint is first renamed aside and deleted only once the
new one is in place, so at no point is the user left with neither (if the process dies between the
two renames, the old one is still there under ``.<name>.old-*`` and loading says so).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from blocks.state import StateError
from hybrid.formats.atomic import fsync_folder, share, swap_into_place
from hybrid.formats.hf_config import hf_config, write_hf_config
from hybrid.formats.tokenizer import Tokenizer, TokenizerError, check_fits, load_tokenizer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, RecipeError, load_recipe
from hybrid.model.state import read_safetensors

FORMAT = "kvm-hybrid-checkpoint"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be saved or loaded; the message names the file and the problem."""


# ----------------------------------------------------------------------------- save

def save_checkpoint(folder: str | Path, recipe: Recipe, model: HybridLM, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (built from ``recipe``) and its tokenizer to ``folder``, atomically.

    ``tokenizer`` None: the one ``recipe.tokenizer`` describes (a relative path read next to the
    recipe file). An existing checkpoint at ``folder`` is replaced; an existing folder that is not a
    checkpoint is refused, so a typo cannot delete unrelated files. Returns the folder.
    """
    folder = Path(folder)
    if model.config.fingerprint() != recipe.model.fingerprint():
        raise CheckpointError("the model was not built from this recipe (their architecture fingerprints "
                              f"{model.config.fingerprint()} and {recipe.model.fingerprint()} differ); "
                              "pass the recipe the model was built with")
    if tokenizer is None:
        source = Path(recipe.source)
        tokenizer = load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None)
    check_fits(tokenizer, recipe.model.vocab_size)
    if folder.exists() and not _is_checkpoint(folder):
        raise CheckpointError(f"{folder} exists and is not a checkpoint (no {RECIPE_FILE} and {WEIGHTS_FILE}); "
                              "refusing to replace it: choose a new folder or remove it yourself")

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        spec = tokenizer.save(tmp)
        (tmp / RECIPE_FILE).write_text(dataclasses.replace(recipe, tokenizer=spec).to_yaml())
        tensors, aliases = _unique_tensors(model.state_dict())
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "model_fingerprint": recipe.model.fingerprint(), "aliases": json.dumps(aliases)}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        write_hf_config(tmp, hf_config(recipe.model, tokenizer, next(iter(tensors.values())).dtype))
        share(tmp)
        fsync_folder(tmp)
        swap_into_place(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _unique_tensors(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop names that share memory with an earlier one (tied weights: safetensors refuses shared
    tensors). Returns (tensors to store, {dropped name: stored name})."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, value in state_dict.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if value.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = value.detach().contiguous().cpu()
    return tensors, aliases


def _is_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and (folder / RECIPE_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


# ----------------------------------------------------------------------------- load

def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> tuple[Recipe, HybridLM, Tokenizer]:
    """(recipe, model in eval mode, tokenizer) from a checkpoint folder.

    ``dtype`` None keeps the dtype the weights were saved in; otherwise floating weights are cast.
    """
    folder = Path(folder)
    if not folder.is_dir():
        leftovers = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
        hint = f"; an interrupted save left the previous checkpoint at {leftovers[-1]}" if leftovers else ""
        raise CheckpointError(f"no checkpoint folder at {folder}{hint}")
    recipe_path = folder / RECIPE_FILE
    if not recipe_path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: {RECIPE_FILE} is missing")
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as err:
        raise CheckpointError(f"{recipe_path} is not a valid recipe: {err}") from None
    try:
        metadata, tensors = read_safetensors(folder / WEIGHTS_FILE, what="weights")
    except StateError as err:
        raise CheckpointError(str(err)) from None
    weights = folder / WEIGHTS_FILE
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{weights} is not a kvm-hybrid checkpoint's weights (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{weights}: checkpoint format version {metadata.get('format_version')} is not "
                              f"supported (this toolkit reads version {FORMAT_VERSION})")
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        for alias, source in aliases.items():
            tensors[alias] = tensors[source]
    except (ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{weights}: unreadable 'aliases' metadata ({err!r})") from None

    model = HybridLM(recipe.model)
    saved_fingerprint = metadata.get("model_fingerprint")
    fingerprint = recipe.model.fingerprint()
    problems = _mismatches(tensors, model.state_dict())
    if problems:
        edited = (f"\n  The weights were saved for architecture {saved_fingerprint}, {RECIPE_FILE} describes "
                  f"{fingerprint}: was {RECIPE_FILE} edited?" if saved_fingerprint != fingerprint else "")
        raise CheckpointError(f"{weights} does not fit {recipe_path}:\n  " + "\n  ".join(problems) + edited)
    if saved_fingerprint != fingerprint:
        raise CheckpointError(f"{weights} was saved for architecture {saved_fingerprint}, but {recipe_path} "
                              f"describes {fingerprint} (the shapes fit, an option differs: was {RECIPE_FILE} "
                              "edited?). Restore the saved recipe, or build HybridLM from your recipe and "
                              "load the weights into it yourself if the change is intended")
    model.load_state_dict(tensors, assign=True)  # assign: keep the saved dtype, no copy
    model.to(device=device, dtype=dtype)
    model.eval()

    try:
        tokenizer = load_tokenizer(recipe.tokenizer, folder, vocab_size=recipe.model.vocab_size)
    except TokenizerError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    return recipe, model, tokenizer


def _mismatches(saved: dict[str, Tensor], expected: dict[str, Tensor], limit: int = 8) -> list[str]:
    """Lines naming missing, unexpected and mis-shaped weights (at most ``limit`` names each)."""
    def listed(names: list[str]) -> str:
        more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    missing = [n for n in expected if n not in saved]
    unexpected = [n for n in saved if n not in expected]
    shaped = [f"{n} {tuple(saved[n].shape)} (the recipe needs {tuple(v.shape)})"
              for n, v in expected.items() if n in saved and saved[n].shape != v.shape]
    lines = []
    if missing:
        lines.append(f"missing weights: {listed(missing)}")
    if unexpected:
        lines.append(f"unexpected weights: {listed(unexpected)}")
    if shaped:
        lines.append(f"mis-shaped weights: {listed(shaped)}")
    return lines
