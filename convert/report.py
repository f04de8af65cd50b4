"""The conversion report: the student against its teacher and against doing nothing clever.

``hybrid convert-report OUT`` (``write_report``) reads a ``hybrid convert`` output folder and writes
``OUT/report.md`` and ``OUT/report.json`` (machine-readable: the same numbers). On every held-out
domain (``convert.heldout``: kinds of text the distillation never saw, cut into segments of
``segment_len`` tokens, each read from an empty state) it scores, at the query positions beyond the
student's window (``convert.evaluate.long_range_predictions``):

* the teacher; the training-free baselines of ``convert.baselines`` (4 sink tokens + a sliding
  window at the student's own window, and at the student's state bytes); the converted-at-init
  student (and the all-converted target plan at init, when ``--keep-attention`` chose the plan);
  the student at every checkpoint each stage kept (``--set STAGE.ckpt_every=N``, ``STAGE.keep_last``:
  the curve of perplexity against tokens trained), the last one "after STAGE";
* per model: perplexity, and next-token top-1 agreement with the teacher;
* the teacher's and the final student's greedy continuations of ``convert.facts.FACT_PROMPTS``
  (after a preamble that puts them beyond the window), and how many agree;
* decode state bytes of the teacher (its KV cache) and of the student at chosen context lengths.

One line says whether the final student beats each baseline on every domain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from convert.baselines import SINK_LEN, equal_state_window, sink_window_model
from convert.distill import CONVERSION_FILE, STAGES, check_disjoint
from convert.evaluate import long_range_predictions, state_bytes
from convert.facts import AGREE_TOKENS, PREAMBLE_DOMAIN, fact_rows, greedy_continuations, preamble_ids
from convert.heldout import default_domains, file_domains
from convert.init import convert_teacher
from convert.teacher import load_teacher
from hybrid.formats.atomic import write_text
from hybrid.formats.checkpoint import load_checkpoint
from hybrid.formats.run_folder import TRAINER_JSON, step_folders
from hybrid.model.describe import human_bytes
from hybrid.model.model import HybridLM
from hybrid.training.metrics import read_metrics

DEFAULT_CONTEXTS = (1024, 4096, 16384)


@dataclasses.dataclass
class Scorer:
    """Scores models on the held-out domains' token ids beyond ``window``, against the teacher's top-1."""

    ids: dict[str, torch.Tensor]  # domain -> 1-D token ids
    window: int
    segment_len: int
    say: Callable[[str], None]
    teacher_top1: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def score(self, name: str, model: HybridLM, **extra) -> dict:
        """The row of one model: perplexity and top-1 agreement per domain (the first model scored is
        the teacher, whose top-1 tokens the others are compared with)."""
        start = time.monotonic()
        row = {"model": name, **extra, "perplexity": {}, "top1_agreement": {}}
        for domain, ids in self.ids.items():
            nll, top1 = long_range_predictions(model, ids, self.window, self.segment_len)
            row["perplexity"][domain] = math.exp(nll.double().mean().item())
            reference = self.teacher_top1.setdefault(domain, top1)
            row["top1_agreement"][domain] = (top1 == reference).double().mean().item()
        ppl = " / ".join(f"{v:.2f}" for v in row["perplexity"].values())
        self.say(f"{name}: perplexity {ppl} ({time.monotonic() - start:.0f} s)")
        return row


def build_report(out: str | Path, eval_files: Sequence[str | Path] | None = None, eval_tokens: int = 4096,
                 segment_len: int = 1024, contexts: Sequence[int] = DEFAULT_CONTEXTS, progress: bool = True) -> dict:
    """The report's numbers (see the module docstring) as a JSON-ready dict; ``eval_tokens`` per domain."""
    out = Path(out)
    say = (lambda m: print(f"[{m}]", file=sys.stderr)) if progress else (lambda m: None)
    record_path = out / "stages" / CONVERSION_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{out} is not a `hybrid convert` output folder (no stages/{CONVERSION_FILE})")
    record = json.loads(record_path.read_text())
    domains = file_domains(eval_files) if eval_files else default_domains()
    check_disjoint(record["data"], [d.path for d in domains])
    _, init, tokenizer = load_checkpoint(out / "stages" / "init")
    texts = {d.name: d.text() for d in domains}
    ids = {name: torch.tensor(tokenizer.encode(text)[:eval_tokens]) for name, text in texts.items()}
    window = record["window"]
    scorer = Scorer(ids, window, segment_len, say)
    scored = {name: len(x) // segment_len * (segment_len - 1 - window) for name, x in ids.items()}
    say(f"scoring {', '.join(f'{n} ({c} predictions)' for n, c in scored.items())} beyond the {window}-token window")

    identity = record["identity"]
    teacher = load_teacher(identity["teacher"], n_layers=identity["teacher_layers"])
    equal_window = equal_state_window(init, teacher.model, max(contexts))
    rows = [scorer.score("teacher", teacher.model, kind="teacher")]
    for label, w in (("own window", window), ("equal state", equal_window)):
        rows.append(scorer.score(f"{SINK_LEN} sinks + {w}-token window ({label})",
                                 sink_window_model(teacher, w), kind="baseline", baseline=label, window=w))
    rows.append(scorer.score("converted at init", init, kind="student", tokens_trained=0))
    selection = record.get("layer_selection")
    if selection:
        target, _, _ = convert_teacher(teacher, selection["target"], identity["mixers"])
        rows.append(scorer.score(f"target plan {selection['target']} at init", target.eval(), kind="target",
                                 tokens_trained=0))
    final = init
    for stage in STAGES:  # every checkpoint a stage kept: the curve of perplexity against tokens trained
        folders = step_folders(out / "stages" / stage)
        metrics = read_metrics(out / "stages" / stage / "metrics.jsonl") if folders else []
        for folder in folders:
            final = load_checkpoint(folder)[1]
            trained = _checkpoint_facts(folder, metrics)
            name = f"after {stage}" if folder == folders[-1] else f"{stage} at {trained['tokens_trained']:,} tokens"
            rows.append(scorer.score(name, final, kind="student", stage=stage, **trained))
    preamble_domain = PREAMBLE_DOMAIN if PREAMBLE_DOMAIN in texts else domains[0].name
    preamble = preamble_ids(tokenizer, texts[preamble_domain], window)
    facts = fact_rows(tokenizer, greedy_continuations(teacher.model, tokenizer, preamble),
                      greedy_continuations(final, tokenizer, preamble))
    teacher_state, student_state = state_bytes(teacher.model, contexts), state_bytes(init, contexts)
    states = [{"context": n, "teacher": teacher_state[n], "student": student_state[n],
               "ratio": sum(student_state[n].values()) / sum(teacher_state[n].values())} for n in contexts]
    return {"teacher": identity["teacher"], "plan": record["plan_summary"], "layer_selection": selection,
            "window": window, "sink_len": SINK_LEN, "equal_state_window": equal_window,
            "equal_state_context": max(contexts),
            "domains": [{"name": d.name, "source": d.source, "tokens": len(ids[d.name]),
                         "scored_predictions": scored[d.name]} for d in domains],
            "segment_len": segment_len, "budgets": record["budgets"],
            "stage_parameters": record.get("stage_parameters", {}), "teacher_samples": record.get("teacher_samples"),
            "models": rows,
            "verdict": verdict(rows), "facts": facts, "facts_agree": sum(f["agree"] for f in facts),
            "facts_preamble": preamble_domain,
            "fact_tokens": AGREE_TOKENS, "state": states}


def _checkpoint_facts(folder: Path, metrics: list[dict]) -> dict:
    """Tokens, steps and first/last loss (up to that step) of one of a stage's checkpoints, from the
    stage's ``metrics`` records."""
    info = json.loads((folder / TRAINER_JSON).read_text())
    losses = [r["loss"] for r in metrics if "loss" in r and r["step"] <= info["step"]]
    return {"tokens_trained": info["tokens_seen"], "steps": info["step"],
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "checkpoint": str(folder)}


def verdict(rows: list[dict]) -> dict:
    """Whether the last student row beats each baseline (lower perplexity) on every domain."""
    final = [r for r in rows if r["kind"] == "student"][-1]
    result = {"model": final["model"]}
    for base in (r for r in rows if r["kind"] == "baseline"):
        wins = {d: final["perplexity"][d] < p for d, p in base["perplexity"].items()}
        result[base["baseline"]] = {"window": base["window"], "beats_on": [d for d, w in wins.items() if w],
                                    "every_domain": all(wins.values())}
    return result


def verdict_line(report: dict) -> str:
    """One sentence: does the final student beat the sink + window baselines on every domain?"""
    v, n = report["verdict"], len(report["domains"])
    parts = []
    for label in ("own window", "equal state"):
        b = v[label]
        parts.append(f"{'beats' if b['every_domain'] else 'does not beat'} {report['sink_len']} sinks + "
                     f"{b['window']}-token window ({label}) on every domain ({len(b['beats_on'])}/{n})")
    return (f"**Verdict:** {v['model']} " + "; ".join(parts)
            + f" (equal state: the window whose KV cache takes the student's state bytes at "
              f"{report['equal_state_context']:,} tokens).")


def format_report(report: dict) -> str:
    """The report as Markdown."""
    names = [d["name"] for d in report["domains"]]
    trained = [f"{stage} {tokens:,} tokens ({report['stage_parameters'].get(stage, '?')} parameters)"
               for stage, tokens in report["budgets"].items() if tokens]
    samples = report.get("teacher_samples")
    data = f"; the data included {samples['tokens']:,} tokens sampled from the teacher" if samples else ""
    lines = [f"Teacher `{report['teacher']}`, student {report['plan']}.", "",
             f"Distilled: {', '.join(trained) or 'no stage'}{data}.", "", verdict_line(report), "",
             f"Held-out text, perplexity and top-1 agreement with the teacher on the predictions beyond the "
             f"{report['window']}-token window (segments of {report['segment_len']} tokens, each from an empty state):",
             ""]
    lines += [f"* {d['name']}: {d['source']}; {d['tokens']} tokens, {d['scored_predictions']} predictions"
              for d in report["domains"]]
    lines += ["", *_selection_lines(report.get("layer_selection")),
              "| model | tokens trained | " + " | ".join(f"{n} ppl" for n in names) + " | top-1 agreement |",
              "|---|---:|" + "---:|" * len(names) + "---:|"]
    for row in report["models"]:
        trained = "" if row.get("tokens_trained") is None else f"{row['tokens_trained']:,}"
        ppl = " | ".join(f"{row['perplexity'][n]:.2f}" for n in names)
        agree = "" if row["kind"] == "teacher" else "–".join(
            f"{x:.1%}" for x in sorted({min(row['top1_agreement'].values()), max(row['top1_agreement'].values())}))
        lines.append(f"| {row['model']} | {trained} | {ppl} | {agree} |")
    lines += ["", f"Factual prompts after {2 * report['window']} tokens of the {report['facts_preamble']} text: "
              f"{report['facts_agree']}/{len(report['facts'])} keep the teacher's first {report['fact_tokens']} "
              "greedy tokens.", "", "| prompt | teacher | student | same |", "|---|---|---|:-:|"]
    lines += [f"| {f['prompt']} | {_cell(f['teacher'])} | {_cell(f['student'])} | {'yes' if f['agree'] else 'no'} |"
              for f in report["facts"]]
    lines += ["", "| context | teacher KV cache | student state | student / teacher |", "|---:|---:|---:|---:|"]
    for row in report["state"]:
        kinds = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(row["student"].items()))
        lines.append(f"| {row['context']:,} | {human_bytes(sum(row['teacher'].values()))} | "
                     f"{human_bytes(sum(row['student'].values()))} ({kinds}) | {row['ratio']:.1%} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()


def _selection_lines(selection: dict | None) -> list[str]:
    """Why the plan kept its attention layers (``hybrid convert --keep-attention``), if it was chosen."""
    if not selection:
        return []
    restored = {row["layer"]: row["kl_restored"] for row in selection["layers"]}
    alone = ", ".join(f"layer {i} {restored[i]:.3f}" for i in selection["kept"])
    return [f"Kept as attention: layers {selection['kept']}, the {selection['keep_attention']} of the target plan "
            f"{selection['target']} whose restoring alone lowered the KL to the teacher most at init (beyond the "
            f"window: fully converted {selection['kl_all']:.3f}; restored {alone or 'none'}); the target plan at "
            "init is scored beside it.", ""]


def write_report(out: str | Path, **options) -> tuple[dict, str]:
    """``build_report`` and ``format_report``, written to ``OUT/report.json`` and ``OUT/report.md``."""
    report = build_report(out, **options)
    text = format_report(report)
    write_text(Path(out) / "report.json", json.dumps(report, indent=1) + "\n")
    write_text(Path(out) / "report.md", text)
    return report, text

