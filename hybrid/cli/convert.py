"""``hybrid convert``, ``convert-scores`` and ``convert-report``: a pretrained transformer converted into
a hybrid and distilled (``convert.distill``), its layers scored (``convert.layer_scores``), and the
conversion measured (``convert.report``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from hybrid.cli.options import (
    UsageError,
    add_device,
    add_seed,
    add_threads,
    count,
    number,
    output_file,
    output_folder,
    parse_set,
    positive_int,
    token_count,
    token_count_or_zero,
)
from hybrid.model.device import resolve_device


def add_convert(commands) -> None:
    conv = commands.add_parser("convert", help="convert a pretrained transformer into a hybrid and distil it",
                               description="Load a Llama-family teacher (HF folder or GGUF), replace the layers the "
                                           "plan names (K = KVM, G = GLA, ..., A = keep attention) with weights "
                                           "copied from it, and distil: stage 1 aligns each new mixer's output with "
                                           "the teacher attention's, stage 2 distils the logits (KL), optional "
                                           "stage 3 fine-tunes with cross-entropy. Writes OUT as a checkpoint folder "
                                           "(generate runs it; its recipe's train: section fine-tunes it) with the "
                                           "stage checkpoints under OUT/stages; run it again to resume. See "
                                           "convert/distill.py.")
    conv.add_argument("teacher", help="teacher: Hugging Face folder (config.json + safetensors) or .gguf file")
    conv.add_argument("out", type=output_folder, help="output folder")
    conv.add_argument("--plan", required=True, help="layer plan, one letter per teacher layer: e.g. 'K*30', 'AKKK...'")
    conv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a student mixer option (kvm.chunk_len=64) or a stage setting (stage2.lr=3e-5, "
                           "stage1.seq_len=256: any train: key); repeatable")
    for stage, default in (("1", 5_000_000), ("2", 20_000_000), ("3", 0)):
        conv.add_argument(f"--stage{stage}-tokens", type=token_count_or_zero,
                          default=default, metavar="N",
                          help=f"stage {stage} token budget, e.g. 200k or 5m (default {default:,}; 0 skips it)")
    conv.add_argument("--data", action="append", metavar="PATH",
                      help="distillation text: .txt/.md/.jsonl files or folders (repeatable; default: the built-in "
                           "Shakespeare corpus without the held-out play)")
    conv.add_argument("--teacher-samples", type=token_count_or_zero, default=None, metavar="N",
                      help="also distil on N tokens of text the teacher writes, in samples of up to 512 tokens "
                           "continuing varied openings (default: with the built-in data, a quarter of the stage "
                           "1 + 2 budgets, at most 2m; with --data, 0)")
    conv.add_argument("--temperature", type=number(0, math.inf, "a temperature > 0", low_open=True), default=1.0,
                      help="stage 2 KL temperature (default 1)")
    conv.add_argument("--teacher-layers", type=positive_int, default=None,
                      help="use only the teacher's first N layers (quick trials)")
    add_seed(conv)
    add_threads(conv, "torch CPU threads")
    add_device(conv)
    conv.add_argument("--cache-dir", default=None, help="token cache folder (default: hybrid train's)")
    conv.add_argument("--time-limit", type=number(0, math.inf, "a time > 0", low_open=True), default=None,
                      metavar="SECONDS",
                      help="stop all stages after this long, with a checkpoint (run again to continue)")
    conv.add_argument("--keep-attention", type=count, default=None, metavar="N",
                      help="choose the plan: --plan is the target (e.g. 'K*30'), and the N converted layers whose "
                           "restoring lowers the KL to the teacher most stay attention (see convert-scores; "
                           "scored on 4 sequences of stage 2's length of the distillation data)")
    conv.add_argument("--report", action="store_true", help="then write OUT/report.md (see convert-report)")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    conv.add_argument("--tensorboard", action="store_true",
                      help="also write each stage's metrics as TensorBoard events to OUT/stages/STAGE/tensorboard "
                           "(STAGE.tensorboard=true for every stage with a budget; needs the tensorboard package)")
    _add_report_options(conv)
    conv.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    from convert.distill import STAGES, ConversionSettings, run_conversion
    from hybrid.cli.train import DIVERGED_EXIT
    from hybrid.training.loop import TrainingDiverged

    mixers, stages = parse_set_options(args.set)
    budgets = {stage: getattr(args, f"{stage}_tokens") for stage in STAGES}
    if args.tensorboard:
        for stage in STAGES:
            if budgets[stage]:
                stages.setdefault(stage, {}).setdefault("tensorboard", True)
    settings = ConversionSettings(args.teacher, args.out, args.plan, mixers, budgets, stages,
                                  tuple(args.data) if args.data else None, args.teacher_samples, args.temperature,
                                  args.teacher_layers, args.seed, args.threads, args.device, args.cache_dir,
                                  args.time_limit, args.keep_attention)
    try:
        result = run_conversion(settings, progress=not args.no_progress)
    except TrainingDiverged as err:
        print(f"hybrid convert: stopped: {err} (for a conversion stage: --set STAGE.lr=..., STAGE.warmup_steps=..., "
              "STAGE.grad_clip=...)", file=sys.stderr)
        return DIVERGED_EXIT
    except KeyboardInterrupt:
        print("hybrid convert: interrupted; run the same command again to continue from the newest checkpoint",
              file=sys.stderr)
        return 130
    print(result.describe())
    if args.report and result.finished:
        return _convert_report(args)
    return 0


def add_convert_scores(commands) -> None:
    scs = commands.add_parser("convert-scores", help="score each layer of a conversion plan: the KL gain of keeping it",
                              description="Convert the teacher by the target plan (at init, no training) and measure "
                                          "KL(teacher || student) beyond the KVM window, fully converted and with "
                                          "each converted layer alone restored to the teacher's attention. A layer's "
                                          "score is how much restoring it lowers the KL; prints the per-layer table "
                                          "(rank 1 = most worth keeping). See convert/layer_scores.py.")
    scs.add_argument("teacher", help="teacher: Hugging Face folder (config.json + safetensors) or .gguf file")
    scs.add_argument("--plan", required=True, help="target layer plan, e.g. 'K*30' (see hybrid convert)")
    scs.add_argument("--set", action="append", default=[], metavar="MIXER.OPTION=VALUE",
                     help="a student mixer option, e.g. kvm.chunk_len=64 (repeatable)")
    scs.add_argument("--text", action="append", default=[], metavar="FILE",
                     help="text to score on (repeatable; default: the play kept out of the distillation data)")
    scs.add_argument("--eval-tokens", type=token_count, default=2048, help="tokens to score (default 2k)")
    scs.add_argument("--seq-len", type=positive_int, default=512,
                     help="tokens per sequence, each read from an empty state; must exceed the window (default 512)")
    scs.add_argument("--batch-size", type=positive_int, default=4, help="sequences per forward (default 4)")
    scs.add_argument("--keep-attention", type=count, default=None, metavar="N",
                     help="also print the plan that keeps the N best layers as attention")
    scs.add_argument("--teacher-layers", type=positive_int, default=None,
                     help="use only the teacher's first N layers (quick trials)")
    scs.add_argument("--out", type=output_file, help="write the scores as JSON to this file")
    add_threads(scs, "torch CPU threads")
    add_device(scs)
    scs.add_argument("--no-progress", action="store_true", help="no progress bar")
    scs.set_defaults(run=_convert_scores)


def _convert_scores(args: argparse.Namespace) -> int:
    from convert.distill import held_out_files
    from convert.layer_scores import check_keep, eval_token_ids, format_scores, layer_scores
    from convert.plan import plan_student
    from convert.teacher import load_teacher

    mixers, stages = parse_set_options(args.set)
    if stages:
        raise UsageError(f"--set {', '.join(sorted(stages))}.*: convert-scores takes student mixer options only "
                         "(kvm.chunk_len=64); stage settings belong to `hybrid convert`")
    teacher = load_teacher(args.teacher, n_layers=args.teacher_layers)
    if args.keep_attention is not None:
        check_keep(args.keep_attention, plan_student(teacher.recipe, args.plan, mixers))
    teacher.model.to(resolve_device(args.device))
    ids = eval_token_ids(teacher, args.text or held_out_files(), args.eval_tokens, args.seq_len)
    scores = layer_scores(teacher, args.plan, mixers, ids, batch_size=args.batch_size, progress=not args.no_progress)
    print(format_scores(scores, args.keep_attention), end="")
    if args.out is not None:
        Path(args.out).write_text(json.dumps({**scores.to_dict(args.keep_attention), "mixer_options": mixers},
                                             indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def add_convert_report(commands) -> None:
    rep = commands.add_parser("convert-report", help="perplexity beyond the window and state bytes of a conversion",
                              description="Score the teacher, the converted-at-init student and the student after "
                                          "each stage on held-out text (perplexity on the tokens beyond the KVM "
                                          "window), and compare decode state bytes with the teacher's KV cache. "
                                          "Writes OUT/report.md and OUT/report.json.")
    rep.add_argument("out", help="a `hybrid convert` output folder")
    add_threads(rep, "torch CPU threads")
    rep.add_argument("--no-progress", action="store_true", help="no status lines")
    _add_report_options(rep)
    rep.set_defaults(run=_convert_report)


def _convert_report(args: argparse.Namespace) -> int:
    """``hybrid convert-report OUT``, and ``hybrid convert --report``'s last step."""
    from convert.report import write_report

    _, text = write_report(args.out, eval_files=args.eval_text or None, eval_tokens=args.eval_tokens,
                           segment_len=args.segment_len, contexts=args.context, progress=not args.no_progress)
    print(text, end="")
    return 0


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-text", action="append", default=[], metavar="FILE",
                        help="held-out text to score, one domain per file (repeatable; default: four kinds of text the "
                             "distillation never sees: the held-out play, Python's licence, IDLE's release notes, the "
                             "Python language reference)")
    parser.add_argument("--eval-tokens", type=token_count, default=4096,
                        help="held-out tokens to score per domain (default 4k)")
    parser.add_argument("--segment-len", type=positive_int, default=1024,
                        help="tokens per scored segment, each read from an empty state (default 1024)")
    parser.add_argument("--context", type=token_count, nargs="+", default=[1024, 4096, 16384],
                        help="context lengths to report state bytes at (default 1k 4k 16k)")


def parse_set_options(items: Sequence[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """``hybrid convert --set`` items -> (student mixer options, stage settings).

    ``kvm.chunk_len=64`` sets an option of the student's ``kvm`` mixer; ``stage2.lr=3e-5`` a setting
    of a stage (any ``train:`` key). Values are read as YAML; ``3e-5`` (YAML 1.1 reads it as a string)
    is taken as the number it is."""
    from convert.distill import STAGES

    syntax = "MIXER.OPTION=VALUE (kvm.chunk_len=64) or STAGE.SETTING=VALUE (stage2.lr=3e-5)"
    mixers: dict[str, dict] = {}
    stages: dict[str, dict] = {}
    pairs = parse_set(items, syntax, lambda parts: None if len(parts) == 2 and all(parts) else f"expected {syntax}")
    for (owner, name), value in pairs:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        (stages if owner in STAGES else mixers).setdefault(owner, {})[name] = value
    return mixers, stages
