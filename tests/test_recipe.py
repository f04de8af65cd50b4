"""Recipes: the shipped YAML files, the layer-pattern grammar, ``extends:``, strict validation with
errors that name the file and the YAML path, the dict/YAML round trip, and the paper's parameter
counts (docs/kvm.md §2), which the models must reach exactly with the published block layout."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from hybrid.model.model import HybridLM
from hybrid.model.recipe import RECIPES_DIR, RecipeError, expand_pattern, load_recipe, recipe_from_dict

SHIPPED = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if not p.name.startswith("_"))
FRAGMENTS = sorted(RECIPES_DIR.rglob("_*.yaml"))  # shared backbones, extended by the recipes above

SMALL = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "layers": "GK",
                   "mixers": {"gla": {"num_heads": 2}, "kvm": {"num_heads": 2, "chunk_len": 8}}}}


def small(**model_changes) -> dict:
    data = copy.deepcopy(SMALL)
    data["model"].update(model_changes)
    return data


def write(folder: Path, name: str, data: dict | str) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def layer_names(recipe) -> list[str]:
    return [layer.name for layer in recipe.model.layers]


def load_error(tmp_path: Path, data: dict | str) -> str:
    """The message of the RecipeError raised by loading ``data`` from a file; it must name the file."""
    path = write(tmp_path, "recipe.yaml", data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    return message


# ----------------------------------------------------------------------------- shipped recipes

def test_recipes_are_shipped():
    kinds = {p.relative_to(RECIPES_DIR).parts[0] for p in SHIPPED}
    assert kinds == {"paper", "hybrids", "tiny", "recall"}
    assert len(list((RECIPES_DIR / "tiny").glob("*.yaml"))) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_shipped_recipe_loads_and_round_trips(path):
    recipe = load_recipe(path)
    assert path.read_text().startswith("#"), "every recipe opens with a comment saying what it is"
    assert len(recipe.model.layers) == recipe.model.n_layers
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.model == recipe.model
    assert again.model.fingerprint() == recipe.model.fingerprint()


def test_fragments_are_extended_and_not_standalone():
    texts = [p.read_text() for p in SHIPPED + FRAGMENTS]
    for fragment in FRAGMENTS:
        assert any(f"extends: {fragment.name}" in t or f"/{fragment.parent.name}/{fragment.name}" in t for t in texts)
        with pytest.raises(RecipeError, match="model.layers: missing"):
            load_recipe(fragment)


def test_paper_recipes_keep_the_published_knobs():
    fixed = load_recipe("paper/120m/kvm_fixed256").model
    kvm = fixed.layers[0].options
    assert (kvm.budget, kvm.state_min_len, kvm.max_state_chunks, kvm.chunk_len, kvm.n_bswa_chunks) == \
        ("fixed", 256, 1, 256, 2)
    assert (kvm.qk_norm, kvm.rope_style, kvm.rope_partial_dim, kvm.token_shift, kvm.value_residual) == \
        ("layernorm", "kvm_paper", 64, True, True)
    assert (fixed.block.norm, fixed.block.mlp, fixed.block.mlp_token_shift, fixed.init) == \
        ("layernorm", "relu2", True, "kvm_paper")
    assert fixed.embedding_norm and not fixed.tie_embeddings
    assert load_recipe("paper/350m/kvm_fixed256").model.block.residual_scale == 0.5

    sqrt = load_recipe("paper/120m/kvm_sqrt16").model.layers[0].options
    assert (sqrt.budget, sqrt.growth_factor, sqrt.growth_exponent, sqrt.state_min_len) == ("power_law", 16, 0.5, 256)

    hybrid = load_recipe("paper/120m/kvm_swa_saturate1024").model
    assert [layer.mixer for layer in hybrid.layers] == ["swa", "kvm"] * 6
    swa, kvm = hybrid.layers[0].options, hybrid.layers[1].options
    assert (swa.window, swa.rope_partial_dim) == (256, 128)
    assert swa.value_residual_group != kvm.value_residual_group  # v_first from layer 0 vs layer 1
    assert (kvm.budget, kvm.saturation_n, kvm.state_min_len) == ("saturation", 1024, 1)

    bswa = load_recipe("paper/120m/gptalpha_bswa").model.layers[0].options
    assert (bswa.chunk_len, bswa.n_bswa_chunks) == (256, 3)
    ablation = load_recipe("paper/120m/kvm_no_sink").model.layers[0].options
    assert ablation.sink_len == 0 and ablation.budget == "fixed"


# docs/kvm.md §2: the names 120M and 350M count the parameters without the head.
@pytest.mark.parametrize("name, millions", [("paper/120m/kvm_fixed256", 124.3), ("paper/350m/kvm_fixed256", 355.5)])
def test_paper_parameter_counts(name, millions):
    config = load_recipe(name).model
    with torch.device("meta"):
        model = HybridLM(config)
    assert round(model.num_parameters(include_head=False) / 1e6, 1) == millions
    # The published KVM layer adds 2H + 2d + D*H parameters to the full-attention baseline (docs/kvm.md §2).
    baseline = load_recipe(name.replace("kvm_fixed256", "gptalpha")).model
    with torch.device("meta"):
        extra = model.num_parameters() - HybridLM(baseline).num_parameters()
    heads, d_model = config.layers[0].options.num_heads, config.d_model
    assert extra == config.n_layers * (2 * heads + 2 * 128 + d_model * heads)


# ----------------------------------------------------------------------------- patterns and lists

@pytest.mark.parametrize("pattern, expected", [
    ("GGGK*3", list("GGGK" * 3)),
    ("A K*11", ["A"] + ["K"] * 11),
    ("(SK)*6", list("SK" * 6)),
    ("(SK)*2 A", list("SKSKA")),
    ("((GK)*2 S)*2", list("GKGKSGKGKS")),
    ("G * 2 K", list("GGK")),
    ("K", ["K"]),
])
def test_pattern_grammar(pattern, expected):
    assert expand_pattern(pattern) == expected


@pytest.mark.parametrize("pattern, problem", [
    ("GK*", "repeat count"),
    ("GK*0", "repeat count"),
    ("(GK", "missing ')'"),
    ("GK)", "unmatched ')'"),
    ("G-K", "unexpected '-'"),
    ("", "no layers"),
    ("()*3", "no layers"),
])
def test_bad_patterns(pattern, problem, tmp_path):
    message = load_error(tmp_path, small(layers=pattern))
    assert "model.layers" in message and problem in message


def test_explicit_layer_lists_take_names_and_symbols():
    recipe = recipe_from_dict(small(n_layers=4, layers=["gla", "K", "G", "kvm"]))
    assert layer_names(recipe) == ["gla", "kvm", "gla", "kvm"]
    assert [layer.mixer for layer in recipe.model.layers] == ["gla", "kvm", "gla", "kvm"]


def test_alias_with_its_own_symbol():
    data = small(n_layers=4, layers="GKGQ")
    data["model"]["mixers"]["kvm_sat"] = {"type": "kvm", "symbol": "Q", "num_heads": 2, "chunk_len": 8,
                                          "budget": "saturation", "saturation_n": 16}
    recipe = recipe_from_dict(data)
    assert layer_names(recipe) == ["gla", "kvm", "gla", "kvm_sat"]
    layers = recipe.model.layers
    assert layers[3].mixer == "kvm" and layers[3].options.budget == "saturation"
    assert layers[1].options.budget == "fixed"
    assert recipe.model.state_kinds == ["recurrent", "kvm", "recurrent", "kvm"]
    again = recipe_from_dict(recipe.to_dict())  # the expanded form lists names, so symbols do not matter
    assert again.model == recipe.model and again.model.fingerprint() == recipe.model.fingerprint()


def test_alias_sharing_a_used_symbol_is_an_error(tmp_path):
    data = small(layers="GK")
    data["model"]["mixers"]["kvm_sat"] = {"type": "kvm", "num_heads": 2, "chunk_len": 8}
    data["model"]["n_layers"], data["model"]["layers"] = 3, ["gla", "K", "kvm_sat"]
    message = load_error(tmp_path, data)
    assert "model.mixers.kvm_sat.symbol" in message and "its own 'symbol: X'" in message


# ----------------------------------------------------------------------------- extends

def test_extends_chain_deep_merges_and_null_resets(tmp_path):
    base = small()
    base["model"]["block"] = {"norm": "rmsnorm", "mlp": "swiglu"}
    base["model"]["mixers"]["kvm"]["sink_len"] = 2
    write(tmp_path, "base.yaml", base)
    write(tmp_path, "middle.yaml", {"extends": "base.yaml", "model": {"d_model": 64, "block": {"mlp": "gelu"},
                                                                      "mixers": {"kvm": {"chunk_len": 16}}}})
    sub = tmp_path / "sub"
    sub.mkdir()
    leaf = write(sub, "leaf.yaml", {"extends": "../middle.yaml",
                                    "model": {"block": {"norm": None}, "mixers": {"kvm": {"sink_len": None}}}})
    model = load_recipe(leaf).model
    assert model.d_model == 64  # from middle
    assert model.block.mlp == "gelu"  # middle over base
    assert model.block.norm == "layernorm"  # null: back to the default, not base's rmsnorm
    kvm = model.layers[1].options
    assert kvm.chunk_len == 16 and kvm.num_heads == 2  # merged across three files
    assert kvm.sink_len == 1  # null reset to KVMConfig's default


def test_extends_replaces_layers_and_drops_mixers_set_to_null(tmp_path):
    write(tmp_path, "base.yaml", small())
    leaf = write(tmp_path, "leaf.yaml", {"extends": "base.yaml", "model": {
        "layers": "SK", "mixers": {"gla": None, "swa": {"num_heads": 2, "window": 4}}}})
    assert layer_names(load_recipe(leaf)) == ["swa", "kvm"]


def test_extends_a_shipped_recipe_by_name(tmp_path):
    leaf = write(tmp_path, "leaf.yaml", {"extends": "tiny/kvm_fixed", "model": {"n_layers": 3, "layers": "K*3"}})
    model = load_recipe(leaf).model
    assert model.n_layers == 3 and model.layers[0].options.chunk_len == 8


def test_extends_loop(tmp_path):
    write(tmp_path, "a.yaml", {"extends": "b.yaml", **small()})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="loops back") as err:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(err.value) and "b.yaml" in str(err.value)


def test_extends_missing_target(tmp_path):
    leaf = write(tmp_path, "leaf.yaml", {"extends": "tiny/kvm_fixd"})
    with pytest.raises(RecipeError, match="not found") as err:
        load_recipe(leaf)
    assert "Did you mean 'tiny/kvm_fixed'?" in str(err.value)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="'paper/120m/kvm_fixed265' not found.*Did you mean 'paper/120m/kvm_fixed256'"):
        load_recipe("paper/120m/kvm_fixed265")


# ----------------------------------------------------------------------------- strict errors

@pytest.mark.parametrize("change, path, suggestion", [
    (lambda d: d.update(trian={}), "trian", "'train'"),
    (lambda d: d["model"].update(d_modle=64), "model.d_modle", "'d_model'"),
    (lambda d: d["model"].update(block={"norn": "rmsnorm"}), "model.block.norn", "'norm'"),
    (lambda d: d["model"]["mixers"]["kvm"].update(chunk_lenn=8), "model.mixers.kvm.chunk_lenn", "'chunk_len'"),
    (lambda d: d["model"]["mixers"].update(kvn={}), "model.mixers.kvn", "'kvm'"),
    (lambda d: d["model"].update(layers=["gla", "kvn"]), "model.layers[1]", "'kvm'"),
], ids=["top-level", "model", "block", "mixer-option", "mixer-name", "layer-list"])
def test_unknown_keys_and_names_suggest_the_right_one(change, path, suggestion, tmp_path):
    data = small()
    change(data)
    message = load_error(tmp_path, data)
    assert f"{path}:" in message and f"Did you mean {suggestion}?" in message


@pytest.mark.parametrize("change, expected", [
    (dict(layers="GX"), ["model.layers", "symbol 'X'", "G=gla", "K=kvm"]),
    (dict(layers="GKK"), ["model.layers", "expands to 3 layers", "n_layers is 2"]),
    (dict(n_layers=3), ["model.layers", "expands to 2 layers", "n_layers is 3"]),
    (dict(layers="GG"), ["model.mixers.kvm", "no layer uses it"]),
    (dict(d_model="64"), ["model.d_model", "must be int", "'64' (str)"]),
    (dict(vocab_size=True), ["model.vocab_size", "must be int", "True (bool)"]),
    (dict(init="xavier"), ["model.init", "'kvm_paper', 'normal'"]),
    (dict(block={"norm": "batchnorm"}), ["model.block.norm", "'layernorm', 'rmsnorm'"]),
    (dict(block={"residual_scale": 0}), ["model.block.residual_scale", "must be > 0"]),
])
def test_bad_model_values(change, expected, tmp_path):
    message = load_error(tmp_path, small(**change))
    for part in expected:
        assert part in message


@pytest.mark.parametrize("option, value, expected", [
    ("chunk_len", -4, "model.mixers.kvm.chunk_len: must be an integer > 0, got -4"),
    ("chunk_len", "256", "model.mixers.kvm.chunk_len: must be int, got '256' (str)"),
    ("chunk_len", True, "model.mixers.kvm.chunk_len: must be int, got True (bool)"),
    ("sink_len", 8, "model.mixers.kvm.sink_len: must be in [0, chunk_len=8)"),
    ("budget", "linear", "model.mixers.kvm.budget: must be one of 'fixed', 'power_law', 'saturation'"),
    ("use_vlens", "yes", "model.mixers.kvm.use_vlens: must be bool"),
    ("growth_factor", "2", "model.mixers.kvm.growth_factor: must be float"),
    ("num_heads", None, "model.mixers.kvm.num_heads: must be set"),
])
def test_bad_mixer_values(option, value, expected, tmp_path):
    data = small()
    data["model"]["mixers"]["kvm"][option] = value
    assert expected in load_error(tmp_path, data)


def test_mixer_rules_that_span_options(tmp_path):
    data = small()
    data["model"]["mixers"]["kvm"]["budget"] = "saturation"
    assert "model.mixers.kvm.saturation_n: the saturation budget needs saturation_n > 0" in load_error(tmp_path, data)


def test_tuple_options_are_checked_and_round_trip():
    data = small(layers="MK")
    data["model"]["mixers"] = {"mamba2": {"head_dim": 8, "state_size": 8, "A_init_range": [1, 4]},
                               "kvm": {"num_heads": 2, "chunk_len": 8}}
    recipe = recipe_from_dict(data)
    assert recipe.model.layers[0].options.A_init_range == (1.0, 4.0)
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())).model == recipe.model
    data["model"]["mixers"]["mamba2"]["A_init_range"] = [1, 4, 8]
    with pytest.raises(RecipeError, match=r"model.mixers.mamba2.A_init_range: must be a list of 2 values"):
        recipe_from_dict(data)
    data["model"]["mixers"]["mamba2"]["A_init_range"] = [1, "x"]
    with pytest.raises(RecipeError, match=r"model.mixers.mamba2.A_init_range\[1\]: must be float"):
        recipe_from_dict(data)


@pytest.mark.parametrize("text, expected", [
    ("model: {vocab_size: [1, 2}\n", "not valid YAML"),
    ("model:\n  d_model: 4\n   n_layers: 2\n", "not valid YAML"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    ("tokenizer: {type: bytes}\n", "model: missing"),
    ("model: 3\n", "model: must be a mapping"),
])
def test_unreadable_recipes(text, expected, tmp_path):
    assert expected in load_error(tmp_path, text)


def test_empty_mixers_and_layers(tmp_path):
    assert "model.mixers: must map" in load_error(tmp_path, small(mixers={}))
    assert "model.layers: must be a pattern string" in load_error(tmp_path, small(layers=[]))


# ----------------------------------------------------------------------------- round trip and fingerprint

def test_round_trip_and_fingerprint():
    data = small(n_layers=4, layers="(GK)*2", block={"mlp": "swiglu", "norm": "rmsnorm"}, logit_softcap=30)
    data["train"] = {"lr": 1e-3}
    recipe = recipe_from_dict(data)
    expanded = recipe.to_dict()
    assert expanded["model"]["layers"] == ["gla", "kvm", "gla", "kvm"]
    assert expanded["train"] == {"lr": 1e-3} and expanded["tokenizer"] == {"type": "bytes"}
    again = recipe_from_dict(expanded)
    assert again.model == recipe.model
    assert again.model.fingerprint() == recipe.model.fingerprint()
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())).model.fingerprint() == recipe.model.fingerprint()

    # Writing a float option as an int does not change the architecture, nor its fingerprint.
    floats = small()
    floats["model"]["mixers"]["gla"]["gate_logit_normalizer"] = 16
    assert recipe_from_dict(floats).model.fingerprint() == recipe_from_dict(small()).model.fingerprint()
    # Any architectural change does.
    other = small()
    other["model"]["mixers"]["kvm"]["chunk_len"] = 16
    assert recipe_from_dict(other).model.fingerprint() != recipe_from_dict(small()).model.fingerprint()


def test_configs_are_frozen():
    model = recipe_from_dict(small()).model
    with pytest.raises(AttributeError):
        model.d_model = 64
    with pytest.raises(AttributeError):
        model.layers[1].options.chunk_len = 4


def test_recipe_from_dict_refuses_unresolved_extends():
    with pytest.raises(RecipeError, match="extends: is resolved when a recipe file is read"):
        recipe_from_dict({"extends": "tiny/kvm_fixed", **small()})


# ----------------------------------------------------------------------------- strict reading, numbers, sizes

@pytest.mark.parametrize("text, expected", [
    ("model:\n  d_model: 32\nmodel:\n  d_model: 64\n", "key 'model' appears twice in one mapping, on lines 1 and 3"),
    ("model: {vocab_size: 256, vocab_size: 512}\n", "key 'vocab_size' appears twice in one mapping, on lines 1 and 1"),
    ("model:\n  mixers:\n    kvm: {}\n    kvm: {}\n", "key 'kvm' appears twice in one mapping, on lines 3 and 4"),
    ("model: " + "[" * 5000, "nested too deeply"),
])
def test_a_key_written_twice_is_an_error_naming_both_lines(text, expected, tmp_path):
    message = load_error(tmp_path, text)
    assert expected in message and "\n" not in message


def test_a_merge_key_may_still_be_overridden(tmp_path):
    """YAML's ``<<: *anchor`` brings keys in that the mapping may then override: not a duplicate."""
    path = write(tmp_path, "merge.yaml", "model:\n  vocab_size: 256\n  d_model: 32\n  n_layers: 2\n  layers: GK\n"
                                        "  mixers:\n    gla: &heads {num_heads: 2}\n"
                                        "    kvm:\n      <<: *heads\n      chunk_len: 8\n      num_heads: 4\n")
    recipe = load_recipe(path)
    assert recipe.model.layers[0].options.num_heads == 2 and recipe.model.layers[1].options.num_heads == 4


