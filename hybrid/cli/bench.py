"""``hybrid bench``: prefill time, decode time per token and state bytes against context, for models or
one mixer, each against the full-attention model of the same size (``hybrid.evaluation.bench``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hybrid.cli.options import (
    UsageError,
    add_device,
    add_dtype,
    add_seed,
    add_threads,
    check_output_folder,
    default_output_dir,
    integer,
    output_folder,
    parse_set,
    positive_int,
    token_count,
    token_count_or_zero,
)
from hybrid.formats.model_source import DTYPES, open_model
from hybrid.model.device import resolve_device


def add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="prefill, decode and state bytes vs context, against full attention",
                                description="Measure prefill time, decode time per token at position T and state "
                                            "bytes by kind over context lengths, for models or one mixer, with the "
                                            "full-attention model of the same size (every mixer replaced by "
                                            "attention with the same heads) measured in the same run. Writes "
                                            "bench.csv and bench.png. See hybrid/evaluation/bench.py for the method.")
    bench.add_argument("models", nargs="*", help="recipes, checkpoint folders or training runs")
    bench.add_argument("--mixer", help="measure one mixer (a one-layer model around it) instead of models")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of --mixer, read as YAML (repeatable), e.g. --set budget=power_law")
    bench.add_argument("--d-model", type=positive_int, default=768, help="model width for --mixer (default 768)")
    bench.add_argument("--contexts", type=token_count, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                       help="context lengths T (default 1k 2k 4k 8k 16k 32k)")
    bench.add_argument("--repeats", type=integer(1, 1000, "a repeat count in [1, 1000]"), default=3,
                       help="runs per measurement (median, min, max)")
    bench.add_argument("--steps", type=token_count, default=256,
                       help="decode steps averaged per run (default 256: a whole paper-sized KVM chunk)")
    bench.add_argument("--max-prefill", type=token_count_or_zero, default=None,
                       metavar="T", help="measure prefill only up to this context (0: never; default: always)")
    bench.add_argument("--prefill-chunk", type=token_count, default=None,
                       help="prefill tokens per forward (default: the whole context in one forward)")
    bench.add_argument("--no-baseline", action="store_true", help="do not measure the full-attention baseline")
    add_threads(bench, "torch threads (default: torch's)")
    add_seed(bench)
    bench.add_argument("--out", type=output_folder, help="output folder (default bench_out/<first model>)")
    add_device(bench)
    add_dtype(bench)
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from hybrid.evaluation.bench import (
        BenchSettings,
        header,
        run_bench,
        single_mixer_config,
        subjects_for,
        summary,
        write_outputs,
    )
    from hybrid.model.model import HybridLM

    if (args.mixer is None) == (not args.models):
        raise UsageError("name the models to measure (recipes, checkpoint folders, training runs) or one mixer "
                         "with --mixer NAME, not both")
    if args.set and args.mixer is None:
        raise UsageError("--set gives options of the --mixer being measured; for a model, edit its recipe")
    first = " ".join([args.mixer, *args.set]) if args.mixer is not None else args.models[0]
    out = check_output_folder(Path(args.out) if args.out else default_output_dir("bench_out", first))
    named = []
    if args.mixer is not None:
        pairs = parse_set(args.set, "KEY=VALUE, e.g. --set budget=power_law")
        config = single_mixer_config(args.mixer, {".".join(key): value for key, value in pairs}, args.d_model)
        torch.manual_seed(args.seed)
        model = HybridLM(config).eval().to(device=resolve_device(args.device),
                                           dtype=DTYPES[args.dtype] if args.dtype else None)
        named.append((first, model))
    else:
        for source in args.models:
            _, model, _ = open_model(source, args.device, args.dtype, args.seed, sys.stderr)
            named.append((source, model))
    settings = BenchSettings(tuple(args.contexts), args.repeats, args.steps, args.max_prefill, args.prefill_chunk,
                             args.seed)
    print(header(settings, named[0][1].device), flush=True)
    rows = run_bench(subjects_for(named, with_baseline=not args.no_baseline), settings,
                     log=lambda line: print(line, flush=True))
    print("\n" + summary(rows))
    write_outputs(rows, out, ", ".join(n for n, _ in named), sys.stdout)
    return 0
