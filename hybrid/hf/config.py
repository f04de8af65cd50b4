"""``KVMHybridConfig``: a checkpoint's ``config.json`` (``hybrid.formats.hf_config``) as a transformers
configuration, and the ``ModelConfig`` it describes."""

from __future__ import annotations

from transformers import PreTrainedConfig

from blocks.config import ConfigError
from blocks.registry import UnknownMixerError
from hybrid.formats.hf_config import MODEL_TYPE
from hybrid.model.recipe import ModelConfig, RecipeError, model_from_dict


class KVMHybridConfig(PreTrainedConfig):
    """``recipe``: ``{"model": <the expanded model: section of a recipe>}``; None only for the empty
    configuration transformers builds to compare defaults against."""

    model_type = MODEL_TYPE

    def __init__(self, recipe: dict | None = None, kvm_hybrid_version: str | None = None, **kwargs):
        self.recipe = recipe
        self.kvm_hybrid_version = kvm_hybrid_version  # the toolkit that wrote the file
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The model this configuration describes (validated as a recipe's ``model:`` section is)."""
        if not isinstance(self.recipe, dict) or "model" not in self.recipe:
            raise RecipeError("config.json: no 'recipe: {model: ...}' entry, so it describes no kvm-hybrid model "
                              "(write folders with `hybrid export-hf` or the toolkit's checkpoints)")
        try:
            return model_from_dict(self.recipe["model"])
        except (ConfigError, UnknownMixerError) as err:
            raise RecipeError(f"config.json: recipe.{err}") from None
