"""Checkpoint folders (hybrid/formats/checkpoint.py): round trips give identical logits, every broken or
mismatched folder is a CheckpointError that says what is wrong, and an interrupted save keeps the
old checkpoint."""

import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from hybrid.formats.checkpoint import (
    CheckpointError,
    unique_tensors,
    load_checkpoint,
    save_checkpoint,
)
from hybrid.formats.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import recipe_from_dict

RECIPE = {"model": {"vocab_size": 260, "d_model": 32, "n_layers": 2, "layers": "GK",
                    "mixers": {"gla": {"num_heads": 2}, "kvm": {"num_heads": 2, "chunk_len": 4}}}}
TOKENS = torch.tensor([[5, 80, 3, 200, 17, 9, 1, 44, 250]])


def build(tie: bool = True, seed: int = 0):
    data = {"model": {**RECIPE["model"], "tie_embeddings": tie}}
    recipe = recipe_from_dict(data)
    torch.manual_seed(seed)
    return recipe, HybridLM(recipe.model).eval()


@torch.no_grad()
def logits(model):
    return model(TOKENS).logits


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of the tied model with the byte tokenizer: (folder, the model)."""
    recipe, model = build()
    return save_checkpoint(tmp_path / "ckpt", recipe, model, ByteTokenizer()), model


def test_round_trip_gives_identical_logits(saved):
    folder, model = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "recipe.yaml"]
    recipe, loaded, tokenizer = load_checkpoint(folder)
    assert torch.equal(logits(loaded), logits(model))
    assert recipe.model == model.config and isinstance(tokenizer, ByteTokenizer)
    assert not loaded.training
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temporary folders left


def test_untied_head_file_tokenizer_and_dtype(tmp_path):
    recipe, model = build(tie=False)
    hf = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "there": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(tmp_path / "words.json"))
    folder = save_checkpoint(tmp_path / "ckpt", recipe, model, HFTokenizer(tmp_path / "words.json"))
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["tokenizer"] == {"type": "file",
                                                                                  "path": "tokenizer.json"}
    (tmp_path / "words.json").unlink()  # the checkpoint has its own copy
    _, loaded, tokenizer = load_checkpoint(folder)
    assert torch.equal(logits(loaded), logits(model))
    assert tokenizer.encode("hi there") == [1, 2]
    _, half, _ = load_checkpoint(folder, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_tied_weights_are_stored_once():
    weight = torch.randn(4, 3)
    tensors, aliases = unique_tensors({"embed.weight": weight, "lm_head.weight": weight, "other": weight[:2]})
    assert list(tensors) == ["embed.weight", "other"] and aliases == {"lm_head.weight": "embed.weight"}


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable safetensors weights file"),
    ("drop_weight", "missing weights: blocks.1.mixer.q_proj.weight"),
    ("wider", "mis-shaped weights: embed.weight (260, 32) (the recipe needs (260, 48))"),
    ("other_option", "the shapes fit, an option differs"),
    ("garbage_recipe", "recipe.yaml is not a valid recipe"),
    ("no_weights", "no weights file at"),
    ("no_recipe", "recipe.yaml is missing"),
], ids=lambda value: value if " " not in value else "")
def test_broken_checkpoints_are_clear_errors(saved, damage, message):
    folder, _ = saved
    weights, recipe = folder / "model.safetensors", folder / "recipe.yaml"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "drop_weight":
        tensors = load_file(weights)
        del tensors["blocks.1.mixer.q_proj.weight"]
        with safe_open(str(weights), framework="pt") as f:  # keep the metadata but the content hash, which
            metadata = f.metadata()  # would refuse the file first (as a checkpoint saved before hashes were)
        del metadata["content_sha256"]
        save_file(tensors, str(weights), metadata=metadata)
    elif damage in ("wider", "other_option"):
        data = yaml.safe_load(recipe.read_text())
        if damage == "wider":
            data["model"]["d_model"] = 48
        else:
            data["model"]["mixers"]["kvm"]["chunk_len"] = 8
        recipe.write_text(yaml.safe_dump(data))
    elif damage == "garbage_recipe":
        recipe.write_text("model: [unclosed\n  - {")
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "no_recipe":
        recipe.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert message in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder at"):
        load_checkpoint(tmp_path / "nothing")


def test_interrupted_save_keeps_the_old_checkpoint(saved, monkeypatch):
    folder, old_model = saved
    recipe, new_model = build(seed=1)
    real_replace = os.replace

    def failing_replace(src, dst):  # the rename that would publish the new checkpoint fails
        if os.path.basename(src).startswith(".ckpt.tmp-"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(folder, recipe, new_model, ByteTokenizer())
    monkeypatch.undo()
    _, loaded, _ = load_checkpoint(folder)
    assert torch.equal(logits(loaded), logits(old_model))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ckpt"]  # nothing left behind
    save_checkpoint(folder, recipe, new_model, ByteTokenizer())  # and a save that works replaces it
    assert torch.equal(logits(load_checkpoint(folder)[1]), logits(new_model))


def test_save_refuses_what_it_should_not_write(tmp_path):
    recipe, model = build()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        save_checkpoint(tmp_path / "notes", recipe, model, ByteTokenizer())
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    other, _ = build(tie=False)
    with pytest.raises(CheckpointError, match="not built from this recipe"):
        save_checkpoint(tmp_path / "x", other, model, ByteTokenizer())
    small = recipe_from_dict({"model": {**RECIPE["model"], "vocab_size": 100}})
    with pytest.raises(ValueError, match="256 tokens but the model's vocab_size is 100"):
        save_checkpoint(tmp_path / "x", small, HybridLM(small.model), load_tokenizer({"type": "bytes"}))
