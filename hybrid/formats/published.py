"""Load checkpoints of the published KVM code (recursal/KVM-paper, v1) into a ``Recipe`` + ``HybridLM``.

The paper's models were trained with ``model.rwkv7_backbone.RWKV7BackboneForCausalLM`` (written against
commit ``1932b9ca``, see ``PUBLISHED_COMMIT``). A checkpoint folder holds ``config.json`` (the flat
``MixerConfigDataclass`` fields, possibly with Hugging Face bookkeeping keys) or ``config.yaml`` (a
``model:`` section listing the fields that were set; the others keep their defaults), and ``model.safetensors``
(or a sharded ``model.safetensors.index.json``)::

    recipe, model = load_published("path/to/checkpoint", compat=True)
    logits, state = model(tokens)

What the translation does (``recipe_from_published``): every published field either maps to a recipe
option, is a documented no-op at inference (listed below), or, for a value this toolkit does not
reproduce exactly (OVQ / RWKV-7 / LaCT mixers, U-Net skips, block lambdas, the buggy no-vlens path,
...), raises ``PublishedCheckpointError`` naming the field and the value. A field that is not in the
published dataclass is refused too (Hugging Face bookkeeping keys excepted).

Fields that do not change the inference math, so they are read and ignored: ``mup_base_dim`` (learning
rates only), ``use_l2wrap`` (training loss only), ``param_dtype`` (never read by the model code; pick
``dtype=`` when loading), ``use_overflow_v_key_weighting`` / ``use_state_deltarule`` /
``use_state_decay`` (never read by the KVM mixer), and the ``ovq_*``, ``kda_*``, ``gated_deltanet_*``,
``lact_*`` families (read only by mixers that are refused when ``token_mixer`` names them).
``alt_layer_every <= 1`` builds no alternate layer (and then every layer takes ``v_first`` from layer 0).

Traps, each handled here and worth knowing when reading published configs:

* Layer layout: layer ``i`` is the *alt* mixer iff ``alt_layer_every > 1 and i % alt_layer_every == 0``
  (so layer 0 is alt in the hybrids); alt layers use ``alt_rope_partial_dim`` / ``alt_rope_theta``.
* Value residual: ``v_first`` is the first main layer's ``c_v(ln_attn(x0))`` on the embedding stream
  (layer 1 in a hybrid), alt layers take theirs from layer 0, ``alt_share_v0=1`` gives everyone
  layer 0's. Our model computes exactly that per value-residual group (hybrid/model/model.py), so the two
  families simply get two groups (one when shared).
* KVM zeroes ``rope_partial_dim`` key dims (all of them when it is 0) before ``ln_s_k``, taken from the
  *main* RoPE setting even in an alt layer (docs/kvm.md §10, B4): passed explicitly as ``state_key_zero_dims``.
* Budget: the published ``kvm_saturation`` is our ``saturation``; ``state_min_len=-1`` (the default,
  "never grow" for ``fixed``) is our 0; ``n_max_d_chunks`` is ``max_state_chunks`` (<= 0: never grows).
* ``swa_window_size <= 0`` means ``chunk_len``; ``residual_scale`` None (or 0) means 1;
  ``logit_softcap`` 0 means none; MLP hidden size is ``int(ffn_expansion * D) // 32 * 32``; the
  value-residual LoRA rank is ``max(32, round(1.3 * sqrt(D) / 32) * 32)``; the head is never tied.
* bf16 roundings: the published math rounds RoPE cos/sin to bf16 and KVM state values to bf16 at
  read, even in fp32 runs (docs/kvm.md §10, B6). ``compat=True`` reproduces both (``rope_round_bf16``,
  ``bf16_state_values``); the released checkpoints were trained with them, so use it to match their
  numbers. The default (off) is the clean fp32 math; on the tiny fixture it moves logits by ~0.04
  because three winner-take-all merges flip.
* Weights: renamed (``c_q`` -> ``q_proj`` etc., ``_BLOCK_NAMES``), ``[1, 1, D]`` mixes squeezed to
  ``[D]``, checked strictly (missing, unexpected, mis-shaped names are all reported at once). The
  zero ``attn.x_v`` the published code creates when value residual is on but attention token shift
  is off is unused by its math and skipped. Only safetensors are read: pickled ``.pt``/``.bin``
  files are refused (unpickling runs arbitrary code), with the one-line conversion in the message.
* Tokenizer: the paper's models use GPT-2 BPE (vocab padded to 50304); pass its ``tokenizer.json``
  (or put one in the checkpoint folder) so the recipe's ``tokenizer:`` section points at it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from blocks.errors import InputError
from blocks.registry import get_mixer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, RecipeError, recipe_from_dict

PUBLISHED_COMMIT = "1932b9ca449c99be1067a6014c72892e377563ab"
MODEL_CLASS_PATH = "model.rwkv7_backbone.RWKV7BackboneForCausalLM"


class PublishedCheckpointError(InputError):
    """A published checkpoint or config this loader cannot reproduce; the message names the field or
    weight and what to do."""


# ----------------------------------------------------------------------------- the published config

# ``MixerConfigDataclass`` (model/rwkv7_backbone.py at PUBLISHED_COMMIT): field -> (type, default).
_FIELDS: dict[str, tuple[str, Any]] = {
    "model_class_path": ("str", MODEL_CLASS_PATH),
    "vocab_size": ("int", 50304),
    "num_hidden_layers": ("int", 12),
    "num_attention_heads": ("int", 6),
    "d_qk_head": ("int?", None),
    "d_v_head": ("int?", None),
    "d_head": ("int?", None),
    "hidden_size": ("int", 768),
    "mup_base_dim": ("int", 768),
    "rope_theta": ("float", 10000.0),
    "rope_partial_dim": ("int", 64),
    "alt_rope_theta": ("float", 10000.0),
    "alt_rope_partial_dim": ("int", 64),
    "alt_share_v0": ("int", 0),
    "ffn_expansion": ("float", 4.0),
    "token_mixer": ("str", "rwkv7"),
    "token_mixer_class_path": ("str?", None),
    "alt_token_mixer": ("str", "swa"),
    "alt_token_mixer_class_path": ("str?", None),
    "alt_layer_every": ("int", -1),
    "use_tokenshift_ffn": ("int", 0),
    "use_block_lambdas": ("int", 0),
    "use_skip_connections": ("int", 0),
    "use_l2wrap": ("int", 0),
    "logit_softcap": ("float", 0.0),
    "residual_scale": ("float?", None),
    "use_value_residual": ("int", 1),
    "gptalpha_value_residual_mode": ("str", "rwkv"),
    "gptalpha_token_shift_mode": ("str", "rwkv"),
    "kvm_value_residual_mode": ("str", "rwkv"),
    "kvm_token_shift_mode": ("str", "rwkv"),
    "kvm_apply_merge_gate_to_initial_state": ("int", 0),
    "kvm_apply_merge_gate_to_appends": ("int", 1),
    "kvm_use_merge_gate_keys": ("int", 1),
    "kvm_use_merge_gate_values": ("int", 1),
    "kvm_use_head_temps": ("int", 1),
    "kvm_use_vlens": ("int", 1),
    "ovq_value_residual_mode": ("str", "rwkv"),
    "ovq_token_shift_mode": ("str", "rwkv"),
    "use_tokenshift_att": ("int", 0),
    "swa_value_residual_mode": ("str", "rwkv"),
    "swa_token_shift_mode": ("str", "rwkv"),
    "swa_window_size": ("int", -1),
    "ovq_window_size": ("int", 128),
    "ovq_chunk_size": ("int", 128),
    "ovq_max_centroids": ("int", 2048),
    "ovq_normalize_centroids": ("int", 0),
    "ovq_use_min_state_size": ("int", 0),
    "ovq_use_counts_for_lr_only": ("int", 0),
    "ovq_use_delta_rule": ("int", 0),
    "kda_expand_k": ("float", 1.0),
    "kda_expand_v": ("float", 1.0),
    "kda_conv_size": ("int", 4),
    "kda_conv_bias": ("int", 0),
    "kda_allow_neg_eigval": ("int", 0),
    "kda_token_shift_mode": ("str", "none"),
    "kda_value_residual_mode": ("str", "none"),
    "gated_deltanet_expand_k": ("float", 0.75),
    "gated_deltanet_expand_v": ("float", 1.5),
    "gated_deltanet_num_kv_heads": ("int?", None),
    "gated_deltanet_conv_size": ("int", 4),
    "gated_deltanet_conv_bias": ("int", 0),
    "gated_deltanet_use_mamba_gate": ("int", 1),
    "gated_deltanet_token_shift_mode": ("str", "none"),
    "gated_deltanet_value_residual_mode": ("str", "none"),
    "sink_len": ("int", 1),
    "chunk_len": ("int", 256),
    "n_max_d_chunks": ("int", 1),
    "n_bswa_chunks": ("int", 2),
    "state_budget_mode": ("str", "fixed"),
    "state_growth_factor": ("float", 1.0),
    "state_growth_exponent": ("float", 0.5),
    "state_round_down": ("int", 1),
    "state_min_len": ("int", -1),
    "state_saturation_n": ("int?", None),
    "use_overflow_v_key_weighting": ("int", 1),
    "use_state_deltarule": ("int", 0),
    "use_state_decay": ("int", 0),
    "lact_value_residual_mode": ("str", "rwkv"),
    "lact_token_shift_mode": ("str", "rwkv"),
    "lact_actual_rope_partial_dim": ("int", -1),
    "lact_lact_window_size": ("int", -1),
    "lact_chunk_size": ("int", -1),
    "lact_num_fw_heads": ("int", -1),
    "lact_inter_multi": ("float", 1.0),
    "lact_norm_eps": ("float", 1e-6),
    "lact_attn_qk_norm": ("int", 0),
    "lact_w0_w2_low_rank": ("int", 32),
    "lact_fw_init_gain": ("float", 0.5),
    "lact_ttt_lag": ("int", 0),
    "lact_factor": ("float", 1.0),
    "lact_use_muon": ("int", 0),
    "lact_learnable_muon_lr": ("int", 0),
    "lact_muon_lr_reduce_exp": ("int", 2),
    "lact_use_momentum": ("int", 1),
    "lact_ttt_prenorm": ("int", 0),
    "lact_ttt_nope": ("int", 0),
    "lact_no_v_silu": ("int", 0),
    "lact_use_bswa": ("int", 0),
    "param_dtype": ("str?", "bfloat16"),
}

# Keys Hugging Face's PretrainedConfig writes next to the model fields in an exported config.json; the
# published model reads none of them (its lm_head is never tied, whatever tie_word_embeddings says).
_HF_BOOKKEEPING = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "tie_worhidden_sizedings",
    "max_position_embeddings", "use_cache", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "is_encoder_decoder", "is_decoder", "id2label", "label2id",
})

# Published mixer name -> (our registry name, prefix of its *_value_residual_mode / *_token_shift_mode).
_MIXERS = {"kvm": ("kvm", "kvm"), "gptalpha": ("attention", "gptalpha"),
           "gptalpha_bswa": ("bswa", "gptalpha"), "swa": ("swa", "swa")}
_BUDGETS = {"fixed": "fixed", "power_law": "power_law", "kvm_saturation": "saturation"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that, like the published config.py, reads ``1e-3`` (no dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def read_published_config(source: str | Path | dict) -> dict[str, Any]:
    """A published config (config.json, a YAML with a ``model:`` section, or a dict of either shape)
    -> every ``MixerConfigDataclass`` field, defaults filled in and types checked."""
    where = "published config"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise PublishedCheckpointError(f"no published config at {path}")
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.load(path.read_text(), _Loader)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise PublishedCheckpointError(f"{path}: not a readable config file: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # the published YAML layout (other sections are training settings)
    if not isinstance(data, dict):
        raise PublishedCheckpointError(f"{where}: expected a mapping of MixerConfigDataclass fields")
    config = {name: default for name, (_, default) in _FIELDS.items()}
    for key, value in data.items():
        if key in _HF_BOOKKEEPING:
            continue
        if key not in _FIELDS:
            raise PublishedCheckpointError(
                f"{where}: {key!r} is not a field of the published MixerConfigDataclass (commit "
                f"{PUBLISHED_COMMIT[:8]}); a config from another version of the code? This loader does not "
                "guess what it means")
        config[key] = _check_type(key, value, _FIELDS[key][0], where)
    return config


def _check_type(key: str, value: Any, kind: str, where: str) -> Any:
    if value is None and kind.endswith("?"):
        return None
    base = kind.rstrip("?")
    if base == "str" and isinstance(value, str):
        return value
    if base == "int" and isinstance(value, int | float) and float(value).is_integer():
        return int(value)
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise PublishedCheckpointError(f"{where}: {key} must be {kind.replace('?', ' or null')}, got {value!r}")


# ----------------------------------------------------------------------------- config -> recipe

def recipe_from_published(source: str | Path | dict, *, compat: bool = False,
                          tokenizer: dict | None = None) -> Recipe:
    """The recipe of the model a published config describes (see the module docstring).

    ``compat``: reproduce the published bf16 roundings of RoPE cos/sin and KVM state values.
    ``tokenizer``: the recipe's ``tokenizer:`` section (default: the recipe default)."""
    cfg = read_published_config(source)

    def unsupported(field: str, why: str) -> PublishedCheckpointError:
        return PublishedCheckpointError(f"published config {field}={cfg[field]!r} is not supported: {why}")

    if cfg["model_class_path"] != MODEL_CLASS_PATH:
        raise unsupported("model_class_path", f"this loader reads {MODEL_CLASS_PATH} checkpoints only")
    for field in ("use_skip_connections", "use_block_lambdas"):
        if cfg[field]:
            raise unsupported(field, "the U-Net skips / block lambdas are not part of our backbone "
                                     "(no paper config uses them)")
    n_layers, d_model, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    for field in ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size"):
        if cfg[field] <= 0:
            raise unsupported(field, "must be > 0")
    d_qk = cfg["d_qk_head"] or cfg["d_head"] or d_model // heads
    d_v = cfg["d_v_head"] or cfg["d_head"] or d_model // heads
    if d_qk != d_v:
        raise unsupported("d_v_head", f"our projections use one head dim for q, k and v (d_qk_head is {d_qk})")

    alt_every = cfg["alt_layer_every"] if cfg["alt_layer_every"] > 1 else 0
    if alt_every and n_layers < 2:
        raise unsupported("alt_layer_every", "the published code needs >= 2 layers with alternate layers")
    mixers: dict[str, dict] = {}
    layers: list[str] = []
    main_name = _layer_mixer(cfg, "token_mixer", compat, cfg["rope_partial_dim"], cfg["rope_theta"],
                             group="published_v_first", mixers=mixers)
    alt_name = None
    if alt_every:
        group = "published_v_first" if cfg["alt_share_v0"] else "published_alt_v_first"
        alt_name = _layer_mixer(cfg, "alt_token_mixer", compat, cfg["alt_rope_partial_dim"], cfg["alt_rope_theta"],
                                group=group, mixers=mixers)
    for i in range(n_layers):
        layers.append(alt_name if alt_every and i % alt_every == 0 else main_name)

    hidden = int(cfg["ffn_expansion"] * d_model) // 32 * 32
    if hidden <= 0:
        raise unsupported("ffn_expansion", f"gives an MLP hidden size of {hidden}")
    model = {
        "vocab_size": cfg["vocab_size"], "d_model": d_model, "n_layers": n_layers, "layers": layers,
        "mixers": mixers,
        "block": {"norm": "layernorm", "norm_eps": 1e-5, "norm_bias": True, "mlp": "relu2", "mlp_hidden": hidden,
                  "mlp_bias": False, "mlp_token_shift": bool(cfg["use_tokenshift_ffn"]),
                  "residual_scale": cfg["residual_scale"] or 1.0},  # `or`: the published code treats 0 as 1 too
        "embedding_norm": True, "tie_embeddings": False,
        # c * tanh(x / c) is the same function for c and -c
        "logit_softcap": abs(cfg["logit_softcap"]) if cfg["logit_softcap"] else None,
        "init": "kvm_paper",
    }
    data: dict[str, Any] = {"model": model}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    try:
        return recipe_from_dict(data, source=f"published config (KVM-paper {PUBLISHED_COMMIT[:8]})")
    except RecipeError as err:
        raise PublishedCheckpointError(f"the published config translates to an invalid recipe: {err}") from None


