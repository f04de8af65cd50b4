"""The ``hybrid`` command line. ``hybrid --help`` lists the commands; each has its own ``--help``.

Handlers stay thin: they parse, call the module that does the work, and turn the toolkit's own
errors (bad recipes, checkpoints, states) into one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from blocks.config import ConfigError
from blocks.registry import UnknownMixerError
from blocks.state import StateError
from hybrid.recipe import RECIPES_DIR, RecipeError, load_recipe

USER_ERRORS = (RecipeError, ConfigError, UnknownMixerError, StateError, FileNotFoundError)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _token_count(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576)."""
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 4096 or 4k, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


# ----------------------------------------------------------------------------- handlers

def _demo(args: argparse.Namespace) -> int:
    from hybrid.demo import run_demo

    run_demo(length=args.length, piece=args.piece, seed=args.seed)
    return 0


def _info(args: argparse.Namespace) -> int:
    from hybrid.info import build_for_info, describe

    recipe = load_recipe(args.recipe)
    print(describe(recipe, build_for_info(recipe), args.context, args.batch))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        first = path.read_text().lstrip().splitlines()[0] if path.read_text().strip() else ""
        summary = first.lstrip("# ").strip() if first.startswith("#") else ""
        print(f"{path.relative_to(RECIPES_DIR).with_suffix('')!s:<44} {summary}")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="Hybrid LRNN + Key-Value Means language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="layers, parameters and decode state bytes of a recipe",
                               description="Show a recipe's layer table, parameter counts and its decode state "
                                           "bytes per kind at chosen context lengths (exact shapes, nothing run "
                                           "at that length).")
    info.add_argument("recipe", help="recipe file, or a name under recipes/ (see `hybrid recipes`)")
    info.add_argument("--context", type=_token_count, nargs="+", default=[1024, 4096, 16384, 32768],
                      help="context lengths to report state bytes at (e.g. 1k 4k 32k)")
    info.add_argument("--batch", type=_positive_int, default=1, help="sequences decoded at once (default 1)")
    info.set_defaults(run=_info)

    recipes = commands.add_parser("recipes", help="list the shipped recipes",
                                  description="List the recipes shipped under recipes/ with their first comment line.")
    recipes.set_defaults(run=_recipes)

    demo = commands.add_parser("demo", help="stream a long sequence through KVM layers: state size vs context",
                               description="Stream a long random sequence through KVM layers (fixed and "
                                           "16*sqrt(T) budgets) and print their state against a full KV cache.")
    demo.add_argument("--length", type=_positive_int, default=16384, help="tokens to stream (default 16384)")
    demo.add_argument("--piece", type=_positive_int, default=2048, help="tokens per call; each call continues the state")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"hybrid {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
