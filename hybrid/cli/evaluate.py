"""``hybrid eval``: a checkpoint's perplexity and loss by position on text, needle-in-a-haystack
retrieval, or lm-evaluation-harness tasks (``hybrid.evaluation``); ``hybrid lm-eval``: lm-eval's own
command line with ``--model hybrid`` (``hybrid.evaluation.lm_eval_adapter`` says why it is needed)."""

from __future__ import annotations

import argparse
import json
import math
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
    count,
    default_output_dir,
    integer,
    number,
    output_folder,
    positive_int,
    token_count,
)
from hybrid.formats.model_source import open_model


def add_eval(commands) -> None:
    evl = commands.add_parser("eval", help="perplexity and loss by position, needle in a haystack, lm-eval tasks",
                              description="Evaluate a checkpoint. Default: perplexity and loss by position on text "
                                          "(--text; default the built-in corpus's held-out tail), writing "
                                          "loss_by_position.csv/.png. --niah: needle-in-a-haystack retrieval "
                                          "(RULER single-needle styles, generated offline). --tasks: "
                                          "lm-evaluation-harness tasks (the 'eval' extra). See "
                                          "hybrid/evaluation/perplexity.py and niah.py.")
    evl.add_argument("model", help="checkpoint folder, training run folder, or a recipe (random weights)")
    mode = evl.add_mutually_exclusive_group()
    mode.add_argument("--niah", action="store_true", help="needle-in-a-haystack retrieval instead of perplexity")
    mode.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval tasks instead of perplexity")
    evl.add_argument("--text", nargs="+", metavar="FILE", help="text/JSONL files or folders to score")
    evl.add_argument("--max-len", type=token_count, default=32768,
                     help="tokens a window predicts; longer documents are cut into windows (default 32k)")
    evl.add_argument("--bucket", type=positive_int, default=1024,
                     help="positions per loss-by-position bucket (default 1024; small ones for tiny models)")
    evl.add_argument("--chunk", type=token_count, default=1024, help="tokens per forward (default 1024)")
    evl.add_argument("--styles", nargs="+", choices=["passkey", "word", "uuid"], default=["passkey", "word", "uuid"],
                     help="NIAH styles (RULER S1, S2, S3; default all)")
    evl.add_argument("--contexts", type=token_count, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                     help="NIAH prompt lengths (default 1k 2k 4k 8k 16k 32k)")
    evl.add_argument("--depths", type=number(0, 1, "a depth in [0, 1]"), nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                     help="NIAH needle depths in the haystack, 0..1 (default 0 0.25 0.5 0.75 1)")
    evl.add_argument("--samples", type=integer(1, 1000, "a sample count in [1, 1000]"), default=1,
                     help="NIAH prompts per style, context and depth")
    evl.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (e.g. a local task)")
    evl.add_argument("--limit", type=number(0, math.inf, "a count or fraction > 0", low_open=True), default=None,
                     help="lm-eval: examples per task (or a fraction)")
    evl.add_argument("--num-fewshot", type=count, default=None, help="lm-eval: few-shot examples")
    add_seed(evl, "NIAH generator seed (and init seed for a recipe)")
    add_threads(evl, "torch threads (default: torch's; 1 is steadiest on a shared machine)")
    evl.add_argument("--out", type=output_folder, help="output folder (default eval_out/<model>)")
    add_device(evl)
    add_dtype(evl)
    evl.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    out = check_output_folder(Path(args.out) if args.out else default_output_dir("eval_out", args.model))
    _, model, tokenizer = open_model(args.model, args.device, args.dtype, args.seed, sys.stderr)
    with torch.inference_mode():
        if args.tasks:
            return _eval_lm_eval(args, model, tokenizer, out)
        if args.niah:
            return _eval_niah(args, model, tokenizer, out)
        return _eval_text(args, model, tokenizer, out)


