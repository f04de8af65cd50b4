"""Layer plans: which of a teacher's layers become KVM, which an LRNN mixer, which stay attention.

A plan is written like a recipe's layer pattern, one letter per teacher layer::

    plan_student(teacher.recipe, "K*30")                  # every layer KVM
    plan_student(teacher.recipe, "AKKK...")               # cycle "AKKK" over all layers (truncated)
    plan_student(teacher.recipe, "A K*28 A", {"kvm": {"chunk_len": 64}})
    plan_student(teacher.recipe, [3, 7, 11], to="gla")    # only these layer indices change

Letters: ``A`` keeps the teacher's layer as it is (attention, or sliding window for a windowed
teacher); ``K`` kvm, ``B`` bswa, ``S`` swa, ``G`` gla, ``R`` rwkv7, ``M`` mamba2, ``D`` gated_deltanet (the
registry's symbols). A trailing ``...`` (optionally ``*...``) cycles the pattern to the teacher's
depth.

Student options start from what makes the copy of the teacher's attention exact (``student_defaults``):

* ``kvm`` / ``bswa`` / ``swa``: the teacher's projection options (heads, GQA, head_dim, biases, q/k norm,
  ``rope_style: llama``, theta), no token shift, no value residual, and for KVM the mean read
  (``state_read: mean``, ``use_vlens: false``) of the rotated keys (``state_key_zero_dims: 0``),
  ``SINK_LEN`` sink slots and a learned offset on the other slots' logits (``state_offset: true``,
  from 0): see ``convert.init`` for why. ``mixers={"kvm": {...}}`` may set any KVM-only or window option
  (chunk_len, n_bswa_chunks, budget, window, sink_len, ...); changing a projection option would
  break the copy and raises ``TeacherError``. ``S*N`` with ``{"swa": {"window": W, "sink_len": n}}``
  is StreamingLLM on the teacher, without training (``convert.baselines``).
* ``gla``: heads and key/value widths of the teacher (``expand_k = expand_v = H*d / D``, GQA groups
  ``num_kv_heads``), so q/k/v/o copy as they are.
* ``gated_deltanet``: ``num_heads = H``, ``head_dim = d``, ``expand_v = 1`` (k and v are the
  teacher's, repeated over each GQA group).
* ``rwkv7``: ``head_dim = d`` (r/k/v/o copy when ``H*d == D``, k and v repeated over the groups).
* ``mamba2``: its own defaults; nothing is copied (see ``convert.init``).

User options win over these defaults (except the projection options of ``kvm`` / ``bswa`` / ``swa``); shapes
that then no longer match are simply not copied (the plan's ``copied`` lists what was).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from blocks.config import ConfigError
from blocks.projection import ProjectionConfig
from blocks.registry import UnknownMixerError, get_mixer
from convert.errors import TeacherError
from hybrid.model.recipe import (
    ModelConfig,
    Recipe,
    RecipeError,
    expand_pattern,
    model_to_dict,
    recipe_from_dict,
)

KEEP = "A"  # the plan letter that keeps a teacher layer
SINK_LEN = 4  # StreamingLLM's four attention sinks: a KVM student's sink slots, the baselines' sinks
_LETTERS = {"K": "kvm", "B": "bswa", "S": "swa", "G": "gla", "R": "rwkv7", "M": "mamba2", "D": "gated_deltanet"}
_PROJECTION_FIELDS = tuple(f.name for f in dataclasses.fields(ProjectionConfig))


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What a conversion does, layer by layer.

    ``student``: the student recipe; ``teacher_mixers`` / ``student_mixers``: registry mixer per
    layer; ``converted``: indices of the layers whose mixer changes; ``copied``: per converted layer,
    the student parameters initialised from the teacher's attention (filled by ``convert.init``)."""

    student: Recipe
    teacher_mixers: tuple[str, ...]
    student_mixers: tuple[str, ...]
    converted: tuple[int, ...]
    copied: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def letters(self) -> str:
        """The plan as one letter per layer: ``A`` where the teacher's layer is kept, else its mixer's symbol."""
        return "".join(KEEP if i not in self.converted else get_mixer(m).symbol
                       for i, m in enumerate(self.student_mixers))

    def summary(self) -> str:
        return f"{len(self.converted)}/{len(self.student_mixers)} layers converted: {self.letters}"