def _layer_mixer(cfg: dict, field: str, compat: bool, rope_dim: int, rope_theta: float, group: str,
                 mixers: dict[str, dict]) -> str:
    """Add the recipe mixer entry for ``cfg[field]`` (token_mixer or alt_token_mixer); return its name."""
    published = cfg[field]
    if cfg[f"{field}_class_path"] is not None:
        raise PublishedCheckpointError(f"published config {field}_class_path={cfg[f'{field}_class_path']!r} "
                                       "is not supported: only the built-in mixers (kvm, gptalpha, "
                                       "gptalpha_bswa, swa) are translated")
    if published not in _MIXERS:
        raise PublishedCheckpointError(
            f"published config {field}={published!r} is not supported: this loader translates "
            f"{', '.join(_MIXERS)} (the published rwkv7/ovq/kda/lact/gated_deltanet mixers have no exact "
            "counterpart here)")
    registry, prefix = _MIXERS[published]
    d_model, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg["d_qk_head"] or cfg["d_head"] or d_model // heads
    if not 0 <= rope_dim <= head_dim:
        rope_field = "rope_partial_dim" if field == "token_mixer" else "alt_rope_partial_dim"
        raise PublishedCheckpointError(f"published config {rope_field}={rope_dim!r} is not supported: it must be in "
                                       f"[0, head dim {head_dim}] (the published RoPE fails otherwise)")
    options: dict[str, Any] = {
        "type": registry, "num_heads": heads, "head_dim": head_dim, "qk_norm": "layernorm", "norm_eps": 1e-5,
        "rope_partial_dim": rope_dim, "rope_theta": rope_theta, "rope_style": "kvm_paper", "rope_round_bf16": compat,
    }
    shift_mode = cfg[f"{prefix}_token_shift_mode"]
    if shift_mode not in ("rwkv", "none"):
        raise PublishedCheckpointError(f"published config {prefix}_token_shift_mode={shift_mode!r} is not "
                                       "supported: 'rwkv' (shift the projected q/k/v) or 'none'")
    options["token_shift"] = bool(cfg["use_tokenshift_att"]) and shift_mode == "rwkv"
    if cfg["use_value_residual"]:
        mode = cfg[f"{prefix}_value_residual_mode"]
        if mode != "rwkv":
            raise PublishedCheckpointError(f"published config {prefix}_value_residual_mode={mode!r} is not "
                                           "supported: only 'rwkv' (v + (v_first - v) * sigmoid(gate)) is")
        options.update(value_residual=True, value_residual_group=group,
                       value_residual_rank=max(32, int(round(1.3 * d_model ** 0.5 / 32) * 32)))
    if published == "kvm":
        options.update(_kvm_options(cfg, head_dim, compat))
    elif published == "swa":
        options["window"] = cfg["swa_window_size"] if cfg["swa_window_size"] > 0 else cfg["chunk_len"]
    elif published == "gptalpha_bswa":
        if cfg["sink_len"]:
            raise PublishedCheckpointError(
                f"published config sink_len={cfg['sink_len']!r} is not supported with {field}=gptalpha_bswa: "
                "mapping it to our bswa's sink_len is not yet checked against the published code (the paper's BSWA "
                "config sets sink_len: 0)")
        options.update(chunk_len=cfg["chunk_len"], n_bswa_chunks=cfg["n_bswa_chunks"])
    name = published if field == "token_mixer" else f"alt_{published}"
    if any(entry["type"] == registry for entry in mixers.values()):  # alt and main of one kind: own letter
        options["symbol"] = get_mixer(registry).symbol.lower()
    mixers[name] = options
    return name