@pytest.mark.parametrize("change, expected", [
    ({"block": {"mlp_expansion": float("inf")}}, "model.block.mlp_expansion: must be a finite number, got inf"),
    ({"block": {"residual_scale": float("inf")}}, "model.block.residual_scale: must be a finite number"),
    ({"init_std": float("nan")}, "model.init_std: must be a finite number, got nan"),
    ({"logit_softcap": -float("inf")}, "model.logit_softcap: must be a finite number"),
    ({"block": {"mlp_expansion": 10 ** 400}}, "model.block.mlp_expansion: must be a finite number"),
    ({"d_model": 2 ** 64}, "model.d_model: 18446744073709551616 does not fit in 64 bits"),
    ({"mixers": {"gla": {"num_heads": 2}, "kvm": {"num_heads": 2, "chunk_len": 8, "state_min_len": -5}}},
     "model.mixers.kvm.state_min_len: must be >= 0, got -5"),
    ({"mixers": {"gla": {"num_heads": 2}, 1: {"num_heads": 2}}}, "model.mixers.1: a mixer entry is named by text"),
])
def test_every_number_is_finite_and_in_range_where_it_is_read(change, expected, tmp_path):
    message = load_error(tmp_path, small(**change))
    assert expected in message


def test_an_infinite_default_may_stay_infinite():
    """Mamba2's dt_limit defaults to (0, inf): a recipe may write that, and a checkpoint's expanded
    recipe does (yaml writes .inf)."""
    data = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "layers": "M",
                      "mixers": {"mamba2": {"head_dim": 16, "state_size": 8, "dt_limit": [0.0, float("inf")]}}}}
    recipe = recipe_from_dict(data)
    assert recipe.model.layers[0].options.dt_limit == (0.0, float("inf"))
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())).model == recipe.model
    data["model"]["mixers"]["mamba2"]["dt_limit"] = [float("nan"), 1.0]
    with pytest.raises(RecipeError, match=r"dt_limit\[0\]: must be a finite number, got nan"):
        recipe_from_dict(data)


