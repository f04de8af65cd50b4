"""Loading a checkpoint of the published KVM code (hybrid/formats/published.py) against the logits that code
produced: ``tests/fixtures/kvm_published_tiny`` (the ``published_tiny`` fixture; its README describes
the model, the tokens and how the reference logits and KVM state were made with recursal/KVM-paper
@1932b9ca, its PROVENANCE.md lists the files' SHA-256 sums, checked here)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hybrid.formats.published import (
    PublishedCheckpointError,
    load_published,
    published_name,
    read_published_config,
    recipe_from_published,
)
from hybrid.model.model import HybridLM

TOL = 1e-4  # max |logit difference|; measured: 1.6e-5 (full, compat), 2.4e-6 (decode, compat; full, no compat)


@pytest.fixture(scope="module")
def tokens(published_tiny) -> tuple[torch.Tensor, int]:
    data = json.loads((published_tiny / "tokens.json").read_text())
    return torch.tensor([data["input_ids"]]), data["prefill_len"]


@pytest.fixture(scope="module")
def reference(published_tiny) -> dict[str, torch.Tensor]:
    return load_file(published_tiny / "logits.safetensors")


@pytest.fixture(scope="module")
def compat_model(published_tiny):
    return load_published(published_tiny, compat=True)[1]


def test_fixture_files_match_their_sha256_sums(published_tiny):
    """The fixture is the published code's output byte for byte: PROVENANCE.md's sums cover every
    other file of the folder and match, and agree with the two sums the fixture's README gives."""
    listed = {name: digest for digest, name in
              re.findall(r"^([0-9a-f]{64})  (\S+)$", (published_tiny / "PROVENANCE.md").read_text(), re.MULTILINE)}
    assert set(listed) == {path.name for path in published_tiny.iterdir()} - {"PROVENANCE.md"}
    for name, digest in listed.items():
        assert hashlib.sha256((published_tiny / name).read_bytes()).hexdigest() == digest, f"{name} differs"
    in_readme = dict(re.findall(r"`([\w.]+)` ([0-9a-f]{64})", (published_tiny / "README.md").read_text()))
    assert in_readme.keys() == {"model.safetensors", "logits.safetensors"}
    assert {name: listed[name] for name in in_readme} == in_readme


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def test_full_forward_matches_published_logits(compat_model, tokens, reference):
    ids, _ = tokens
    assert max_diff(compat_model(ids).logits[0], reference["logits_full"]) < TOL


@torch.no_grad()
def test_prefill_then_decode_matches_published_logits_and_state(compat_model, tokens, reference, published_tiny):
    ids, prefill = tokens
    out = compat_model(ids[:, :prefill])
    rows, state = [out.logits[0]], out.state
    for t in range(prefill, ids.shape[1]):
        out = compat_model(ids[:, t:t + 1], state)
        rows.append(out.logits[0])
        state = out.state
    assert max_diff(torch.cat(rows), reference["logits_prefill_decode"]) < TOL

    # Both codes store slot *sums* of prepared (gated) keys and values, and the creating value's norm.
    published = load_file(published_tiny / "kvm_state.safetensors")
    for i, layer in enumerate(state.layers):
        assert layer.num_slots == 55
        assert layer.window_keys.shape[2] == 24  # tokens [176, 200) are still raw
        for ours, theirs in (("slot_keys", "kvm_s_k"), ("slot_values", "kvm_s_v"), ("slot_lens", "kvm_s_vlen")):
            assert max_diff(getattr(layer, ours)[0], published[f"after_decode_200.layer{i}.{theirs}"]) < TOL, (i, ours)


@torch.no_grad()
def test_without_compat_matches_the_published_math_without_its_bf16_casts(tokens, reference, published_tiny):
    ids, _ = tokens
    logits = load_published(published_tiny)[1](ids).logits[0]
    assert max_diff(logits, reference["logits_full_nobf16cast"]) < TOL
    assert max_diff(logits, reference["logits_full"]) > 0.01  # the casts flip merges: compat is not a no-op


def test_config_yaml_and_json_give_the_same_recipe(published_tiny):
    from_json = recipe_from_published(published_tiny / "config.json", compat=True).model
    from_yaml = recipe_from_published(published_tiny / "config.yaml", compat=True).model
    assert from_json == from_yaml
    assert read_published_config(published_tiny / "config.yaml") == read_published_config(published_tiny / "config.json")
    kvm = from_json.layers[0].options
    assert (kvm.budget, kvm.growth_factor, kvm.state_min_len, kvm.max_state_chunks) == ("power_law", 4.0, 16, 10000)
    assert kvm.rope_round_bf16 and kvm.bf16_state_values and kvm.state_key_zero_dims == 16
    assert from_json.block.mlp_hidden == 256 and not from_json.tie_embeddings and from_json.embedding_norm


