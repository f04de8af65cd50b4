"""The conversion report: how close each stage got to the teacher, and what the student's state costs.

``hybrid convert-report OUT`` (``write_report``) reads a ``hybrid convert`` output folder and writes
``OUT/report.md`` and ``OUT/report.json``:

* perplexity **beyond the window** (``convert.evaluate.long_range_perplexity``: segments of
  ``segment_len`` tokens, each read from an empty state, scored at query positions >= the
  student's window) of the teacher, the converted-at-init student, and the student after each
  stage that ran, with the tokens each stage trained on;
* decode state bytes of the teacher (its KV cache) and of the student at chosen context lengths
  (``hybrid.model.state_shapes.state_at`` on the meta device), and their ratio.

Held-out text: by default the play(s) the conversion kept out of its data (``convert.distill.HELD_OUT``,
Hamlet from the built-in Shakespeare corpus); any other text files may be given, and text that the
distillation data contains is refused.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from convert.distill import CONVERSION_FILE, STAGES, check_disjoint
from convert.evaluate import long_range_perplexity, state_bytes
from convert.teacher import load_teacher
from hybrid.formats.checkpoint import load_checkpoint
from hybrid.formats.run_folder import TRAINER_JSON, latest_checkpoint
from hybrid.model.describe import human_bytes
from hybrid.training.metrics import read_metrics

DEFAULT_CONTEXTS = (1024, 4096, 16384)


def build_report(out: str | Path, eval_files: Sequence[str | Path] | None = None, eval_tokens: int = 8192,
                 segment_len: int = 1024, contexts: Sequence[int] = DEFAULT_CONTEXTS, progress: bool = True) -> dict:
    """The report's numbers (see the module docstring) as a JSON-ready dict."""
    out = Path(out)
    say = (lambda m: print(f"[{m}]", file=sys.stderr)) if progress else (lambda m: None)
    record_path = out / "stages" / CONVERSION_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{out} is not a `hybrid convert` output folder (no stages/{CONVERSION_FILE})")
    record = json.loads(record_path.read_text())
    files = [Path(f) for f in (eval_files or record["held_out"])]
    check_disjoint(record["data"], files)
    _, init, tokenizer = load_checkpoint(out / "stages" / "init")
    ids = torch.tensor(tokenizer.encode("\n".join(f.read_text(encoding="utf-8") for f in files))[:eval_tokens])
    window = record["window"]
    n_segments = len(ids) // segment_len
    scored = n_segments * (segment_len - 1 - window)
    say(f"scoring {n_segments} segments of {segment_len} tokens from {', '.join(f.name for f in files)}, "
        f"{scored} predictions beyond the {window}-token window")

    identity = record["identity"]
    teacher = load_teacher(identity["teacher"], n_layers=identity["teacher_layers"]).model
    rows = []

    def score(name: str, model, tokens_trained: int | None, extra: dict | None = None) -> None:
        start = time.monotonic()
        ppl = long_range_perplexity(model, ids, window, segment_len)
        rows.append({"model": name, "ppl_beyond_window": ppl, "tokens_trained": tokens_trained, **(extra or {})})
        say(f"{name}: perplexity {ppl:.3f} ({time.monotonic() - start:.0f} s)")

    score("teacher", teacher, None)
    score("converted at init", init, 0)
    for stage in STAGES:
        folder = latest_checkpoint(out / "stages" / stage)
        if folder is None:
            continue
        info = json.loads((folder / TRAINER_JSON).read_text())
        losses = [r["loss"] for r in read_metrics(out / "stages" / stage / "metrics.jsonl") if "loss" in r]
        _, model, _ = load_checkpoint(folder)
        score(f"after {stage}", model, info["tokens_seen"],
              {"steps": info["step"], "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "checkpoint": str(folder)})
        del model
    for row in rows:
        row["vs_teacher"] = row["ppl_beyond_window"] / rows[0]["ppl_beyond_window"]

    teacher_state, student_state = state_bytes(teacher, contexts), state_bytes(init, contexts)
    states = [{"context": n, "teacher": teacher_state[n], "student": student_state[n],
               "ratio": sum(student_state[n].values()) / sum(teacher_state[n].values())} for n in contexts]
    return {"teacher": identity["teacher"], "plan": record["plan_summary"],
            "layer_selection": record.get("layer_selection"), "window": window,
            "eval_text": [str(f) for f in files], "eval_tokens": len(ids), "segment_len": segment_len,
            "scored_predictions": scored, "budgets": record["budgets"], "perplexity": rows, "state": states}


def format_report(report: dict) -> str:
    """The report as Markdown: the perplexity table, the state table, and what was measured."""
    held_out = ", ".join(Path(f).name for f in report["eval_text"])
    lines = [f"Teacher `{report['teacher']}`, student {report['plan']}.",
             (f"Held-out text: {held_out} ({report['eval_tokens']} tokens in segments of {report['segment_len']}); "
              f"perplexity on the {report['scored_predictions']} predictions beyond the {report['window']}-token "
              "window."), "",
             *_selection_lines(report.get("layer_selection")),
             "| model | tokens trained | perplexity beyond window | vs teacher |", "|---|---:|---:|---:|"]
    for row in report["perplexity"]:
        trained = "" if row["tokens_trained"] is None else f"{row['tokens_trained']:,}"
        lines.append(f"| {row['model']} | {trained} | {row['ppl_beyond_window']:.2f} | {row['vs_teacher']:.3f} |")
    lines += ["", "| context | teacher KV cache | student state | student / teacher |", "|---:|---:|---:|---:|"]
    for row in report["state"]:
        kinds = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(row["student"].items()))
        lines.append(f"| {row['context']:,} | {human_bytes(sum(row['teacher'].values()))} | "
                     f"{human_bytes(sum(row['student'].values()))} ({kinds}) | {row['ratio']:.1%} |")
    return "\n".join(lines) + "\n"


def _selection_lines(selection: dict | None) -> list[str]:
    """Why the plan kept its attention layers (``hybrid convert --keep-attention``), if it was chosen."""
    if not selection:
        return []
    restored = {row["layer"]: row["kl_restored"] for row in selection["layers"]}
    alone = ", ".join(f"layer {i} {restored[i]:.3f}" for i in selection["kept"])
    return [f"Kept as attention: layers {selection['kept']}, the {selection['keep_attention']} of the target plan "
            f"{selection['target']} whose restoring alone lowered the KL to the teacher most at init (beyond the "
            f"window: fully converted {selection['kl_all']:.3f}; restored {alone or 'none'}).", ""]


def write_report(out: str | Path, **options) -> tuple[dict, str]:
    """``build_report`` and ``format_report``, written to ``OUT/report.json`` and ``OUT/report.md``."""
    report = build_report(out, **options)
    text = format_report(report)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (Path(out) / "report.md").write_text(text)
    return report, text