@pytest.mark.parametrize("change, expected", [
    ({"layers": "G*99999999999"}, "'*99999999999' makes more than the 4096 layers a model may have"),
    ({"layers": "G*" + "9" * 5000}, "makes more than the 4096 layers"),
    ({"layers": "(GK*64)*64"}, "makes more than the 4096 layers"),
    ({"n_layers": 5000}, "model.n_layers: must be at most 4096"),
    ({"vocab_size": 10 ** 12}, "the weights would need 238,418.6 GiB in fp32 (embedding (vocab_size 1000000000000 x "
                               "d_model 32) 119,209.3 GiB, untied head"),
    ({"d_model": 10 ** 8}, "the weights would need"),
    ({"mixers": {"gla": {"num_heads": 2}, "kvm": {"num_heads": 2, "chunk_len": 10 ** 12}}},
     "model.mixers.kvm.chunk_len: chunk_len 1000000000000 x n_bswa_chunks 2 is a window of 2,000,000,000,000 tokens, "
     "longer than any context (at most 16,777,216)"),
])
def test_sizes_are_checked_before_anything_is_allocated(change, expected, tmp_path, monkeypatch):
    monkeypatch.setattr("hybrid.model.limits.memory_bytes", lambda: 64 * 2 ** 30)  # the same on any machine
    if "vocab_size" in change:
        change = {**change, "tie_embeddings": False}
    message = load_error(tmp_path, small(**change))
    assert expected in message
    if "GiB" in expected:
        assert "more than this machine's 64.0 GiB of memory; choose smaller sizes" in message