def test_hybrid_layout_and_value_residual_groups():
    config = {"token_mixer": "kvm", "alt_layer_every": 2, "alt_token_mixer": "swa", "alt_rope_partial_dim": 32,
              "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 2, "rope_partial_dim": 16,
              "swa_window_size": -1, "chunk_len": 16, "state_budget_mode": "kvm_saturation", "state_saturation_n": 64}
    model = recipe_from_published(config).model
    assert [layer.mixer for layer in model.layers] == ["swa", "kvm", "swa", "kvm"]
    swa, kvm = model.layers[0].options, model.layers[1].options
    assert (swa.window, swa.rope_partial_dim, kvm.rope_partial_dim) == (16, 32, 16)
    assert swa.value_residual_group != kvm.value_residual_group
    assert (kvm.budget, kvm.saturation_n, kvm.state_min_len) == ("saturation", 64, 0)
    shared = recipe_from_published({**config, "alt_share_v0": 1}).model
    assert shared.layers[0].options.value_residual_group == shared.layers[1].options.value_residual_group


@torch.no_grad()
def test_hybrid_checkpoint_in_published_names_loads_back(tmp_path):
    """A KVM/SWA hybrid without attention token shift, saved under the published names (plus the zero
    ``attn.x_v`` the published code creates in that case), loads into the model it came from."""
    config = {"token_mixer": "kvm", "alt_layer_every": 2, "alt_token_mixer": "swa", "num_hidden_layers": 3,
              "hidden_size": 64, "num_attention_heads": 2, "rope_partial_dim": 16, "alt_rope_partial_dim": 32,
              "vocab_size": 256, "chunk_len": 8, "use_tokenshift_att": 0, "use_tokenshift_ffn": 1}
    torch.manual_seed(0)
    original = HybridLM(recipe_from_published(config).model).eval()
    for p in original.parameters():
        p.add_(0.1 * torch.randn_like(p))  # no zero output projections: every weight matters
    tensors = {published_name(name): value for name, value in original.state_dict().items()}
    tensors.update({f"transformer.h.{i}.attn.x_v": torch.zeros(64) for i in range(3)})
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "model.safetensors")
    _, loaded = load_published(tmp_path)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, original(ids).logits)


# ----------------------------------------------------------------------------- clear errors

@pytest.mark.parametrize("field, value", [
    ("token_mixer", "ovq"), ("token_mixer", "rwkv7"), ("use_skip_connections", 1), ("use_block_lambdas", 1),
    ("kvm_use_vlens", 0), ("kvm_apply_merge_gate_to_initial_state", 1), ("kvm_value_residual_mode", "linear"),
    ("state_budget_mode", "sqrt"), ("d_v_head", 64),
])
def test_unsupported_config_values_name_the_field(field, value, published_tiny):
    config = {**json.loads((published_tiny / "config.json").read_text()), field: value}
    with pytest.raises(PublishedCheckpointError, match=f"{field}={value!r}"):
        recipe_from_published(config)


def test_unknown_config_field_is_refused_but_hf_bookkeeping_is_not():
    with pytest.raises(PublishedCheckpointError, match="'kvm_new_knob' is not a field"):
        read_published_config({"model": {"kvm_new_knob": 1}})
    assert read_published_config({"architectures": ["RWKV7BackboneForCausalLM"], "chunk_len": 64})["chunk_len"] == 64


def copy_fixture(fixture: Path, tmp_path: Path, edit) -> Path:
    """The fixture's config.json plus its weights as changed by ``edit(tensors)``."""
    shutil.copy(fixture / "config.json", tmp_path / "config.json")
    tensors = load_file(fixture / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_weight(published_tiny, tmp_path):
    folder = copy_fixture(published_tiny, tmp_path, lambda t: t.pop("transformer.h.1.attn.ln_s_k.bias"))
    with pytest.raises(PublishedCheckpointError, match=r"missing weight.*'transformer\.h\.1\.attn\.ln_s_k\.bias'"):
        load_published(folder)


def test_extra_weight(published_tiny, tmp_path):
    extra = {"transformer.h.0.attn.lamb": torch.tensor(0.5)}
    folder = copy_fixture(published_tiny, tmp_path, lambda t: t.update(extra))
    with pytest.raises(PublishedCheckpointError, match=r"published checkpoint has 'transformer\.h\.0\.attn\.lamb' "
                                                       r".* which this loader does not map"):
        load_published(folder)


def test_shape_mismatch(published_tiny, tmp_path):
    wrong = {"transformer.h.0.attn.c_q.weight": torch.zeros(32, 64)}
    folder = copy_fixture(published_tiny, tmp_path, lambda t: t.update(wrong))
    with pytest.raises(PublishedCheckpointError,
                       match=r"shape mismatch: 'transformer\.h\.0\.attn\.c_q\.weight' is \[32, 64\]"):
        load_published(folder)


def test_pickled_weights_are_refused_with_the_conversion(published_tiny, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not read")
    with pytest.raises(PublishedCheckpointError, match="pickled checkpoints are not supported.*save_file"):
        load_published(tmp_path / "model.pt", config=published_tiny / "config.json")


def test_weights_file_with_separate_config(published_tiny):
    config = yaml.safe_load((published_tiny / "config.yaml").read_text())
    recipe, model = load_published(published_tiny / "model.safetensors", config=config)
    assert recipe.model == recipe_from_published(published_tiny / "config.json").model
    assert not model.training