def parse_layers(layers: str | Sequence[int] | Sequence[str], n_layers: int, to: str | None = None) -> list[str]:
    """The plan's letter per layer (``A`` = keep) from a pattern, a list of letters/mixer names, or a
    list of layer indices (which become ``to``)."""
    if isinstance(layers, str):
        text = layers.strip()
        cycle = text.endswith("...")
        if cycle:
            text = text[:-3].rstrip().removesuffix("*").rstrip()
        try:
            letters = expand_pattern(text, "layers")
        except ConfigError as err:
            raise TeacherError(f"layer plan: {err}") from None
        if cycle:
            letters = (letters * (n_layers // len(letters) + 1))[:n_layers]
    elif all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        if to is None:
            raise TeacherError("a plan given as layer indices needs to= (the mixer they become, e.g. 'kvm')")
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise TeacherError(f"layer plan: indices {bad} are outside the teacher's {n_layers} layers")
        letter = _letter(to)
        letters = [letter if i in set(layers) else KEEP for i in range(n_layers)]
    else:
        letters = [_letter(str(item)) for item in layers]
    if len(letters) != n_layers:
        raise TeacherError(f"layer plan {layers!r} gives {len(letters)} layers, the teacher has {n_layers} "
                           "(end a pattern with '...' to cycle it)")
    unknown = sorted({x for x in letters if x != KEEP and x not in _LETTERS})
    if unknown:
        raise TeacherError(f"layer plan: unknown letters {unknown}; use A (keep) or "
                           + ", ".join(f"{k}={v}" for k, v in _LETTERS.items()))
    return letters


def _letter(item: str) -> str:
    if item == KEEP or item in _LETTERS:
        return item
    by_name = {v: k for k, v in _LETTERS.items()}
    if item in by_name:
        return by_name[item]
    if item == "attention":
        return KEEP
    raise TeacherError(f"layer plan: {item!r} is neither a plan letter nor a convertible mixer "
                       f"({', '.join(_LETTERS.values())}, or attention to keep)")


def student_defaults(mixer: str, teacher: ModelConfig) -> dict[str, Any]:
    """Options of a student mixer that make the teacher's attention copy exact (see module docstring)."""
    attn = teacher.layers[0].options  # every teacher layer shares the projection options
    projection = {name: getattr(attn, name) for name in _PROJECTION_FIELDS}
    projection.update(token_shift=False, value_residual=False)
    h, hkv, d, dm = attn.num_heads, attn.num_kv_heads or attn.num_heads, attn.head_dim, teacher.d_model
    if mixer == "kvm":
        return {**projection, "state_key_zero_dims": 0, "state_read": "mean", "use_vlens": False,
                "sink_len": SINK_LEN, "state_offset": True}
    if mixer in ("bswa", "swa"):
        return projection
    if mixer == "gla":
        return {"num_heads": h, "num_kv_heads": hkv, "expand_k": h * d / dm, "expand_v": h * d / dm}
    if mixer == "gated_deltanet":
        return {"num_heads": h, "head_dim": d, "expand_v": 1.0}
    if mixer == "rwkv7":
        return {"head_dim": d, "num_heads": None} if h * d == dm else {}
    return {}


def plan_student(teacher: Recipe, layers: str | Sequence[int] | Sequence[str],
                 mixers: dict[str, dict] | None = None, to: str | None = None) -> LayerPlan:
    """The student recipe for ``teacher`` under a layer plan (see the module docstring).

    ``mixers``: options per student mixer name (``{"kvm": {"chunk_len": 64}}``), over ``student_defaults``.
    The student's embedding, norms, MLPs, head and kept layers are the teacher's exactly."""
    base = teacher.model
    letters = parse_layers(layers, base.n_layers, to)
    mixers = dict(mixers or {})
    used = {_LETTERS[x] for x in letters if x != KEEP}
    extra = sorted(set(mixers) - used)
    if extra:
        raise TeacherError(f"options given for mixers the plan does not use: {extra} (plan uses {sorted(used) or 'none'})")
    data = model_to_dict(base)
    names = list(data["layers"])
    table = {n: data["mixers"][n] for n in dict.fromkeys(names)}
    for i, letter in enumerate(letters):
        if letter == KEEP:
            continue
        mixer = _LETTERS[letter]
        names[i] = mixer
        if mixer not in table:
            options = mixers.get(mixer, {})
            if mixer in ("kvm", "bswa", "swa"):
                clash = {k: v for k, v in options.items() if k in _PROJECTION_FIELDS and k not in ("token_shift", "value_residual")
                         and v != student_defaults(mixer, base)[k]}
                if clash:
                    raise TeacherError(f"mixers.{mixer}: {clash} would change the projections copied from the "
                                       "teacher's attention; only the KVM/window options may be set")
            table[mixer] = {**student_defaults(mixer, base), **options}
        elif any(table[mixer].get(k) != v for k, v in mixers.get(mixer, {}).items()):  # the teacher's own (swa)
            raise TeacherError(f"mixers.{mixer}: the teacher's layers are {mixer} already, and a recipe holds one "
                               "set of options per mixer; convert to another mixer or keep the teacher's options")
    data["layers"] = names
    data["mixers"] = {n: table[n] for n in dict.fromkeys(names)}
    try:
        student = recipe_from_dict({"model": data, "tokenizer": teacher.tokenizer}, source=f"student of {teacher.source}")
    except (RecipeError, UnknownMixerError) as err:
        raise TeacherError(f"the student recipe is not valid: {err}") from None
    teacher_mixers = tuple(layer.mixer for layer in base.layers)
    student_mixers = tuple(layer.mixer for layer in student.model.layers)
    converted = tuple(i for i, x in enumerate(letters) if x != KEEP)
    return LayerPlan(student, teacher_mixers, student_mixers, converted)
