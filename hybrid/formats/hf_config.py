"""``config.json``: how Hugging Face transformers reads a checkpoint folder or an exported folder.

Every checkpoint folder carries one beside ``recipe.yaml`` (``hybrid.formats.checkpoint``), so that
``AutoModelForCausalLM.from_pretrained(folder)`` finds the model class ``hybrid.hf`` registers under
``model_type: kvm_hybrid``; ``hybrid export-hf`` adds the ``auto_map`` that points transformers at the
folder's own modeling file. The model itself is the recipe's expanded ``model:`` section under
``recipe``: the toolkit builds the same ``HybridLM`` from it. The usual transformers fields (vocabulary,
width, depth, token ids, dtype) are there for tools that read them.

Nothing here imports transformers: writing a checkpoint never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hybrid import __version__
from hybrid.formats.tokenizer import Tokenizer
from hybrid.model.recipe import ModelConfig, model_to_dict

CONFIG_FILE = "config.json"
MODEL_TYPE = "kvm_hybrid"
ARCHITECTURE = "KVMHybridForCausalLM"


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The id that pads batches: the end-of-text token, or byte 0 for a tokenizer without one. Padding
    never reaches the model (``hybrid.hf`` reads each row from its first real token)."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def hf_config(model: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    """The ``config.json`` mapping of a model with this tokenizer whose weights are saved in ``dtype``.

    ``tie_word_embeddings`` is false whatever the recipe says: a tied ``HybridLM`` has no head
    weights to tie (its head reads the embedding matrix), so transformers must not look for them."""
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "recipe": {"model": model_to_dict(model)},
            "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
            "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": pad_token_id(tokenizer), "dtype": str(dtype).removeprefix("torch."),
            "kvm_hybrid_version": __version__}


def write_hf_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
