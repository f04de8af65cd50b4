"""Checkpoints: a folder that holds everything needed to run a model again.

::

    my-model/
      recipe.yaml          the expanded recipe (explicit layer list, every option): Recipe.to_yaml()
      model.safetensors    the weights; metadata: format name and version, the model's fingerprint, the
                           content hash of the weights and the sha256 of tokenizer.json
      tokenizer.json       only for a file tokenizer (recipe.yaml then says {type: file, path: tokenizer.json})
      config.json          what transformers reads (hybrid.formats.hf_config): with ``import hybrid.hf``,
                           ``AutoModelForCausalLM.from_pretrained(my-model)`` loads the folder

Reading never unpickles anything: weights go through safetensors, the recipe through
``yaml.safe_load``. Every way a folder can be wrong (missing, truncated, edited, another model's)
is a ``CheckpointError`` that says what is wrong and where.

Loading checks the weights against the content hash recorded when they were saved
(``hybrid.formats.integrity``: corrupted bytes are refused, not decoded to NaN), the tokenizer file
against its recorded sha256 (a swapped ``tokenizer.json`` is refused), and that every weight is
finite (a NaN or infinity is refused, naming the tensor, unless the caller allows it). The content
hash is the *identity of the weights*: the loaded model carries it as ``weights_id``, and states
saved with it record it. A checkpoint written before hashes were recorded still loads: nothing
then proves its bytes, and its identity is the hash of what was read.

Saving is atomic at the folder level: everything is written into a temporary sibling folder, which
is then renamed into place. An existing checkpoint is first renamed aside and deleted only once the
new one is in place, so at no point is the user left with neither (if the process dies between the
two renames, the old one is still there under ``.<name>.old-*`` and loading says so).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from blocks.errors import InputError
from blocks.state import StateError
from hybrid.formats.atomic import new_folder
from hybrid.formats.hf_config import hf_config, write_hf_config
from hybrid.formats.integrity import file_sha256, first_nonfinite, short, tensors_sha256
from hybrid.formats.tokenizer import Tokenizer, TokenizerError, check_fits, load_tokenizer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, RecipeError, load_recipe
from hybrid.model.state import read_safetensors

FORMAT = "kvm-hybrid-checkpoint"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "model.safetensors"
NO_FILE = "none"  # the tokenizer_sha256 of a tokenizer without a file (bytes)


class CheckpointError(InputError):
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

    with new_folder(folder) as tmp:
        spec = tokenizer.save(tmp)
        (tmp / RECIPE_FILE).write_text(dataclasses.replace(recipe, tokenizer=spec).to_yaml())
        tensors, aliases = unique_tensors(model.state_dict())
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "model_fingerprint": recipe.model.fingerprint(), "aliases": json.dumps(aliases),
                    "content_sha256": tensors_sha256(tensors)}
        has_file = spec.get("type") == "file"
        metadata["tokenizer_sha256"] = file_sha256(tmp / spec["path"]) if has_file else NO_FILE
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        write_hf_config(tmp, hf_config(recipe.model, tokenizer, next(iter(tensors.values())).dtype))
    return folder


def unique_tensors(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
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

def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    allow_nonfinite: bool = False) -> tuple[Recipe, HybridLM, Tokenizer]:
    """(recipe, model in eval mode, tokenizer) from a checkpoint folder.

    ``dtype`` None keeps the dtype the weights were saved in; otherwise floating weights are cast.
    The model's ``weights_id`` is the content hash of the weights (see the module docstring).
    ``allow_nonfinite``: load weights that hold NaN or infinite values instead of refusing them.
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
    weights = folder / WEIGHTS_FILE
    metadata, tensors, content = _read_weights(weights)

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
    bad = None if allow_nonfinite else first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"{weights}: the weight {bad} holds NaN or infinite values (saved from a diverged "
                              "run?); use an earlier checkpoint, or allow it on purpose (hybrid generate "
                              "--allow-nonfinite-weights)")
    model.load_state_dict(tensors, assign=True)  # assign: keep the saved dtype, no copy
    model.to(device=device, dtype=dtype)
    model.eval()
    model.weights_id = content

    _check_tokenizer_file(folder, recipe, metadata)
    try:
        tokenizer = load_tokenizer(recipe.tokenizer, folder, vocab_size=recipe.model.vocab_size)
    except TokenizerError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    return recipe, model, tokenizer


def _read_weights(weights: Path) -> tuple[dict[str, str], dict[str, Tensor], str]:
    """(metadata, tensors with the tied aliases filled in, content hash) of a checkpoint's weights
    file, checked for format and against the content hash recorded in it (when there is one)."""
    try:
        metadata, tensors = read_safetensors(weights, what="weights")
    except StateError as err:
        raise CheckpointError(str(err)) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{weights} is not a kvm-hybrid checkpoint's weights (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{weights}: checkpoint format version {metadata.get('format_version')} is not "
                              f"supported (this toolkit reads version {FORMAT_VERSION})")
    content = tensors_sha256(tensors)
    recorded = metadata.get("content_sha256")
    if recorded is not None and recorded != content:
        raise CheckpointError(f"{weights}: the weights do not match the content hash recorded when they were saved "
                              f"({short(recorded)} recorded, {short(content)} read): the file is corrupted or was "
                              "edited; restore it from where it came from, or use another checkpoint")
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        for alias, source in aliases.items():
            tensors[alias] = tensors[source]
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{weights}: unreadable 'aliases' metadata ({err!r})") from None
    return metadata, tensors, content


def _check_tokenizer_file(folder: Path, recipe: Recipe, metadata: dict[str, str]) -> None:
    """Refuse a tokenizer other than the one the checkpoint was saved with (a file by its sha256)."""
    recorded = metadata.get("tokenizer_sha256")
    if recorded is None:
        return
    has_file = recipe.tokenizer.get("type") == "file"
    if has_file != (recorded != NO_FILE):
        kinds = ("the byte tokenizer", "a tokenizer file")
        raise CheckpointError(f"{folder / RECIPE_FILE} names {kinds[has_file]}, but the checkpoint was saved with "
                              f"{kinds[not has_file]}: restore {RECIPE_FILE}")
    if not has_file:
        return
    path = folder / recipe.tokenizer["path"]
    if not path.is_file():
        raise CheckpointError(f"{folder}: its tokenizer file {path} is missing")
    actual = file_sha256(path)
    if actual != recorded:
        raise CheckpointError(f"{path} is not the tokenizer this checkpoint was saved with (sha256 {short(recorded)} "
                              f"recorded, {short(actual)} found): put its own tokenizer back")


def recorded_weights_id(folder: Path) -> str | None:
    """The content hash recorded in a checkpoint folder's weights file (its header only is read)."""
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
        return (f.metadata() or {}).get("content_sha256")


def weights_identity(model: HybridLM) -> str:
    """``model.weights_id``, set first (the content hash of its weights as they are now) if it is not."""
    if model.weights_id is None:
        model.weights_id = tensors_sha256(unique_tensors(model.state_dict())[0])
    return model.weights_id


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
