"""Teachers: pretrained Llama-family transformers loaded as a ``Recipe`` of full-attention layers.

::

    teacher = load_teacher("path/to/hf-folder")          # config.json + safetensors + tokenizer.json
    teacher = load_teacher("model.Q4_1.gguf", n_layers=4)  # GGUF, dequantised; only the first 4 layers
    logits, _ = teacher.model(tokens)

A teacher is an ordinary ``HybridLM`` whose layers are all the ``attention`` mixer (``swa`` for
sliding-window layers), with ``rope_style: llama``, RMSNorm, SwiGLU and a tied head where the config
says so; so a converted student differs from it only in the layers a plan replaces.

Supported ``model_type``: ``llama`` (SmolLM, TinyLlama, Llama 2/3 without RoPE scaling),
``mistral`` (sliding window -> ``swa``), ``qwen2`` (q/k/v biases), ``qwen3`` (per-head q/k RMSNorm).
Everything else the forward pass depends on is checked and refused with the field named: RoPE
scaling types other than ``default``, partial rotary, activations other than SiLU, per-layer sliding
windows of Qwen (``use_sliding_window``). Weights are checked strictly: every parameter of the
recipe must be in the files (missing ones are listed), and every tensor of a loaded layer must have
a place in the recipe (an unexpected bias means the config and weights disagree).

``n_layers`` truncates the teacher to its first layers and reads only their tensors (plus embedding,
final norm and head): a 4-layer SmolLM2 loads in about a second, for fast tests.

Tokenizer: the folder's ``tokenizer.json``; for GGUF one built from the file's metadata
(``convert.gguf_reader``), written once to a cache folder (``tokenizer_cache``, default
``$TMPDIR/kvm-hybrid-gguf-tokenizers``) named by its hash, because ``HFTokenizer`` reads a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from convert.errors import TeacherError
from convert.gguf_reader import GGUFTeacherFile
from hybrid.formats.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, RecipeError, recipe_from_dict

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION, SLIDING = "attention", "swa"  # the teacher recipe's mixer names


@dataclasses.dataclass
class Teacher:
    """A loaded teacher: its recipe, model (eval mode, frozen), tokenizer (None if the source has none)
    and the source's config (HF ``config.json`` or the GGUF metadata as such a dict)."""

    recipe: Recipe
    model: HybridLM
    tokenizer: Tokenizer | None
    config: dict
    source: str

    def text_tokenizer(self) -> Tokenizer:
        """The tokenizer to read text with: the source's own, or the one its recipe names (bytes, for a
        folder without tokenizer.json)."""
        return self.tokenizer if self.tokenizer is not None else load_tokenizer(self.recipe.tokenizer)


# ----------------------------------------------------------------------------- config -> recipe

def _rope(config: dict) -> tuple[float, str]:
    """(theta, rope type) from either the 4.x keys (rope_theta, rope_scaling) or 5.x rope_parameters."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    return float(theta), kind


def teacher_recipe(config: dict, n_layers: int | None = None, tokenizer_spec: dict | None = None,
                   source: str = "<config>") -> Recipe:
    """An HF-style config dict -> the recipe of the same transformer (first ``n_layers`` layers)."""
    where = f"{source}: "
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TeacherError(f"{where}model_type {model_type!r} is not a supported teacher "
                           f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in config:
            raise TeacherError(f"{where}config lacks {key!r}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise TeacherError(f"{where}hidden_act {act!r} is not supported (SwiGLU with SiLU only)")
    theta, rope_type = _rope(config)
    if rope_type != "default":
        raise TeacherError(f"{where}RoPE scaling type {rope_type!r} is not supported (only unscaled 'default' "
                           "RoPE); a long-context variant of the model needs its scaled frequencies")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise TeacherError(f"{where}partial_rotary_factor {config['partial_rotary_factor']} is not supported")
    if config.get("use_sliding_window"):
        raise TeacherError(f"{where}use_sliding_window (Qwen's per-layer windows) is not supported")
    total = int(config["num_hidden_layers"])
    n = total if n_layers is None else int(n_layers)
    if not 0 < n <= total:
        raise TeacherError(f"{where}n_layers must be in [1, {total}], got {n_layers}")

    heads = int(config["num_attention_heads"])
    bias = bool(config.get("attention_bias", False))
    attention = {
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // heads),
        "qkv_bias": True if model_type == "qwen2" else bias,
        "o_bias": False if model_type == "qwen2" else bias,
        "qk_norm": "rmsnorm" if model_type == "qwen3" else "none",
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_style": "llama",
    }
    window = config.get("sliding_window") if model_type == "mistral" else None
    layers = [SLIDING if window else ATTENTION] * n
    mixers = {name: dict(attention) for name in dict.fromkeys(layers)}
    if window:
        mixers[SLIDING]["window"] = int(window)
    data = {
        "model": {
            "vocab_size": int(config["vocab_size"]),
            "d_model": int(config["hidden_size"]),
            "n_layers": n,
            "layers": layers,
            "mixers": mixers,
            "block": {"norm": "rmsnorm", "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "mlp": "swiglu",
                      "mlp_hidden": int(config["intermediate_size"]), "mlp_bias": bool(config.get("mlp_bias", False))},
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        },
        "tokenizer": tokenizer_spec or {"type": "bytes"},
    }
    try:
        return recipe_from_dict(data, source=source)
    except RecipeError as err:
        raise TeacherError(f"{where}the config does not give a valid recipe: {err}") from None


# ----------------------------------------------------------------------------- weights

_LAYER = re.compile(r"^blocks\.(\d+)\.(mixer_norm|mlp_norm|mixer|mlp)\.(.+)$")
_OURS_TO_HF_BLOCK = {"mixer_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                     "mixer": "self_attn", "mlp": "mlp"}
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def hf_name(ours: str) -> str:
    """Our parameter name -> the HF Llama-family name (``blocks.3.mixer.q_proj.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if ours in _GLOBAL:
        return _GLOBAL[ours]
    match = _LAYER.match(ours)
    if match is None:
        raise TeacherError(f"parameter {ours!r} has no Llama-family counterpart")
    i, part, rest = match.groups()
    return f"model.layers.{i}.{_OURS_TO_HF_BLOCK[part]}.{rest}"


def check_names(wanted: list[str], available: set[str], n_layers: int, where: str) -> None:
    """Strict check: every wanted HF name present; no unclaimed tensor in the loaded layers."""
    missing = [name for name in wanted if name not in available]
    if missing:
        raise TeacherError(f"{where}: missing tensors {', '.join(missing[:12])}"
                           + (f" and {len(missing) - 12} more" if len(missing) > 12 else ""))
    claimed = set(wanted) | {"lm_head.weight"}  # a tied model may store its head anyway
    unexpected = []
    for name in sorted(available - claimed):
        layer = re.match(r"^model\.layers\.(\d+)\.", name)
        if _IGNORED.search(name) or (layer and int(layer.group(1)) >= n_layers):
            continue
        unexpected.append(name)
    if unexpected:
        raise TeacherError(f"{where}: tensors with no place in the recipe (config and weights disagree?): "
                           f"{', '.join(unexpected[:12])}")


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise TeacherError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                           "(pickled .bin weights are not read: convert them to safetensors)")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _read_safetensors(files: dict[str, Path], names: list[str]) -> dict[str, Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, group in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name).float()
        except (SafetensorError, OSError) as err:
            raise TeacherError(f"{path}: cannot read safetensors: {err}") from None
    return out