def _kvm_options(cfg: dict, head_dim: int, compat: bool) -> dict[str, Any]:
    if cfg["kvm_use_vlens"] == 0:
        raise PublishedCheckpointError(
            "published config kvm_use_vlens=0 is not supported: the published no-vlens path adds one to every "
            "slot per merge round (or crashes when the state grows, docs/kvm.md §10, B2); our count averaging "
            "divides each slot by its own count, so the logits would differ")
    if cfg["kvm_apply_merge_gate_to_initial_state"]:
        raise PublishedCheckpointError(
            "published config kvm_apply_merge_gate_to_initial_state=1 is not supported: the published code gates "
            "the first chunk in prefill but not in decode (docs/kvm.md §10, B3), which has no consistent equivalent "
            "here")
    mode = cfg["state_budget_mode"]
    if mode not in _BUDGETS:
        raise PublishedCheckpointError(f"published config state_budget_mode={mode!r} is not supported: "
                                       f"expected one of {', '.join(_BUDGETS)}")
    options: dict[str, Any] = {
        "chunk_len": cfg["chunk_len"], "n_bswa_chunks": cfg["n_bswa_chunks"], "sink_len": cfg["sink_len"],
        "budget": _BUDGETS[mode], "state_min_len": max(cfg["state_min_len"], 0),  # -1: no lower bound
        "round_down": max(cfg["state_round_down"], 1),  # the published rounding clamps it to >= 1
        "max_state_chunks": cfg["n_max_d_chunks"],
        "use_vlens": True, "use_head_temps": bool(cfg["kvm_use_head_temps"]),
        "merge_gate_keys": bool(cfg["kvm_use_merge_gate_keys"]),
        "merge_gate_values": bool(cfg["kvm_use_merge_gate_values"]),
        "merge_gate_appends": bool(cfg["kvm_apply_merge_gate_to_appends"]),
        "merge_gate_initial_state": False,
        # docs/kvm.md §10, B4: the zeroed dims follow the *main* rope_partial_dim (0: all), even in an alt layer.
        "state_key_zero_dims": cfg["rope_partial_dim"] if cfg["rope_partial_dim"] > 0 else head_dim,
        "bf16_state_values": compat,
    }
    if cfg["n_max_d_chunks"] <= 0:  # a cap of <= 0 slots: the state never grows past the first chunk
        options.update(budget="fixed", state_min_len=0, max_state_chunks=None)
    elif mode == "power_law":
        options.update(growth_factor=cfg["state_growth_factor"], growth_exponent=cfg["state_growth_exponent"])
    elif mode == "kvm_saturation":
        if cfg["state_saturation_n"] is None:
            raise PublishedCheckpointError("published config state_budget_mode='kvm_saturation' needs "
                                           "state_saturation_n (the published code fails without it)")
        options["saturation_n"] = cfg["state_saturation_n"]
    return options


