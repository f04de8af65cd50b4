"""The ``hybrid`` command line. ``hybrid --help`` lists the commands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from hybrid.demo import run_demo

    run_demo(length=args.length, piece=args.piece, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="Hybrid LRNN + Key-Value Means language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="stream a long sequence through KVM layers: state size vs context",
                               description="Stream a long random sequence through KVM layers (fixed and "
                                           "16*sqrt(T) budgets) and print their state against a full KV cache.")
    demo.add_argument("--length", type=int, default=16384, help="tokens to stream (default 16384)")
    demo.add_argument("--piece", type=int, default=2048, help="tokens per call; each call continues the state")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "piece", 1) <= 0 or getattr(args, "length", 1) <= 0:
        print("hybrid: --length and --piece must be positive", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
