"""``hybrid export-hf``: a checkpoint folder -> a folder that transformers loads from anywhere.

::

    OUT/
      config.json              hybrid.formats.hf_config, plus the auto_map that names the modeling file
      model.safetensors        the weights under transformers' names (``model.`` + the HybridLM name)
      modeling_kvm_hybrid.py   hybrid/hf/remote_code.py: imports the classes from the installed toolkit
      tokenizer.json           hybrid.formats.hf_tokenizer (the byte tokenizer as a byte-level BPE)
      tokenizer_config.json

``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(OUT)`` load it in any process where kvm-hybrid is installed.

The folder is assembled under a temporary name beside OUT and renamed into place, so a failed export
leaves nothing behind. OUT must not exist or be empty: an export never replaces files. Only models
made of the toolkit's own mixers export: the folder's modeling file knows no others.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from blocks.registry import get_mixer
from hybrid.formats.atomic import new_folder
from hybrid.formats.checkpoint import CheckpointError, load_checkpoint
from hybrid.formats.hf_config import ARCHITECTURE, hf_config, write_hf_config
from hybrid.formats.hf_tokenizer import write_hf_tokenizer
from hybrid.model.recipe import ModelConfig

MODELING_FILE = "modeling_kvm_hybrid.py"
REMOTE_CODE = Path(__file__).with_name("remote_code.py")
WEIGHTS_FILE = "model.safetensors"
BUILT_IN_MIXERS = "blocks"  # the package of the mixers an exported folder can rebuild


class ExportError(CheckpointError):
    """A checkpoint or an output folder that export-hf refuses; the message says why and what to do."""


def check_exportable(model: ModelConfig) -> None:
    """Refuse a model with a mixer from outside the toolkit (registered by other code in this process)."""
    for i, layer in enumerate(model.layers):
        cls = get_mixer(layer.mixer).cls
        if cls.__module__.split(".")[0] != BUILT_IN_MIXERS:
            raise ExportError(f"layer {i} is a {layer.mixer!r} mixer ({cls.__module__}.{cls.__name__}), which has no "
                              "transformers equivalent: an exported folder rebuilds the toolkit's own mixers only "
                              f"({BUILT_IN_MIXERS}/), so it could not load this model")


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint folder ``checkpoint`` as a transformers folder ``out`` (see the module docstring)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: export-hf writes a new folder and replaces "
                          "nothing (choose another OUT, or remove this one)")
    recipe, model, tokenizer = load_checkpoint(checkpoint)
    check_exportable(recipe.model)
    with new_folder(out) as tmp:
        tensors = {f"model.{name}": value.detach().contiguous() for name, value in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = hf_config(recipe.model, tokenizer, next(iter(tensors.values())).dtype)
        stem = Path(MODELING_FILE).stem
        config["auto_map"] = {"AutoConfig": f"{stem}.KVMHybridConfig", "AutoModelForCausalLM": f"{stem}.{ARCHITECTURE}"}
        write_hf_config(tmp, config)
        write_hf_tokenizer(tokenizer, tmp)
        shutil.copyfile(REMOTE_CODE, tmp / MODELING_FILE)
    return out