# ----------------------------------------------------------------------------- weights

_TOP_NAMES = {
    "transformer.wte.weight": "embed.weight",
    "transformer.ln_emb.weight": "embed_norm.weight",
    "transformer.ln_emb.bias": "embed_norm.bias",
    "transformer.ln_head.weight": "final_norm.weight",
    "transformer.ln_head.bias": "final_norm.bias",
    "lm_head.weight": "lm_head.weight",
}
# Inside ``transformer.h.{i}.`` -> inside ``blocks.{i}.``
_BLOCK_NAMES = {
    "ln_attn.weight": "mixer_norm.weight",
    "ln_attn.bias": "mixer_norm.bias",
    "ln_mlp.weight": "mlp_norm.weight",
    "ln_mlp.bias": "mlp_norm.bias",
    "mlp.x_k": "mlp.shift",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "attn.c_q.weight": "mixer.q_proj.weight",
    "attn.c_k.weight": "mixer.k_proj.weight",
    "attn.c_v.weight": "mixer.v_proj.weight",
    "attn.c_proj.weight": "mixer.o_proj.weight",
    "attn.ln_q.weight": "mixer.q_norm.weight",
    "attn.ln_q.bias": "mixer.q_norm.bias",
    "attn.ln_k.weight": "mixer.k_norm.weight",
    "attn.ln_k.bias": "mixer.k_norm.bias",
    "attn.x_q": "mixer.shift_q",
    "attn.x_k": "mixer.shift_k",
    "attn.x_v": "mixer.shift_v",
    "attn.v_gate0": "mixer.v_residual_bias",
    "attn.v_gate1.weight": "mixer.v_residual_down.weight",
    "attn.v_gate2.weight": "mixer.v_residual_up.weight",
    "attn.key_weighting.weight": "mixer.merge_gate_proj.weight",
    "attn.front_head_temp": "mixer.window_temp",
    "attn.state_head_temp": "mixer.state_temp",
    "attn.ln_s_k.weight": "mixer.state_key_norm.weight",
    "attn.ln_s_k.bias": "mixer.state_key_norm.bias",
}
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_OUR_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
_CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")  # config.json first: the complete field dump


