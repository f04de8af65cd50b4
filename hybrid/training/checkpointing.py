"""The trainer's state in each checkpoint folder: saved atomically, and resumed exactly.

Resuming (the default) continues from the newest ``step_*`` folder (``hybrid.formats.run_folder``):
model, optimizer, schedule position, data position, RNG states and the running loss window, so on
CPU with the same settings and thread count the losses after a resume equal those of an
uninterrupted run bitwise. The recipe's model and tokenizer must be those of the checkpoint, and the
settings that define the data stream (``DATA_STREAM_FIELDS``) must not change; other settings may
(a lower lr after a divergence, more steps), and the run says which changed.

The trainer files prove their own bytes: ``trainer.safetensors`` records the content hash of its
tensors, ``trainer.json`` the hash of its own contents and the content hash of the step's weights
(``hybrid.formats.integrity``). Resuming refuses a step folder whose files were corrupted or edited,
or whose ``model.safetensors`` is not the one its trainer state was saved with (another step's).
Folders written before these hashes were recorded still resume, unchecked.

A fresh run starts from the recipe's random initialisation, or from the weights of a checkpoint
folder (``init_from``: fine-tuning, e.g. a model ``hybrid convert`` wrote; ``load_initial_weights``);
a resumed run ignores it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from blocks.state import StateError
from hybrid.formats.atomic import fsync_folder, save_safetensors, swap_into_place, write_text
from hybrid.formats.checkpoint import CheckpointError, load_checkpoint, recorded_weights_id, save_checkpoint
from hybrid.formats.integrity import json_sha256, short, tensors_sha256
from hybrid.formats.run_folder import (
    LATEST_FILE,
    TRAINER_JSON,
    TRAINER_TENSORS,
    latest_checkpoint,
    step_folder,
    step_folders,
)
from hybrid.formats.tokenizer import Tokenizer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, model_to_dict
from hybrid.model.state import read_safetensors
from hybrid.training import data as datalib
from hybrid.training import distributed
from hybrid.training.config import TrainConfig, TrainError
from hybrid.training.optimizer import lr_at

TRAINER_FORMAT = "kvm-hybrid-trainer"
TRAINER_VERSION = 1
DATA_STREAM_FIELDS = ("data", "text_field", "seq_len", "batch_size", "val_fraction", "seed")
"""Settings a resumed run must share with its checkpoint: they define the batches the saved step points into."""


def save_training_checkpoint(out_dir: Path, step: int, recipe: Recipe, config: TrainConfig, model: HybridLM,
                             tokenizer: Tokenizer, optimizer: torch.optim.Optimizer, names: list[str],
                             extra: dict, keep_last: int) -> Path:
    """Write ``out_dir/step_NNNNNN`` atomically, point ``latest`` at it and delete all but the newest
    ``keep_last`` step folders. The folder is assembled under a hidden name (the model checkpoint,
    then the trainer files), flushed to disk and renamed into place, so a ``step_*`` folder is
    always complete; a run killed midway leaves at most a hidden folder that the next save removes.

    Every process of a data-parallel run calls it and only the main one writes. ``model`` may be
    wrapped (``hybrid.training.distributed.wrap``); under FSDP the full weights and optimizer moments are
    gathered from the shards first, so the files are those a one-process run writes."""
    folder = step_folder(out_dir, step)
    whole = _whole_model(model)
    tensors, structure = _optimizer_tensors(optimizer, names)
    if not distributed.is_main():
        return folder
    staging = out_dir / f".{folder.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    save_checkpoint(staging, dataclasses.replace(recipe, train=config.to_dict()), whole, tokenizer)
    tensors.update(_rng_tensors())
    save_safetensors(tensors, staging / TRAINER_TENSORS,
                     {"format": TRAINER_FORMAT, "format_version": str(TRAINER_VERSION),
                      "content_sha256": tensors_sha256(tensors)})
    info = {"format": TRAINER_FORMAT, "format_version": TRAINER_VERSION, "step": step,
            "data_position": {"next_batch": step, "seed": config.seed},
            "scheduler": {"schedule": config.schedule, "next_step": step, "next_lr": lr_at(step, config)},
            "tokens_seen": step * config.tokens_per_step, **extra, "optimizer": structure,
            "config": config.to_dict(), "model_fingerprint": recipe.model.fingerprint(),
            "tokenizer": tokenizer_fingerprint(tokenizer), "weights_sha256": recorded_weights_id(staging)}
    info["content_sha256"] = json_sha256(info, without="content_sha256")
    (staging / TRAINER_JSON).write_text(json.dumps(info, indent=1) + "\n")
    fsync_folder(staging)
    swap_into_place(staging, folder)
    write_text(out_dir / LATEST_FILE, folder.name + "\n")
    for old in step_folders(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return folder


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's identity (type, file contents, vocabulary size, eos id)."""
    return hashlib.sha256(json.dumps(datalib.tokenizer_identity(tokenizer), sort_keys=True).encode()).hexdigest()[:16]


