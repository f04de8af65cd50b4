"""``hybrid info``, ``init``, ``import-published``, ``export-hf`` and ``recipes``: what a recipe builds,
checkpoint folders made from a recipe (random weights) or from a published KVM-paper checkpoint, and
checkpoints exported for Hugging Face transformers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybrid.cli.options import add_seed, integer, output_folder, token_count
from hybrid.formats.tokenizer import load_tokenizer
from hybrid.model.recipe import RECIPES_DIR, Recipe, RecipeError, load_recipe

MAX_BATCH = 4096


def add_info(commands) -> None:
    info = commands.add_parser("info", help="layers, parameters and decode state bytes of a recipe",
                               description="Show a recipe's layer table, parameter counts and its decode state "
                                           "bytes per kind at chosen context lengths (exact shapes, nothing run "
                                           "at that length).")
    info.add_argument("recipe", help="recipe file, or a name under recipes/ (see `hybrid recipes`)")
    info.add_argument("--context", type=token_count, nargs="+", default=[1024, 4096, 16384, 32768],
                      help="context lengths to report state bytes at (e.g. 1k 4k 32k)")
    info.add_argument("--batch", type=integer(1, MAX_BATCH, f"a batch size in [1, {MAX_BATCH}]"), default=1,
                      help="sequences decoded at once (default 1)")
    info.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> int:
    from hybrid.model.describe import build_for_info, describe

    recipe = load_recipe(args.recipe)
    check_every_section(recipe)
    print(describe(recipe, build_for_info(recipe), args.context, args.batch))
    return 0


def check_every_section(recipe: Recipe) -> None:
    """What ``hybrid train`` would refuse in a recipe beyond its model: a tokenizer that cannot be
    loaded or does not fit, and any problem of its ``train:`` section (a misspelt key, a bad value)."""
    from hybrid.training.config import config_from_recipe

    source = Path(recipe.source)
    load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None, vocab_size=recipe.model.vocab_size)
    if recipe.train:
        config_from_recipe(recipe)


def add_init(commands) -> None:
    init = commands.add_parser("init", help="create a checkpoint folder with freshly initialised weights",
                               description="Build the model a recipe describes with random weights and save it "
                                           "as a checkpoint folder (recipe.yaml, model.safetensors, tokenizer).")
    init.add_argument("recipe", help="recipe file, or a name under recipes/")
    init.add_argument("out", type=output_folder,
                      help="checkpoint folder to write (an existing checkpoint there is replaced)")
    add_seed(init)
    init.set_defaults(run=_init)


def _init(args: argparse.Namespace) -> int:
    from hybrid.formats.checkpoint import save_checkpoint
    from hybrid.formats.model_source import build_from_recipe

    recipe = load_recipe(args.recipe)
    check_every_section(recipe)
    model, tokenizer = build_from_recipe(recipe, args.seed)
    print(f"wrote {save_checkpoint(args.out, recipe, model, tokenizer)}")
    return 0


def add_import_published(commands) -> None:
    imp = commands.add_parser("import-published",
                              help="convert a published KVM-paper checkpoint to a checkpoint folder",
                              description="Read a checkpoint in the published KVM code's format (recursal/KVM-paper: "
                                          "config.json or config.yaml + model.safetensors) and save it as a "
                                          "checkpoint folder that generate and train load.")
    imp.add_argument("source", help="published checkpoint folder, or its .safetensors file")
    imp.add_argument("out", type=output_folder, help="checkpoint folder to write")
    imp.add_argument("--compat", action="store_true",
                     help="reproduce the published code's bf16 rounding of RoPE cos/sin and KVM state values "
                          "(what the released models were trained with; off: exact fp32 math)")
    imp.set_defaults(run=_import_published)


def _import_published(args: argparse.Namespace) -> int:
    from hybrid.formats.checkpoint import save_checkpoint
    from hybrid.formats.published import load_published

    recipe, model = load_published(args.source, compat=args.compat)
    print(f"wrote {save_checkpoint(args.out, recipe, model)}")
    return 0


def add_export_hf(commands) -> None:
    exp = commands.add_parser("export-hf", help="write a checkpoint as a folder that Hugging Face transformers loads",
                              description="Write a checkpoint as a folder that AutoModelForCausalLM.from_pretrained("
                                          "OUT, trust_remote_code=True) and AutoTokenizer.from_pretrained(OUT) load "
                                          "from any directory where kvm-hybrid is installed: config.json, "
                                          "model.safetensors, tokenizer files and a modeling file that imports the "
                                          "toolkit. See hybrid/hf/export.py.")
    exp.add_argument("checkpoint", help="checkpoint folder, or a training run folder (its newest checkpoint)")
    exp.add_argument("out", type=output_folder, help="folder to write (must not exist, or be empty)")
    exp.set_defaults(run=_export_hf)


def _export_hf(args: argparse.Namespace) -> int:
    from hybrid.formats.model_source import checkpoint_folder
    from hybrid.hf.export import export_hf

    print(f"wrote {export_hf(checkpoint_folder(args.checkpoint, sys.stderr), args.out)}")
    return 0


def add_recipes(commands) -> None:
    recipes = commands.add_parser("recipes", help="list the shipped recipes",
                                  description="List the recipes shipped under recipes/ with their first comment line.")
    recipes.set_defaults(run=_recipes)


def _recipes(args: argparse.Namespace) -> int:
    paths = sorted(path for path in RECIPES_DIR.rglob("*.yaml") if not path.name.startswith("_"))
    if not paths:
        raise RecipeError(f"no recipes in {RECIPES_DIR}: this installation lacks the shipped recipes "
                          "(a wheel carries them as hybrid/recipes; a checkout has them in recipes/)")
    for path in paths:
        first = path.read_text().lstrip().splitlines()[0] if path.read_text().strip() else ""
        summary = first.lstrip("# ").strip() if first.startswith("#") else ""
        print(f"{path.relative_to(RECIPES_DIR).with_suffix('')!s:<44} {summary}")
    return 0