def our_name(published: str) -> str | None:
    """Our parameter name for a published one (None: not a name this loader maps)."""
    if published in _TOP_NAMES:
        return _TOP_NAMES[published]
    match = _BLOCK_RE.match(published)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def published_name(ours: str) -> str:
    """The published name of one of our parameters (for messages)."""
    for theirs, mine in _TOP_NAMES.items():
        if mine == ours:
            return theirs
    match = _OUR_BLOCK_RE.match(ours)
    if match:
        for theirs, mine in _BLOCK_NAMES.items():
            if mine == match.group(2):
                return f"transformer.h.{match.group(1)}.{theirs}"
    return f"(no published counterpart for {ours})"


def convert_state_dict(published: dict[str, Tensor], model: HybridLM) -> dict[str, Tensor]:
    """Published tensors -> our ``state_dict`` names and shapes, strictly: every problem (a weight the
    checkpoint lacks, one this loader does not map, a shape that does not fit) is reported at once."""
    expected = model.state_dict()
    out: dict[str, Tensor] = {}
    problems: list[str] = []
    mapped = set()
    for name, tensor in published.items():
        ours = our_name(name)
        mapped.add(ours)
        if ours is None or ours not in expected:
            if ours is not None and _is_unused_value_shift(ours, model):
                continue  # the zero x_v of value residual without token shift: not in the published math
            problems.append(f"published checkpoint has {name!r} {list(tensor.shape)} which this loader does not map"
                            + (f" (it would be {ours!r}, which this config's model does not have)" if ours else ""))
            continue
        want = expected[ours].shape
        if tensor.shape != want:
            if tensor.numel() == want.numel() and tensor.squeeze().shape == want:  # [1, 1, D] mixes -> [D]
                tensor = tensor.reshape(want)
            else:
                problems.append(f"shape mismatch: {name!r} is {list(tensor.shape)} in the checkpoint, but the config "
                                f"implies {list(want)} for {ours!r}")
                continue
        out[ours] = tensor
    for ours in expected:
        if ours not in mapped:
            problems.append(f"missing weight: the checkpoint has no {published_name(ours)!r} (our {ours!r})")
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise PublishedCheckpointError(
            f"the published weights do not fit the model their config describes:\n  - {shown}")
    return out