def resume_weights(folder: Path, recipe: Recipe, config: TrainConfig, tokenizer: Tokenizer, model: HybridLM,
                   say: Callable[[str], None]) -> dict:
    """Check that the checkpoint ``folder`` can continue this run (same model, tokenizer and data
    stream; ``say`` reports the settings that changed) and load its weights into ``model``. Returns
    the trainer state that ``resume_trainer`` puts back once the optimizer exists."""
    saved = _read_trainer_files(folder)
    _check_compatible(folder, saved["info"], recipe, config, tokenizer, say)
    _load_model_weights(folder, model, saved["info"].get("weights_sha256"))
    return saved


def resume_trainer(folder: Path, saved: dict, optimizer: torch.optim.Optimizer, names: list[str],
                   device: torch.device) -> tuple[int, list[float]]:
    """Put the optimizer moments and RNG states of ``saved`` (from ``resume_weights``) back; returns
    (the step to continue from, the running loss window)."""
    _load_optimizer(folder, optimizer, names, saved)
    _restore_rng(saved["tensors"], device)
    return saved["info"]["step"], list(saved["info"]["loss_window"])


def load_initial_weights(folder: Path, recipe: Recipe, model: HybridLM) -> None:
    """``train.init_from``: a fresh run's weights from a checkpoint folder (or a run folder's newest
    checkpoint) that holds this recipe's model."""
    if folder.is_dir() and not (folder / "recipe.yaml").is_file() and latest_checkpoint(folder) is not None:
        folder = latest_checkpoint(folder)
    try:
        saved_recipe, saved, _ = load_checkpoint(folder)
    except CheckpointError as err:
        raise TrainError(f"train.init_from: {err}") from None
    if saved_recipe.model.fingerprint() != recipe.model.fingerprint():
        raise TrainError(f"train.init_from: {folder} holds another model than {recipe.source} (architecture "
                         f"fingerprint {saved_recipe.model.fingerprint()} vs {recipe.model.fingerprint()}); "
                         f"train the recipe saved with it, {folder / 'recipe.yaml'}")
    model.load_state_dict(saved.state_dict())


def _whole_model(model: nn.Module) -> HybridLM | None:
    """The model with all of its weights in this process: itself, or DDP's inner module; under FSDP
    (a collective) a copy assembled from the gathered shards in the main process, None elsewhere."""
    if not distributed.is_sharded(model):
        return distributed.unwrap(model)
    state = distributed.full_state_dict(model)
    if state is None:
        return None
    with torch.device("meta"):  # no memory, and no draw from the RNG, for weights about to be replaced
        whole = HybridLM(model.config)
    whole.load_state_dict(state, assign=True)
    return whole


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], dict]:
    """The optimizer's per-parameter state as named tensors (``optimizer.<param>.<key>``) plus the
    JSON structure that says which keys each parameter has; no pickling anywhere. FSDP's sharded
    moments are gathered whole (every process takes part); only the main process keeps them."""
    tensors: dict[str, Tensor] = {}
    keys: dict[str, list[str]] = {}
    for index, entries in optimizer.state_dict()["state"].items():
        name = names[index]
        keys[name] = sorted(entries)
        for key, value in entries.items():
            value = distributed.full_tensor(value)
            if distributed.is_main():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"type": type(optimizer).__name__, "param_names": names, "state_keys": keys}


def _rng_tensors() -> dict[str, Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _restore_rng(tensors: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and device.type == "cuda" and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _read_trainer_files(folder: Path) -> dict:
    """{"info": trainer.json, "tensors": trainer.safetensors}, checked for format and completeness."""
    path = folder / TRAINER_JSON
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise TypeError(f"expected a JSON object, got {type(info).__name__}")
    except (OSError, ValueError, TypeError) as err:
        raise TrainError(f"{path} is not readable (corrupt?): {err}. Delete {folder} to resume from the "
                         "checkpoint before it") from None
    if "content_sha256" in info and info["content_sha256"] != json_sha256(info, without="content_sha256"):
        raise TrainError(f"{path}: its contents do not match the hash recorded in it (corrupted or edited). "
                         f"Delete {folder} to resume from the checkpoint before it")
    if info.get("format") != TRAINER_FORMAT or info.get("format_version") != TRAINER_VERSION:
        raise TrainError(f"{path}: not a trainer state this version reads (format {info.get('format')!r} "
                         f"version {info.get('format_version')!r}; expected {TRAINER_FORMAT!r} {TRAINER_VERSION})")
    required = ("step", "loss_window", "optimizer", "config", "model_fingerprint", "tokenizer")
    missing = [k for k in required if k not in info]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)} (corrupt or edited?). Delete {folder} to resume "
                         "from the checkpoint before it")
    try:
        metadata, tensors = read_safetensors(folder / TRAINER_TENSORS, what="trainer state")
    except StateError as err:
        raise TrainError(f"{err}. Delete {folder} to resume from the checkpoint before it") from None
    if metadata.get("format") != TRAINER_FORMAT or "rng.torch" not in tensors:
        raise TrainError(f"{folder / TRAINER_TENSORS} is not a trainer state (format {metadata.get('format')!r})")
    recorded = metadata.get("content_sha256")
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise TrainError(f"{folder / TRAINER_TENSORS}: its contents do not match the hash recorded when it was saved "
                         f"(corrupted or edited). Delete {folder} to resume from the checkpoint before it")
    return {"info": info, "tensors": tensors}


