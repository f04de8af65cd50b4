"""Which layers to keep as attention: each converted layer scored by how much restoring it helps.

::

    scores = layer_scores(teacher, "K*30", {"kvm": {"chunk_len": 64}}, ids)   # ids: (B, T), T > window
    plan, rows = choose_plan(scores, 3)    # "KKAK...": the 3 best layers kept as attention
    print(format_scores(scores, 3))        # hybrid convert-scores

The target plan's student at init (``convert.init``) is measured against the teacher, once fully
converted and once per converted layer ``i`` with only that layer restored to the teacher's
attention. The measure is ``convert.losses.kl_divergence`` (KL(teacher || student), mean per token)
at the query positions **beyond the student's window** (``convert.evaluate.window_len``): inside it
a KVM / BSWA student equals the teacher, so those positions carry no signal and sequences that do
not reach past the window are refused. ``score_i = KL_all - KL_restored_i``: how much keeping
layer ``i`` as attention closes the gap; it can be negative (the layer's attention does not fit
the converted layers around it). Each layer is restored alone: the gains of two layers need not add
up. ``hybrid convert --keep-attention N`` scores on its distillation data
(``convert.distill.select_layers``), ``hybrid convert-scores`` by default on the held-out play.

A one-restored student is the converted student with the teacher's attention module put back in
layer ``i`` (``restore_layers``), not a fresh conversion: no weights are copied and the other
layers are the very same modules. For KVM / BSWA targets this is exactly the conversion with ``A``
at ``i`` (their init is deterministic; ``tests/test_layer_scores.py`` checks it); for LRNN targets it
keeps the other layers' fresh init as in the fully converted student, so the score measures layer
``i`` alone. Plans whose layers are linked across depth (RWKV-7's ``v_first`` stream from its first
layer, value residuals) are refused: restoring the layer that starts the stream is a different
model than either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from convert.errors import TeacherError
from convert.evaluate import window_len
from convert.init import init_student
from convert.losses import kl_divergence
from convert.plan import KEEP, LayerPlan, parse_layers, plan_student
from convert.teacher import Teacher
from hybrid.model.model import HybridLM

DEFAULT_SEQUENCES = 4  # `hybrid convert --keep-attention`: sequences of stage 2's length scored


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """The measurement of ``layer_scores``: KL of the fully converted student (``kl_all``) and, per
    converted layer, of the student with only that layer restored (``restored``)."""

    teacher: str  # the teacher's source
    target: str  # the target plan, one letter per teacher layer ("KKKK")
    mixers: tuple[str, ...]  # the target student's mixer per layer
    kl_all: float
    restored: dict[int, float]
    window: int  # positions before it are not scored
    sequences: int
    seq_len: int

    @property
    def positions(self) -> int:
        """Scored query positions over all sequences."""
        return self.sequences * (self.seq_len - self.window)

    def score(self, layer: int) -> float:
        """How much restoring ``layer`` lowers the KL."""
        return self.kl_all - self.restored[layer]

    def ranking(self) -> list[int]:
        """Converted layers, highest score first (ties: the lower index first)."""
        return sorted(self.restored, key=lambda i: (-self.score(i), i))

    def table(self, keep: int = 0) -> list[dict]:
        """Per converted layer: layer, mixer, kl_restored, score, rank (1 = best) and whether the
        ``keep`` best are kept as attention."""
        rank = {layer: r for r, layer in enumerate(self.ranking(), 1)}
        return [{"layer": i, "mixer": self.mixers[i], "kl_restored": kl, "score": self.score(i), "rank": rank[i],
                 "kept": rank[i] <= keep} for i, kl in sorted(self.restored.items())]

    def to_dict(self, keep: int | None = None) -> dict:
        """JSON-ready: the measurement, and with ``keep`` the plan ``choose_plan`` makes of it."""
        record = {"teacher": self.teacher, "target": self.target, "window": self.window, "sequences": self.sequences,
                  "seq_len": self.seq_len, "positions": self.positions, "kl_all": self.kl_all,
                  "layers": self.table(keep or 0)}
        if keep is not None:
            plan, _ = choose_plan(self, keep)
            record.update(keep_attention=keep, plan=plan, kept=sorted(self.ranking()[:keep]))
        return record


def check_keep(keep: int, plan: LayerPlan) -> None:
    """Refuse keeping more layers as attention than the target plan converts (before any scoring)."""
    _check_keep(keep, plan.converted)


def _check_keep(keep: int, converted: Sequence[int]) -> None:
    if not 0 <= keep <= len(converted):
        raise TeacherError(f"cannot keep {keep} layers as attention: the target plan converts {len(converted)} "
                           f"(layers {sorted(converted)}); choose 0..{len(converted)}")


def choose_plan(scores: LayerScores, keep: int) -> tuple[str, list[dict]]:
    """The target plan with its ``keep`` highest-scoring layers kept as attention (``A``), as a
    string of letters ``plan_student`` reads, and the per-layer table marking them."""
    _check_keep(keep, list(scores.restored))
    kept = set(scores.ranking()[:keep])
    return "".join(KEEP if i in kept else x for i, x in enumerate(scores.target)), scores.table(keep)


@contextlib.contextmanager
def restore_layers(student: HybridLM, teacher: HybridLM, layers: Iterable[int]) -> Iterator[HybridLM]:
    """``student`` with the mixers of ``layers`` replaced, in place, by the teacher's modules (the
    same objects, not copies) until the block exits. Only for forward passes: ``student.config``
    still names the converted mixers."""
    kept = {i: student.blocks[i].mixer for i in layers}
    try:
        for i in kept:
            student.blocks[i].mixer = teacher.blocks[i].mixer
        yield student
    finally:
        for i, mixer in kept.items():
            student.blocks[i].mixer = mixer


def check_restorable(plan: LayerPlan) -> None:
    """Refuse plans whose converted layers pass streams to later layers (see the module docstring)."""
    rwkv = [i for i, m in enumerate(plan.student_mixers) if m == "rwkv7"]
    if len(rwkv) > 1:
        raise TeacherError(f"layer scores: layer {rwkv[0]} starts the RWKV-7 v_first stream that layers "
                           f"{rwkv[1:]} read, so restoring it alone is not defined; keep it (A) or give it "
                           "another mixer in the target plan")
    linked = [i for i in plan.converted if getattr(plan.student.model.layers[i].options, "value_residual", False)]
    if linked:
        raise TeacherError(f"layer scores: layers {linked} use value_residual, which links them to the first "
                           "layer of their group; score the plan without it (the default)")


def as_batch(tokens: torch.Tensor) -> torch.Tensor:
    """Evaluation token ids (T,) or (B, T) -> (B, T) int64."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2) or tokens.dtype not in (torch.long,
                                                                                                   torch.int32):
        raise TeacherError(f"evaluation tokens must be integer ids of shape (T,) or (B, T), got "
                           f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    return (tokens[None] if tokens.dim() == 1 else tokens).long()


@torch.no_grad()
def layer_scores(teacher: Teacher, layers: str | Sequence[int] | Sequence[str], mixers: dict[str, dict] | None,
                 tokens: torch.Tensor, to: str | None = None, batch_size: int = 4, progress: bool = True
                 ) -> LayerScores:
    """Score every converted layer of the target plan ``layers`` (``convert.plan``; ``mixers`` and
    ``to`` as for ``plan_student``) on ``tokens`` (T,) or (B, T), on the teacher model's device."""
    from tqdm.auto import tqdm

    plan = plan_student(teacher.recipe, layers, mixers, to)
    if not plan.converted:
        raise TeacherError(f"the plan {layers!r} converts no layer: nothing to score")
    check_restorable(plan)
    ids = as_batch(tokens)  # (B, T)
    window = window_len(plan.student.model)
    if ids.shape[1] <= window:
        raise TeacherError(f"the evaluation sequences have {ids.shape[1]} tokens, within the student's "
                           f"{window}-token window, where it equals the teacher: score sequences longer than "
                           f"{window} tokens (--seq-len)")
    model = teacher.model
    student = init_student(model, plan).to(model.embed.weight).eval()  # the teacher's device and dtype
    totals = dict.fromkeys((None, *plan.converted), 0.0)  # None: the fully converted student
    rows = ids.split(batch_size)
    with tqdm(total=len(rows) * len(totals), unit="pass", desc="layer scores", disable=not progress,
              file=sys.stderr) as bar:
        for x in rows:
            x = x.to(model.device)
            target = model(x).logits[:, window:]  # (b, T - window, V)
            for layer in totals:
                with restore_layers(student, model, () if layer is None else (layer,)):
                    kl = kl_divergence(student(x).logits[:, window:], target)
                totals[layer] += kl.item() * len(x)  # batchmean over tokens: weight by this batch's share
                bar.update()
    n = len(ids)
    letters = parse_layers(layers, len(plan.student_mixers), to)
    return LayerScores(teacher.source, "".join(letters), plan.student_mixers, totals.pop(None) / n,
                       {i: v / n for i, v in totals.items()}, window, n, ids.shape[1])


def as_sequences(ids, seq_len: int, source: str) -> torch.Tensor:
    """1-D token ids (a list or array) -> (len // seq_len, seq_len) int64; a shorter tail is dropped."""
    ids = torch.as_tensor(ids, dtype=torch.long)  # (N,)
    n = len(ids) // seq_len
    if n == 0:
        raise TeacherError(f"{source}: {len(ids)} tokens are fewer than one sequence of {seq_len}: "
                           "give more text or shorter sequences")
    return ids[:n * seq_len].view(n, seq_len)


def eval_token_ids(teacher: Teacher, files: Sequence[str | Path], n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``files`` (joined by newlines; the teacher's tokenizer) as
    (n_tokens // seq_len, seq_len) int64."""
    tokenizer = teacher.text_tokenizer()
    text = "\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    return as_sequences(tokenizer.encode(text)[:n_tokens], seq_len, ", ".join(str(f) for f in files))


def format_scores(scores: LayerScores, keep: int | None = None) -> str:
    """The per-layer table (``hybrid convert-scores``), with the chosen plan when ``keep`` is given."""
    lines = [f"target plan {scores.target}: KL(teacher || student) on {scores.positions} positions beyond the "
             f"{scores.window}-token window ({scores.sequences} x {scores.seq_len} tokens)",
             f"fully converted: KL {scores.kl_all:.4f}", "",
             f"{'layer':>5}  {'mixer':<14} {'KL restored':>11} {'score':>8} {'rank':>5}" + ("  kept" if keep else "")]
    for row in scores.table(keep or 0):
        lines.append(f"{row['layer']:>5}  {row['mixer']:<14} {row['kl_restored']:>11.4f} {row['score']:>8.4f} "
                     f"{row['rank']:>5}" + ("     A" if row["kept"] else ""))
    if keep is not None:
        plan, _ = choose_plan(scores, keep)
        lines += ["", f"plan keeping the {keep} best as attention: {plan}"]
    return "\n".join(lines) + "\n"