@pytest.mark.parametrize("extends, expected", [
    ("", "extends: '' is not a recipe path or name"),
    ("a\0b", "is not a recipe path or name"),
    ("x" * 5000, "not found"),
])
def test_bad_extends_values(extends, expected, tmp_path):
    assert expected in load_error(tmp_path, {"extends": extends, **SMALL})


def test_a_recipe_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(SMALL).encode() + b"# caf\xe9\n")
    with pytest.raises(RecipeError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset \d+, line \d+\)"):
        load_recipe(path)


def test_the_tokenizer_section_is_checked_when_the_recipe_is_read(tmp_path):
    assert "tokenizer.colour: unknown key for a 'bytes' tokenizer" in load_error(
        tmp_path, {**SMALL, "tokenizer": {"type": "bytes", "colour": "red"}})
    message = load_error(tmp_path, {**SMALL, "tokenizer": {"type": [1]}})
    assert "tokenizer.type: '[1]' is not a tokenizer type" in message
    assert "tokenizer.path: a 'file' tokenizer needs the path" in load_error(
        tmp_path, {**SMALL, "tokenizer": {"type": "file", "path": ""}})


@pytest.mark.parametrize("layers, mixers, expected", [
    ("K", {"kvm": {"num_heads": 2, "head_dim": 5}},
     "model.mixers.kvm.rope_partial_dim: RoPE rotates pairs of dims, and it is null: all 5 dims of an odd head_dim"),
    ("R", {"rwkv7": {"head_dim": 1}}, "model.mixers.rwkv7.head_dim: the output GroupNorm needs at least 2 values"),
    ("RR", {"rwkv7": {"head_dim": 16, "v_first_source": False}},
     "model.mixers.rwkv7.v_first_source: the first RWKV-7 layer starts the v_first stream"),
    ("D", {"gated_deltanet": {"head_dim": 16, "num_heads": 2, "expand_v": 1e30}},
     "model.mixers.gated_deltanet.expand_v: 1e+30 makes sizes beyond what torch can hold"),
    ("G", {"gla": {"num_heads": 2, "expand_k": 1e6}},  # 4 GB of weights, but a state and activations far beyond
     "model.mixers.gla: its weight q_proj.weight (32000000, 32) is wider than any layer may be"),
    ("G", {"gla": {"num_heads": 2}}, "model.block: an MLP hidden layer 32,000,000 wide is wider than any layer"),
])
def test_options_that_would_fail_in_the_forward_are_refused_when_read(layers, mixers, expected):
    """Rules the layers only met when they ran (or when torch allocated) are checked with the recipe."""
    data = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": len(layers), "layers": layers, "mixers": mixers,
                      "block": {"mlp_expansion": 1e6 if "MLP" in expected else 4.0}}}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert expected in str(err.value)


def test_the_memory_estimate_counts_the_recurrent_state(monkeypatch):
    """Small weights, but a Gated DeltaNet state of 1000 heads of 1000 x 2000 values: 7.5 GiB a layer."""
    monkeypatch.setattr("hybrid.model.limits.memory_bytes", lambda: 12 * 2 ** 30)
    data = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "layers": "D",
                      "mixers": {"gated_deltanet": {"head_dim": 1000, "num_heads": 2, "num_v_heads": 1000}}}}
    assert recipe_from_dict(data).model.n_layers == 1
    data["model"].update(n_layers=2, layers="DD")
    with pytest.raises(RecipeError, match=r"and the decode state at batch 1 15\.0 GiB: more than this machine's "
                                          r"12\.0 GiB of memory"):
        recipe_from_dict(data)
