"""The ``hybrid`` command line. ``hybrid --help`` lists the commands; each has its own ``--help``.

Each command module (``hybrid.cli.models``, ``generate``, ``train``, ``convert``, ``demo``, ``bench``,
``evaluate``) declares its commands' parsers and handles them. Handlers stay thin: they parse,
call the module that does the work, and print. This module puts the parsers together and turns
the toolkit's own errors (bad recipes, checkpoints, states) into one clear line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from blocks.config import ConfigError
from blocks.registry import UnknownMixerError
from blocks.state import StateError
from convert.errors import TeacherError
from hybrid import __version__
from hybrid.cli import bench, convert, demo, evaluate, generate, models, train
from hybrid.cli.options import UsageError
from hybrid.formats.checkpoint import CheckpointError
from hybrid.formats.published import PublishedCheckpointError
from hybrid.formats.tokenizer import TokenizerError
from hybrid.model.device import DeviceError
from hybrid.model.recipe import RecipeError
from hybrid.training.config import TrainError
from hybrid.training.data import DataError

USER_ERRORS = (RecipeError, ConfigError, UnknownMixerError, StateError, CheckpointError, TokenizerError,
               UsageError, PublishedCheckpointError, FileNotFoundError, DataError, TrainError, TeacherError,
               DeviceError)
COMMANDS = (models.add_info, models.add_init, generate.add_generate, models.add_import_published, models.add_export_hf,
            train.add_train,
            convert.add_convert, convert.add_convert_scores, convert.add_convert_report, models.add_recipes,
            demo.add_demo, bench.add_bench, evaluate.add_eval, evaluate.add_lm_eval)
"""Each adds one command's parser, in the order ``hybrid --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="Hybrid LRNN + Key-Value Means language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:  # the shared --threads, before the command runs
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"hybrid {args.command}: error: {err}", file=sys.stderr)
        return 2