def _check_compatible(folder: Path, info: dict, recipe: Recipe, config: TrainConfig, tokenizer: Tokenizer,
                      say) -> None:
    """Refuse a checkpoint of another model, tokenizer or data stream; report changed settings."""
    if info["model_fingerprint"] != recipe.model.fingerprint():
        try:
            saved_recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
            diffs = _differences(saved_recipe["model"], model_to_dict(recipe.model), "model.")
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            diffs = []
        detail = f": {'; '.join(diffs[:5])}" if diffs else ""
        raise TrainError(f"{folder} holds another model than {recipe.source} (architecture fingerprint "
                         f"{info['model_fingerprint']} vs {recipe.model.fingerprint()}){detail}. Resume with the "
                         "recipe it was trained with, or train into another --out folder")
    if info["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise TrainError(f"{folder} was trained with another tokenizer than {recipe.source} names; resume with "
                         "the same tokenizer, or train into another --out folder")
    now = config.to_dict()
    saved = info["config"]
    stream = [f"train.{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now"
              for k in DATA_STREAM_FIELDS if saved.get(k) != now[k]]
    if stream:
        raise TrainError(f"{folder} cannot continue with these settings: " + "; ".join(stream) +
                         ". They define the batches its data position counts in; keep them, or train into "
                         "another --out folder")
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        say("resuming with changed settings: " + ", ".join(changed))


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """YAML paths where two plain-data trees differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} in the checkpoint, {new!r} now"]


def _load_model_weights(folder: Path, model: HybridLM, expected: str | None) -> None:
    """Load the step's weights into ``model``; ``expected``: the weights' content hash that trainer.json
    recorded (None in folders written before it was recorded)."""
    try:
        _, saved, _ = load_checkpoint(folder)
    except CheckpointError as err:
        raise TrainError(f"cannot resume from {folder}: {err}. Delete it to resume from the checkpoint "
                         "before it") from None
    if expected is not None and saved.weights_id != expected:
        raise TrainError(f"cannot resume from {folder}: its model.safetensors (weights {short(saved.weights_id)}) is "
                         f"not the one its trainer state was saved with (weights {short(expected)}): replaced by "
                         f"another step's? Put its own back, or delete {folder} to resume from the checkpoint "
                         "before it")
    model.load_state_dict(saved.state_dict())


def _load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: list[str], saved: dict) -> None:
    """Put the saved moments back; the hyperparameters stay those of the current settings. Under FSDP
    each process keeps its shard of each (whole) saved moment."""
    structure, tensors = saved["info"]["optimizer"], saved["tensors"]
    path = folder / TRAINER_TENSORS
    if structure.get("type") != type(optimizer).__name__ or structure.get("param_names") != names:
        raise TrainError(f"{folder / TRAINER_JSON}: the optimizer state is for other parameters than this "
                         f"model's {type(optimizer).__name__} (corrupt or edited?)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, name in enumerate(names):
        entries = {}
        for key in structure["state_keys"].get(name, []):
            tensor = tensors.get(f"optimizer.{name}.{key}")
            if tensor is None:
                raise TrainError(f"{path} lacks optimizer.{name}.{key} (corrupt?). Delete {folder} to resume "
                                 "from the checkpoint before it")
            entries[key] = distributed.shard_like(tensor, params[index])
        if entries:
            state[index] = entries
    current = optimizer.state_dict()
    try:
        optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    except (ValueError, RuntimeError) as err:
        raise TrainError(f"{path}: the optimizer state does not fit this model ({err})") from None
    shapes = [(n, tuple(state[i]["exp_avg"].shape), tuple(p.shape)) for i, (n, p) in enumerate(zip(names, params))
              if i in state and "exp_avg" in state[i] and state[i]["exp_avg"].shape != p.shape]
    if shapes:
        name, got, want = shapes[0]
        raise TrainError(f"{path}: optimizer state for {name} has shape {got}, the parameter {want} (corrupt?)")
