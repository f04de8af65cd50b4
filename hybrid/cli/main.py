"""The ``hybrid`` command line. ``hybrid --help`` lists the commands; each has its own ``--help``.

Each command module (``hybrid.cli.models``, ``generate``, ``train``, ``convert``, ``demo``, ``bench``,
``evaluate``) declares its commands' parsers and handles them. Handlers stay thin: they parse,
call the module that does the work, and print.

Errors caused by input never show a traceback. Arguments are range-checked while they are parsed
(``hybrid.cli.options``: a bad one is one line and exit code 2). Every layer that validates input
(recipes, checkpoints, states, tokenizers, data, devices, ...) raises a subclass of
``blocks.errors.InputError`` whose message names the input, the problem and the fix; this module
prints it as one line on stderr, with exit code 2, as it does for an ``OSError`` (a file that
cannot be read or written). Any other exception is a bug in the toolkit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

import torch

from blocks.errors import InputError
from hybrid import __version__
from hybrid.cli import bench, convert, demo, evaluate, generate, models, train
from hybrid.cli.options import Parser

USER_ERRORS = (InputError, OSError)
COMMANDS = (models.add_info, models.add_init, generate.add_generate, models.add_import_published, models.add_export_hf,
            train.add_train,
            convert.add_convert, convert.add_convert_scores, convert.add_convert_report, models.add_recipes,
            demo.add_demo, bench.add_bench, evaluate.add_eval, evaluate.add_lm_eval)
"""Each adds one command's parser, in the order ``hybrid --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hybrid", description="Hybrid LRNN + Key-Value Means language models.")
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
        print(f"hybrid {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """An error's message on one line: its lines joined with '; ' (an OSError: the file and the problem)."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        return f"{where}{err.strerror} ({type(err).__name__})"
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