def _is_unused_value_shift(ours: str, model: HybridLM) -> bool:
    """The published mixin creates a zero ``attn.x_v`` when value residual is on and attention token
    shift is off; only its ``rwkv_post_tokenshift`` mode (refused above) reads it."""
    match = _OUR_BLOCK_RE.match(ours)
    if not match or match.group(2) != "mixer.shift_v" or int(match.group(1)) >= len(model.blocks):
        return False
    config = model.blocks[int(match.group(1))].mixer.config
    return config.value_residual and not config.token_shift


def read_published_weights(path: str | Path) -> dict[str, Tensor]:
    """Tensors of ``model.safetensors``, a sharded ``*.safetensors.index.json`` or one ``.safetensors`` file."""
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise PublishedCheckpointError(
            f"{path}: pickled checkpoints are not supported (loading them runs arbitrary code). Convert it once, in "
            "an environment you trust, with: python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('model', sd); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"")
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise PublishedCheckpointError(f"{path}: not a safetensors index (weight_map): {err}") from None
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(read_published_weights(path.parent / shard))
        return tensors
    if not path.is_file():
        raise PublishedCheckpointError(f"no weights file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PublishedCheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _find_in_folder(folder: Path) -> tuple[Path, Path]:
    """(config, weights) of a checkpoint folder."""
    config = next((folder / n for n in _CONFIG_NAMES if (folder / n).is_file()), None)
    if config is None:
        raise PublishedCheckpointError(f"{folder}: no config.json or config.yaml (the published model config)")
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return config, folder / name
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        read_published_weights(folder / pickled[0])  # raises the "unsupported, convert like this" error
    raise PublishedCheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_published(path: str | Path, config: str | Path | dict | None = None, *, compat: bool = False,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   tokenizer: dict | None = None) -> tuple[Recipe, HybridLM]:
    """Load a published KVM-paper checkpoint as (recipe, model in eval mode).

    ``path``: a checkpoint folder (config.json or config.yaml, plus model.safetensors or a sharded index),
    or a weights file (``.safetensors`` / ``.index.json``) with ``config`` (a path or dict) or a config
    file next to it. ``compat``: reproduce the published bf16 roundings (module docstring).
    ``dtype``/``device``: where the model lives (the published ``param_dtype`` is not applied).
    ``tokenizer``: the recipe's tokenizer section; default: a ``tokenizer.json`` next to the checkpoint."""
    path = Path(path)
    if not path.exists():
        raise PublishedCheckpointError(f"no published checkpoint at {path}")
    if path.is_dir():
        found_config, weights = _find_in_folder(path)
        folder = path
    else:
        weights, folder = path, path.parent
        if path.suffix in _PICKLE_SUFFIXES:
            read_published_weights(path)  # raises the "unsupported, convert like this" error
        found_config = next((folder / n for n in _CONFIG_NAMES if (folder / n).is_file()), None)
        if config is None and found_config is None:
            raise PublishedCheckpointError(f"{path}: pass config= (the published config.json/.yaml or a dict); "
                                           "there is none next to the weights")
    if tokenizer is None and (folder / "tokenizer.json").is_file():
        tokenizer = {"type": "file", "path": str((folder / "tokenizer.json").resolve())}
    recipe = recipe_from_published(config if config is not None else found_config, compat=compat, tokenizer=tokenizer)
    tensors = read_published_weights(weights)
    model = HybridLM(recipe.model)
    model.load_state_dict(convert_state_dict(tensors, model), strict=True)
    return recipe, model.to(device=device, dtype=dtype).eval()
