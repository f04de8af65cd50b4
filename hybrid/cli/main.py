"""The ``hybrid`` command line. ``hybrid --help`` lists the commands; each has its own ``--help``.

Handlers stay thin: they parse, call the module that does the work, and turn the toolkit's own
errors (bad recipes, checkpoints, states) into one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from blocks.config import ConfigError
from blocks.registry import UnknownMixerError
from blocks.state import StateError
from convert.errors import TeacherError
from hybrid.formats.checkpoint import CheckpointError
from hybrid.training.data import DataError
from hybrid.formats.published import PublishedCheckpointError
from hybrid.model.recipe import RECIPES_DIR, RecipeError, load_recipe
from hybrid.formats.model_source import UsageError
from hybrid.formats.tokenizer import TokenizerError
from hybrid.training.config import TrainError

USER_ERRORS = (RecipeError, ConfigError, UnknownMixerError, StateError, CheckpointError, TokenizerError,
               UsageError, PublishedCheckpointError, FileNotFoundError, DataError, TrainError, TeacherError)
DIVERGED_EXIT = 3  # `hybrid train` stopped by a NaN/inf loss


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    """A count that may be 0."""
    return 0 if text == "0" else _positive_int(text)


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
    from hybrid.cli.demo import run_demo

    run_demo(length=args.length, piece=args.piece, seed=args.seed)
    return 0


def _info(args: argparse.Namespace) -> int:
    from hybrid.model.describe import build_for_info, describe

    recipe = load_recipe(args.recipe)
    print(describe(recipe, build_for_info(recipe), args.context, args.batch))
    return 0


def _init(args: argparse.Namespace) -> int:
    from hybrid.formats.model_source import init_checkpoint

    print(f"wrote {init_checkpoint(args.recipe, args.out, args.seed)}")
    return 0


def _import_published(args: argparse.Namespace) -> int:
    from hybrid.formats.model_source import import_published

    print(f"wrote {import_published(args.source, args.out, args.compat)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hybrid.generation.generate import SamplingConfig
    from hybrid.formats.model_source import generate_text, open_model

    if args.prompt is None and args.prompt_file is None:
        raise UsageError("give the text to continue with --prompt TEXT or --prompt-file FILE")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    _, model, tokenizer = open_model(args.model, args.device, args.dtype, args.seed, sys.stderr)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None and not args.no_eos_stop else []
    for text in args.stop:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise UsageError(f"--stop {text!r} is {len(ids)} tokens; a stop must be exactly one token")
        stop += ids
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, stop_tokens=tuple(stop), seed=args.seed)
    with torch.inference_mode():
        generate_text(model, tokenizer, prompt, sampling, args.state, args.save_state, args.prefill_chunk)
    return 0


def _train(args: argparse.Namespace) -> int:
    from hybrid.training import distributed
    from hybrid.training.config import config_from_recipe, parse_overrides
    from hybrid.training.loop import TrainingDiverged, train

    recipe = load_recipe(args.recipe)
    overrides = parse_overrides(args.set)
    if args.out is not None:
        overrides["out_dir"] = args.out
    config = config_from_recipe(recipe, overrides)
    try:
        summary = train(recipe, config, resume=not args.no_resume, progress=not args.no_progress)
    except TrainingDiverged as err:
        print(f"hybrid train: stopped: {err}", file=sys.stderr)
        return DIVERGED_EXIT
    except KeyboardInterrupt:
        print("hybrid train: interrupted; run the same command again to resume from the newest checkpoint",
              file=sys.stderr)
        return 130
    if distributed.is_main():  # under torchrun every process returns the summary: one prints it
        print(summary.describe())
    return 0


def _convert(args: argparse.Namespace) -> int:
    from convert.distill import (
        STAGES,
        ConversionSettings,
        parse_set_options,
        run_conversion,
    )

    mixers, stages = parse_set_options(args.set)
    budgets = {stage: getattr(args, f"{stage}_tokens") for stage in STAGES}
    settings = ConversionSettings(args.teacher, args.out, args.plan, mixers, budgets, stages,
                                  tuple(args.data) if args.data else None, args.teacher_samples, args.temperature,
                                  args.teacher_layers, args.seed, args.threads, args.device, args.cache_dir,
                                  args.time_limit, args.keep_attention)
    try:
        result = run_conversion(settings, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("hybrid convert: interrupted; run the same command again to continue from the newest checkpoint",
              file=sys.stderr)
        return 130
    print(result.describe())
    if args.report and result.finished:
        return _report(args.out, args)
    return 0


def _convert_scores(args: argparse.Namespace) -> int:
    import json

    from convert.distill import _device, held_out_files, parse_set_options
    from convert.layer_scores import check_keep, eval_token_ids, format_scores, layer_scores
    from convert.plan import plan_student
    from convert.teacher import load_teacher

    mixers, stages = parse_set_options(args.set)
    if stages:
        raise UsageError(f"--set {', '.join(sorted(stages))}.*: convert-scores takes student mixer options only "
                         "(kvm.chunk_len=64); stage settings belong to `hybrid convert`")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher, n_layers=args.teacher_layers)
    if args.keep_attention is not None:
        check_keep(args.keep_attention, plan_student(teacher.recipe, args.plan, mixers))
    teacher.model.to(_device(args.device))
    ids = eval_token_ids(teacher, args.text or held_out_files(), args.eval_tokens, args.seq_len)
    scores = layer_scores(teacher, args.plan, mixers, ids, batch_size=args.batch_size, progress=not args.no_progress)
    print(format_scores(scores, args.keep_attention), end="")
    if args.out is not None:
        Path(args.out).write_text(json.dumps({**scores.to_dict(args.keep_attention), "mixer_options": mixers},
                                             indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _convert_report(args: argparse.Namespace) -> int:
    return _report(args.out, args)


def _report(out: str, args: argparse.Namespace) -> int:
    from convert.report import write_report

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _, text = write_report(out, eval_files=args.eval_text or None, eval_tokens=args.eval_tokens,
                           segment_len=args.segment_len, contexts=args.context, progress=not args.no_progress)
    print(text, end="")
    return 0


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-text", action="append", default=[], metavar="FILE",
                        help="held-out text to score (repeatable; default: the play kept out of the distillation data)")
    parser.add_argument("--eval-tokens", type=_token_count, default=8192,
                        help="held-out tokens to score (default 8k)")
    parser.add_argument("--segment-len", type=_positive_int, default=1024,
                        help="tokens per scored segment, each read from an empty state (default 1024)")
    parser.add_argument("--context", type=_token_count, nargs="+", default=[1024, 4096, 16384],
                        help="context lengths to report state bytes at (default 1k 4k 16k)")


def _recipes(args: argparse.Namespace) -> int:
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        first = path.read_text().lstrip().splitlines()[0] if path.read_text().strip() else ""
        summary = first.lstrip("# ").strip() if first.startswith("#") else ""
        print(f"{path.relative_to(RECIPES_DIR).with_suffix('')!s:<44} {summary}")
    return 0


def _output_dir(root: str, name: str) -> Path:
    """``root/<name as a folder name>``: where bench and eval write when no --out is given."""
    return Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_.")


def _bench(args: argparse.Namespace) -> int:
    from hybrid.evaluation.bench import (
        BenchSettings,
        header,
        parse_options,
        run_bench,
        single_mixer_config,
        subjects_for,
        summary,
        write_outputs,
    )
    from hybrid.model.model import HybridLM
    from hybrid.formats.model_source import DTYPES, open_model

    if (args.mixer is None) == (not args.models):
        raise UsageError("name the models to measure (recipes, checkpoint folders, training runs) or one mixer "
                         "with --mixer NAME, not both")
    if args.set and args.mixer is None:
        raise UsageError("--set gives options of the --mixer being measured; for a model, edit its recipe")
    if args.threads:
        torch.set_num_threads(args.threads)
    named = []
    if args.mixer is not None:
        config = single_mixer_config(args.mixer, parse_options(args.set), args.d_model)
        torch.manual_seed(args.seed)
        model = HybridLM(config).eval().to(device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None)
        named.append((" ".join([args.mixer, *args.set]), model))
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
    write_outputs(rows, args.out or _output_dir("bench_out", named[0][0]), ", ".join(n for n, _ in named), sys.stdout)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hybrid.formats.model_source import open_model

    if args.threads:
        torch.set_num_threads(args.threads)
    _, model, tokenizer = open_model(args.model, args.device, args.dtype, args.seed, sys.stderr)
    out = Path(args.out) if args.out else _output_dir("eval_out", args.model)
    with torch.inference_mode():
        if args.tasks:
            return _eval_lm_eval(args, model, tokenizer, out)
        if args.niah:
            return _eval_niah(args, model, tokenizer, out)
        return _eval_text(args, model, tokenizer, out)


def _eval_text(args, model, tokenizer, out: Path) -> int:
    import json

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
    import json

    try:
        from hybrid.evaluation.lm_eval_adapter import HybridEvalLM, run_lm_eval
    except ImportError as err:
        raise UsageError(f"--tasks needs lm-evaluation-harness: pip install 'kvm-hybrid[eval]' ({err})") from None
    output = run_lm_eval(HybridEvalLM(model=model, tokenizer=tokenizer, prefill_chunk=args.chunk), args.tasks,
                         args.include_path, args.limit, args.num_fewshot)
    for task, metrics in output["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool) and k != "sample_len")
        print(f"{task}: {shown}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval.json").write_text(json.dumps(output["results"], indent=1, default=float) + "\n")
    print(f"wrote {out / 'lm_eval.json'}")
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

    init = commands.add_parser("init", help="create a checkpoint folder with freshly initialised weights",
                               description="Build the model a recipe describes with random weights and save it "
                                           "as a checkpoint folder (recipe.yaml, model.safetensors, tokenizer).")
    init.add_argument("recipe", help="recipe file, or a name under recipes/")
    init.add_argument("out", help="checkpoint folder to write (an existing checkpoint there is replaced)")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init)

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text",
                              description="Continue a prompt with a checkpoint (or a recipe, with random weights), "
                                          "streaming the text; prints prefill time, decode tokens/s and the state "
                                          "memory by kind. --save-state keeps the state after the prompt and the "
                                          "new text; --state continues one (prompt caching).")
    gen.add_argument("model", help="checkpoint folder, training run folder (its newest checkpoint), "
                                    "or a recipe file/name (random weights)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-file", help="file whose text to continue (UTF-8)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (0: only read the prompt)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95; 1 = off)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop after this token (one token; repeatable). The tokenizer's end-of-text always stops")
    gen.add_argument("--no-eos-stop", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (and init seed for a recipe)")
    gen.add_argument("--state", help="a saved state (from --save-state) that the prompt continues")
    gen.add_argument("--save-state", metavar="FILE", help="save the state after prompt and output (safetensors)")
    gen.add_argument("--prefill-chunk", type=_positive_int, default=1024,
                     help="prompt tokens per forward during prefill (bounds memory; default 1024)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="weights and compute dtype (default: as saved)")
    gen.set_defaults(run=_generate)

    imp = commands.add_parser("import-published", help="convert a published KVM-paper checkpoint to a checkpoint folder",
                              description="Read a checkpoint in the published KVM code's format (recursal/KVM-paper: "
                                          "config.json or config.yaml + model.safetensors) and save it as a "
                                          "checkpoint folder that generate and train load.")
    imp.add_argument("source", help="published checkpoint folder, or its .safetensors file")
    imp.add_argument("out", help="checkpoint folder to write")
    imp.add_argument("--compat", action="store_true",
                     help="reproduce the published code's bf16 rounding of RoPE cos/sin and KVM state values "
                          "(what the released models were trained with; off: exact fp32 math)")
    imp.set_defaults(run=_import_published)

    trn = commands.add_parser("train", help="train a recipe's model (resumes from the last checkpoint)",
                              description="Train the model a recipe describes with the settings of its train: "
                                          "section (see hybrid/training/config.py for every key). Writes checkpoint folders "
                                          "(OUT/step_NNNNNN, loadable by generate), OUT/latest, OUT/metrics.jsonl "
                                          "and OUT/loss.png; run it again to continue from the newest checkpoint. "
                                          f"Exit code {DIVERGED_EXIT} when the loss becomes NaN/inf "
                                          "(the last good checkpoint is kept). Started by torchrun "
                                          "(torchrun --nproc_per_node=N -m hybrid train ...), it trains "
                                          "data-parallel (train.parallel: ddp or fsdp; batch_size is the global "
                                          "batch).")
    trn.add_argument("recipe", help="recipe file, or a name under recipes/")
    trn.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                     help="override a train: setting, the value read as YAML (repeatable), e.g. "
                          "--set train.lr=3e-4 --set train.data=[corpus.txt]")
    trn.add_argument("--out", help="output folder (default: train.out_dir, else runs/<recipe name>)")
    trn.add_argument("--no-resume", action="store_true",
                     help="start from step 0; refuses an output folder that already holds checkpoints")
    trn.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    trn.set_defaults(run=_train)

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
    conv.add_argument("out", help="output folder")
    conv.add_argument("--plan", required=True, help="layer plan, one letter per teacher layer: e.g. 'K*30', 'AKKK...'")
    conv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a student mixer option (kvm.chunk_len=64) or a stage setting (stage2.lr=3e-5, "
                           "stage1.seq_len=256: any train: key); repeatable")
    for number, default in (("1", 5_000_000), ("2", 20_000_000), ("3", 0)):
        conv.add_argument(f"--stage{number}-tokens", type=lambda t: 0 if t == "0" else _token_count(t),
                          default=default, metavar="N",
                          help=f"stage {number} token budget, e.g. 200k or 5m (default {default:,}; 0 skips it)")
    conv.add_argument("--data", action="append", metavar="PATH",
                      help="distillation text: .txt/.md/.jsonl files or folders (repeatable; default: the built-in "
                           "Shakespeare corpus without the held-out play)")
    conv.add_argument("--teacher-samples", type=lambda t: 0 if t == "0" else _token_count(t), default=0, metavar="N",
                      help="also distil on about N tokens of text sampled from the teacher (default 0)")
    conv.add_argument("--temperature", type=float, default=1.0, help="stage 2 KL temperature (default 1)")
    conv.add_argument("--teacher-layers", type=_positive_int, default=None,
                      help="use only the teacher's first N layers (quick trials)")
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    conv.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    conv.add_argument("--cache-dir", default=None, help="token cache folder (default: hybrid train's)")
    conv.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                      help="stop all stages after this long, with a checkpoint (run again to continue)")
    conv.add_argument("--keep-attention", type=_count, default=None, metavar="N",
                      help="choose the plan: --plan is the target (e.g. 'K*30'), and the N converted layers whose "
                           "restoring lowers the KL to the teacher most stay attention (see convert-scores; "
                           "scored on 4 sequences of stage 2's length of the distillation data)")
    conv.add_argument("--report", action="store_true", help="then write OUT/report.md (see convert-report)")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    _add_report_options(conv)
    conv.set_defaults(run=_convert)

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
    scs.add_argument("--eval-tokens", type=_token_count, default=2048, help="tokens to score (default 2k)")
    scs.add_argument("--seq-len", type=_positive_int, default=512,
                     help="tokens per sequence, each read from an empty state; must exceed the window (default 512)")
    scs.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per forward (default 4)")
    scs.add_argument("--keep-attention", type=_count, default=None, metavar="N",
                     help="also print the plan that keeps the N best layers as attention")
    scs.add_argument("--teacher-layers", type=_positive_int, default=None,
                     help="use only the teacher's first N layers (quick trials)")
    scs.add_argument("--out", help="write the scores as JSON to this file")
    scs.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    scs.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    scs.add_argument("--no-progress", action="store_true", help="no progress bar")
    scs.set_defaults(run=_convert_scores)

    rep = commands.add_parser("convert-report", help="perplexity beyond the window and state bytes of a conversion",
                              description="Score the teacher, the converted-at-init student and the student after "
                                          "each stage on held-out text (perplexity on the tokens beyond the KVM "
                                          "window), and compare decode state bytes with the teacher's KV cache. "
                                          "Writes OUT/report.md and OUT/report.json.")
    rep.add_argument("out", help="a `hybrid convert` output folder")
    rep.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    rep.add_argument("--no-progress", action="store_true", help="no status lines")
    _add_report_options(rep)
    rep.set_defaults(run=_convert_report)

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
    bench.add_argument("--d-model", type=_positive_int, default=768, help="model width for --mixer (default 768)")
    bench.add_argument("--contexts", type=_token_count, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                       help="context lengths T (default 1k 2k 4k 8k 16k 32k)")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="runs per measurement (median, min, max)")
    bench.add_argument("--steps", type=_positive_int, default=256,
                       help="decode steps averaged per run (default 256: a whole paper-sized KVM chunk)")
    bench.add_argument("--max-prefill", type=lambda t: 0 if t == "0" else _token_count(t), default=None,
                       metavar="T", help="measure prefill only up to this context (0: never; default: always)")
    bench.add_argument("--prefill-chunk", type=_token_count, default=None,
                       help="prefill tokens per forward (default: the whole context in one forward)")
    bench.add_argument("--no-baseline", action="store_true", help="do not measure the full-attention baseline")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", help="output folder (default bench_out/<first model>)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="weights and compute dtype (default: as saved)")
    bench.set_defaults(run=_bench)

    evl = commands.add_parser("eval", help="perplexity and loss by position, needle in a haystack, lm-eval tasks",
                              description="Evaluate a checkpoint. Default: perplexity and loss by position on text "
                                          "(--text; default the built-in corpus's held-out tail), writing "
                                          "loss_by_position.csv/.png. --niah: needle-in-a-haystack retrieval "
                                          "(RULER single-needle styles, generated offline). --tasks: "
                                          "lm-evaluation-harness tasks (the 'eval' extra). See hybrid/evaluation/perplexity.py and niah.py.")
    evl.add_argument("model", help="checkpoint folder, training run folder, or a recipe (random weights)")
    mode = evl.add_mutually_exclusive_group()
    mode.add_argument("--niah", action="store_true", help="needle-in-a-haystack retrieval instead of perplexity")
    mode.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval tasks instead of perplexity")
    evl.add_argument("--text", nargs="+", metavar="FILE", help="text/JSONL files or folders to score")
    evl.add_argument("--max-len", type=_token_count, default=32768,
                     help="tokens a window predicts; longer documents are cut into windows (default 32k)")
    evl.add_argument("--bucket", type=_positive_int, default=1024,
                     help="positions per loss-by-position bucket (default 1024; small ones for tiny models)")
    evl.add_argument("--chunk", type=_token_count, default=1024, help="tokens per forward (default 1024)")
    evl.add_argument("--styles", nargs="+", choices=["passkey", "word", "uuid"], default=["passkey", "word", "uuid"],
                     help="NIAH styles (RULER S1, S2, S3; default all)")
    evl.add_argument("--contexts", type=_token_count, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                     help="NIAH prompt lengths (default 1k 2k 4k 8k 16k 32k)")
    evl.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                     help="NIAH needle depths in the haystack, 0..1 (default 0 0.25 0.5 0.75 1)")
    evl.add_argument("--samples", type=_positive_int, default=1, help="NIAH prompts per style, context and depth")
    evl.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (e.g. a local task)")
    evl.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    evl.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    evl.add_argument("--seed", type=int, default=0, help="NIAH generator seed (and init seed for a recipe)")
    evl.add_argument("--threads", type=_positive_int, default=None,
                     help="torch threads (default: torch's; 1 is steadiest on a shared machine)")
    evl.add_argument("--out", help="output folder (default eval_out/<model>)")
    evl.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    evl.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="weights and compute dtype (default: as saved)")
    evl.set_defaults(run=_eval)
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
