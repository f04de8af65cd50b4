"""Files prove what they hold (hybrid.formats.integrity): checkpoints refuse corrupted weights, a
swapped tokenizer and non-finite weights; a saved state continues only the weights that made it;
generation stops at non-finite logits instead of printing garbage."""

import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from blocks.state import StateError
from hybrid.cli.main import main
from hybrid.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_identity
from hybrid.formats.integrity import first_nonfinite, tensors_sha256
from hybrid.formats.model_source import build_from_recipe
from hybrid.formats.tokenizer import ByteTokenizer, HFTokenizer
from hybrid.generation.generate import GenerationError, SamplingConfig, generate
from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe
from hybrid.model.state import ModelState

RECIPE = "tiny/gla_kvm"


def metadata_of(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def rewrite(path, change_tensors=None, change_metadata=None) -> None:
    """Rewrite a safetensors file with its tensors and metadata changed as given (both callables)."""
    tensors, metadata = load_file(path), metadata_of(path)
    if change_tensors:
        change_tensors(tensors)
    if change_metadata:
        change_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of tiny/gla_kvm (seed 3, byte tokenizer) and the model it holds."""
    recipe = load_recipe(RECIPE)
    model, tokenizer = build_from_recipe(recipe, seed=3)
    return save_checkpoint(tmp_path / "ckpt", recipe, model, tokenizer), model


def word_tokenizer(path, words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_records_the_content_hash_of_its_weights_and_loads_with_that_identity(checkpoint):
    folder, model = checkpoint
    metadata = metadata_of(folder / "model.safetensors")
    assert metadata["tokenizer_sha256"] == "none"  # the byte tokenizer has no file
    _, loaded, _ = load_checkpoint(folder)
    assert loaded.weights_id == metadata["content_sha256"] == tensors_sha256(load_file(folder / "model.safetensors"))
    # the same weights have the same identity in memory: a recipe's random weights and its checkpoint agree
    assert weights_identity(model) == loaded.weights_id
    again, _ = build_from_recipe(load_recipe(RECIPE), seed=3)
    other, _ = build_from_recipe(load_recipe(RECIPE), seed=4)
    assert again.weights_id == loaded.weights_id != other.weights_id
    # the identity is that of the saved weights whatever dtype they are loaded in
    assert load_checkpoint(folder, dtype=torch.bfloat16)[1].weights_id == loaded.weights_id


@pytest.mark.parametrize("damage", ["flip a data byte", "same-size dtype in the header", "rename a tensor"])
def test_corrupted_weights_are_refused(checkpoint, damage):
    weights = checkpoint[0] / "model.safetensors"
    if damage == "flip a data byte":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x10
        weights.write_bytes(bytes(data))
    elif damage == "same-size dtype in the header":  # F32 -> I32: parses, same sizes, other numbers
        data = weights.read_bytes()
        weights.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))
    else:
        rewrite(weights, lambda t: t.__setitem__("blocks.0.mlp.down_projX.weight",
                                                 t.pop("blocks.0.mlp.down_proj.weight")))
    with pytest.raises(CheckpointError, match="do not match the content hash recorded when they were saved"):
        load_checkpoint(checkpoint[0])


def test_non_finite_weights_are_refused_by_name_unless_allowed(tmp_path):
    recipe = load_recipe(RECIPE)
    model = HybridLM(recipe.model)
    with torch.no_grad():
        model.blocks[2].mlp.up_proj.weight[1, 2] = float("nan")
    folder = save_checkpoint(tmp_path / "nan", recipe, model, ByteTokenizer())  # hashed: not corruption
    with pytest.raises(CheckpointError, match=r"the weight blocks\.2\.mlp\.up_proj\.weight holds NaN or infinite"):
        load_checkpoint(folder)
    _, loaded, _ = load_checkpoint(folder, allow_nonfinite=True)
    assert torch.isnan(loaded.blocks[2].mlp.up_proj.weight[1, 2])
    assert first_nonfinite({"a": torch.tensor([1.0, float("-inf")]), "b": torch.ones(2)}) == "a"
    assert first_nonfinite({"a": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor([7])}) is None


def test_a_swapped_or_missing_tokenizer_file_is_refused(tmp_path):
    recipe = load_recipe(RECIPE)
    model = HybridLM(recipe.model)
    tokenizer = HFTokenizer(word_tokenizer(tmp_path / "words.json", ["hi", "there"]))
    folder = save_checkpoint(tmp_path / "ckpt", recipe, model, tokenizer)
    assert load_checkpoint(folder)[2].encode("hi there") == [1, 2]
    shutil.copyfile(word_tokenizer(tmp_path / "other.json", ["there", "hi"]), folder / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer.json is not the tokenizer this checkpoint was saved with"):
        load_checkpoint(folder)
    saved = yaml.safe_load((folder / "recipe.yaml").read_text())
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**saved, "tokenizer": {"type": "bytes"}}))
    with pytest.raises(CheckpointError, match="names the byte tokenizer, but the checkpoint was saved with a "
                                              "tokenizer file"):
        load_checkpoint(folder)


def test_a_checkpoint_saved_before_hashes_were_recorded_still_loads(checkpoint):
    """Documented: nothing then proves its bytes; its identity is the hash of what was read."""
    folder, model = checkpoint
    weights = folder / "model.safetensors"
    rewrite(weights, change_metadata=lambda m: [m.pop("content_sha256"), m.pop("tokenizer_sha256")])
    _, loaded, _ = load_checkpoint(folder)
    assert loaded.weights_id == weights_identity(model)


# ----------------------------------------------------------------------------- states

@pytest.fixture
def two_checkpoints(tmp_path):
    """Two checkpoints of the same recipe with different weights (seeds 1 and 2)."""
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"seed{seed}"
        assert main(["init", RECIPE, str(folder), "--seed", str(seed)]) == 0
        folders.append(folder)
    return folders


def generate_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["generate", *map(str, argv), "--temperature", "0", "--max-new-tokens", "3"])
    return code, capsys.readouterr().err


def test_a_state_continues_only_the_weights_that_made_it(two_checkpoints, tmp_path, capsys):
    first, second = two_checkpoints
    state = tmp_path / "story.state"
    assert generate_cli(capsys, first, "--prompt", "Once upon", "--save-state", state)[0] == 0
    assert metadata_of(state)["weights_sha256"] == load_checkpoint(first)[1].weights_id
    assert generate_cli(capsys, first, "--prompt", " a", "--state", state)[0] == 0
    code, err = generate_cli(capsys, second, "--prompt", " a", "--state", state)
    assert code == 2 and "was made with other weights" in err and "--allow-other-weights" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, err = generate_cli(capsys, second, "--prompt", " a", "--state", state, "--allow-other-weights")
    assert code == 0 and "continuing a saved state of 12 tokens" in err


def test_a_state_without_a_weights_record_needs_the_explicit_flag(two_checkpoints, tmp_path, capsys):
    model = load_checkpoint(two_checkpoints[0])[1]
    with torch.inference_mode():
        state = model(torch.tensor([[1, 2, 3]])).state
    path = tmp_path / "old.state"
    state.save(path, model.config.fingerprint())  # no weights: as an older version saved them
    with pytest.raises(StateError, match="records no weights"):
        ModelState.load(path, model.config.fingerprint(), model.state_classes(), weights=model.weights_id)
    assert ModelState.load(path, model.config.fingerprint(), model.state_classes()).seq_len == 3
    assert generate_cli(capsys, two_checkpoints[0], "--prompt", "x", "--state", path)[0] == 2
    assert generate_cli(capsys, two_checkpoints[0], "--prompt", "x", "--state", path, "--allow-other-weights")[0] == 0


@pytest.mark.parametrize("damage, message", [
    ("flip a data byte", "do not match the hash recorded"),
    ("edit the token count", "do not match the hash recorded"),
    ("a NaN saved with its hash", r"the state tensor layers\.3\.slot_keys holds NaN"),
])
def test_corrupted_states_are_refused(checkpoint, tmp_path, damage, message):
    model = load_checkpoint(checkpoint[0])[1]
    with torch.inference_mode():
        state = model(torch.arange(40)[None]).state
    path = tmp_path / "s.state"
    fingerprint = model.config.fingerprint()
    if damage == "a NaN saved with its hash":
        with torch.inference_mode():
            state.layers[3].slot_keys[0, 0, 0, 0] = float("nan")
    state.save(path, fingerprint, model.weights_id)
    if damage == "flip a data byte":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "edit the token count":
        rewrite(path, change_metadata=lambda m: m.__setitem__("seq_len", "41"))
    with pytest.raises(StateError, match=message):
        ModelState.load(path, fingerprint, model.state_classes(), weights=model.weights_id)


# ----------------------------------------------------------------------------- generation

def test_generation_stops_at_non_finite_logits_naming_the_step(checkpoint, capsys):
    _, model = checkpoint
    broken = HybridLM(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.final_norm.weight[5] = float("inf")  # every logit becomes non-finite
    with pytest.raises(GenerationError, match=r"NaN or infinite at new token 1 of prompt 1 \(decode step 0\)"):
        generate(broken, [[1, 2, 3]], SamplingConfig(temperature=0, max_new_tokens=4))

    folder = save_checkpoint(checkpoint[0].parent / "broken", load_recipe(RECIPE), broken, ByteTokenizer())
    assert main(["generate", str(folder), "--prompt", "hi", "--allow-nonfinite-weights"]) == 2
    captured = capsys.readouterr()
    assert "logits became NaN or infinite at new token 1" in captured.err and "\x00" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
