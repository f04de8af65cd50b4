"""The ``hybrid`` command line. ``hybrid --help`` lists the commands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from hybrid.demo import run_demo

    run_demo(length=args.length, piece=args.piece, seed=args.seed)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="Hybrid LRNN + Key-Value Means language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