def build_teacher_model(recipe: Recipe, tensors: dict[str, Tensor], where: str) -> HybridLM:
    """``HybridLM(recipe)`` with the HF-named ``tensors`` loaded; shapes are checked."""
    model = HybridLM(recipe.model)
    state = {}
    for ours, param in model.state_dict().items():
        value = tensors[hf_name(ours)]
        if value.shape != param.shape:
            raise TeacherError(f"{where}: tensor {hf_name(ours)} has shape {tuple(value.shape)}, "
                               f"the recipe needs {tuple(param.shape)}")
        state[ours] = value
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- loading

def load_teacher(path: str | Path, n_layers: int | None = None, dtype: torch.dtype = torch.float32,
                 tokenizer_cache: str | Path | None = None) -> Teacher:
    """A Hugging Face folder or a ``.gguf`` file -> ``Teacher`` (first ``n_layers`` layers if given)."""
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher {path} does not exist (give a Hugging Face folder or a .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, n_layers, dtype, tokenizer_cache)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf(path, n_layers, dtype)
    raise TeacherError(f"{path} is neither a .gguf file nor a folder with config.json")


def _wanted(recipe: Recipe) -> list[str]:
    with torch.device("meta"):
        names = list(HybridLM(recipe.model).state_dict())
    return [hf_name(n) for n in names]


def _load_hf(folder: Path, n_layers: int | None, dtype: torch.dtype) -> Teacher:
    config = json.loads((folder / "config.json").read_text())
    tok_path = folder / "tokenizer.json"
    tokenizer = HFTokenizer(tok_path) if tok_path.is_file() else None
    spec = {"type": "file", "path": str(tok_path.resolve())} if tokenizer else None
    recipe = teacher_recipe(config, n_layers, spec, source=str(folder))
    files = _safetensors_index(folder)
    wanted = _wanted(recipe)
    check_names(wanted, set(files), recipe.model.n_layers, str(folder))
    model = build_teacher_model(recipe, _read_safetensors(files, wanted), str(folder))
    return Teacher(recipe, model.to(dtype), tokenizer, config, str(folder))


def _load_gguf(path: Path, n_layers: int | None, dtype: torch.dtype, cache: str | Path | None) -> Teacher:
    gguf = GGUFTeacherFile(path)
    config = gguf.config()
    text = gguf.tokenizer_json()
    tokenizer, spec = None, None
    if text is not None:
        folder = Path(cache) if cache is not None else Path(tempfile.gettempdir()) / "kvm-hybrid-gguf-tokenizers"
        folder.mkdir(parents=True, exist_ok=True)
        tok_path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if not tok_path.is_file():
            tmp = tok_path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(tok_path)
        eos_id = gguf.value("tokenizer.ggml.eos_token_id")
        eos = gguf.value("tokenizer.ggml.tokens")[eos_id] if eos_id is not None else None
        tokenizer = HFTokenizer(tok_path, eos=eos)
        spec = {"type": "file", "path": str(tok_path), **({"eos": eos} if eos else {})}
    recipe = teacher_recipe(config, n_layers, spec, source=str(path))
    names = gguf.hf_names()
    wanted = _wanted(recipe)
    check_names(wanted, set(names), recipe.model.n_layers, str(path))
    model = build_teacher_model(recipe, gguf.load(wanted), str(path))
    return Teacher(recipe, model.to(dtype), tokenizer, config, str(path))


def describe(teacher: Teacher) -> dict[str, Any]:
    """A short summary for logs: sizes, heads, RoPE, tying."""
    m = teacher.recipe.model
    attn = m.layers[0].options
    return {"source": teacher.source, "n_layers": m.n_layers, "d_model": m.d_model, "vocab_size": m.vocab_size,
            "heads": attn.num_heads, "kv_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
            "rope_theta": attn.rope_theta, "tied": m.tie_embeddings,
            "parameters": teacher.model.num_parameters()}