def _eval_text(args, model, tokenizer, out: Path) -> int:
    from hybrid.evaluation.perplexity import load_texts, score_documents, write_loss_by_position

    texts = load_texts(args.text)
    result = score_documents(model, tokenizer, texts, args.max_len, args.chunk, args.bucket)
    source = "the built-in corpus's held-out tail" if not args.text else ", ".join(args.text)
    print(f"{source}: perplexity {result.perplexity:.4f} (loss {result.loss:.4f} nats/token over {result.count} "
          f"predictions in {result.windows} windows of up to {args.max_len + 1} tokens)")
    print(f"{'positions':>15} {'predictions':>11} {'loss':>8}")
    for start, end, n, loss in result.by_position():
        print(f"{start:>7}-{end:<7} {n:>11} {loss:>8.4f}")
    csv_path, png_path = write_loss_by_position(result, out, f"{args.model}: loss by position")
    summary = {"model": args.model, "text": args.text or "builtin held-out tail", "max_len": args.max_len,
               "predictions": result.count, "windows": result.windows, "loss": result.loss,
               "perplexity": result.perplexity}
    (out / "perplexity.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'perplexity.json'}, {csv_path} and {png_path}")
    return 0


def _eval_niah(args, model, tokenizer, out: Path) -> int:
    from hybrid.evaluation.niah import niah_table, run_niah, write_niah

    try:
        results = run_niah(model, tokenizer, args.styles, args.contexts, args.depths, args.samples, args.seed,
                           args.chunk, log=lambda line: print(line, flush=True))
    except ValueError as err:  # a context too short for the prompt template, a depth outside [0, 1]
        raise UsageError(str(err)) from None
    table = niah_table(results)
    print(f"\n{'style':>8} " + "".join(f"{c:>8}" for c in args.contexts) + "   (accuracy %)")
    for style in args.styles:
        print(f"{style:>8} " + "".join(f"{100 * table[style, c]:>8.1f}" for c in args.contexts))
    csv_path, png_path = write_niah(results, out, f"{args.model}: needle in a haystack")
    print(f"wrote {csv_path} and {png_path}")
    return 0


def _eval_lm_eval(args, model, tokenizer, out: Path) -> int:
    try:
        from hybrid.evaluation.lm_eval_adapter import HybridEvalLM, run_lm_eval
    except ImportError as err:
        raise UsageError(f"--tasks needs lm-evaluation-harness: pip install 'kvm-hybrid[eval]' ({err})") from None
    try:
        output = run_lm_eval(HybridEvalLM(model=model, tokenizer=tokenizer, prefill_chunk=args.chunk), args.tasks,
                             args.include_path, args.limit, args.num_fewshot)
    except KeyError as err:  # lm-eval's answer to a task name it does not know, and only that
        if "is not a registered task" not in str(err):
            raise
        raise UsageError(f"--tasks: {err.args[0]}; `lm-eval ls tasks` lists them, --include-path adds a folder of "
                         "task YAMLs") from None
    for task, metrics in output["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool) and k != "sample_len")
        print(f"{task}: {shown}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval.json").write_text(json.dumps(output["results"], indent=1, default=float) + "\n")
    print(f"wrote {out / 'lm_eval.json'}")
    return 0


def add_lm_eval(commands) -> None:
    # prefix_chars="+": every argument, --options included, is lm-eval's (and --help shows lm-eval's help)
    lme = commands.add_parser("lm-eval", add_help=False, prefix_chars="+",
                              help="lm-evaluation-harness's own command line, with --model hybrid",
                              description="Run lm-eval's command line (all of its options) in a process where "
                                          "--model hybrid --model_args pretrained=CHECKPOINT names our models, e.g. "
                                          "hybrid lm-eval --model hybrid --model_args pretrained=runs/demo "
                                          "--tasks lambada_openai. Needs the 'eval' extra.")
    lme.add_argument("arguments", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    lme.set_defaults(run=_lm_eval)


def _lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import hybrid.evaluation.lm_eval_adapter  # noqa: F401  (registers --model hybrid)
    except ImportError as err:
        raise UsageError(f"lm-eval needs lm-evaluation-harness: pip install 'kvm-hybrid[eval]' ({err})") from None
    argv = sys.argv
    sys.argv = ["lm-eval", *args.arguments]  # lm-eval's command line reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0
