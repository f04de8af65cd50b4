"""Distillation: a converted student trained towards its teacher in resumable stages (docs/conversion.md §1).

* **stage1, alignment.** Each converted layer's new mixer learns to output what the teacher's
  attention outputs at that layer (``convert.losses.alignment_objective``).
* **stage2, logit distillation.** KL(teacher || student) of the next-token distributions at a
  temperature (``convert.losses.kl_objective``).
* **stage3, fine-tuning (optional).** Next-token cross-entropy, no teacher, at a longer context.

What a stage trains is its parameter set (``--set STAGE.params=...``, ``STAGE_PARAMETERS``):
``memory``, the converted layers' parameters that did not come from the teacher (KVM's merge gate,
temperatures and state offset: the memory's own), ``mixers`` (the converted layers' whole mixers) or ``all``.
Stage 1 trains the memory by default (the alignment has little else to learn: inside the window the
student already equals the teacher), stage 2 and 3 everything: on SmolLM2, stage 2 over every
parameter at 1e-4 did better than the memory alone on two held-out domains, within 0.4 % on the
other two, and kept one more factual prompt (docs/conversion.md §4.4).
Each set has its learning rate for stages 1 and 2 (``PARAMETER_LR``: the few memory parameters move
at 3e-2, whole mixers at 1e-3, everything at 1e-4); stage 3 keeps RADLADS's 1e-5.

Every stage is a ``hybrid.training.loop.train`` run with an ``Objective``: the same optimizer
groups, schedule, progress bar, ``metrics.jsonl``/``loss.png``, atomic ``step_*`` checkpoints and bitwise
resume as ``hybrid train``. A stage starts (``train.init_from``) from the previous stage's final
checkpoint, the first from the converted-at-init student. ``STAGE_DEFAULTS`` holds each stage's
other settings (RADLADS's: stage 1 cosine to 1% of its lr, sequences of 512; stage 2 constant lr,
512; stage 3 cosine to 10%, 1024). Token budgets are per stage.

``run_conversion(ConversionSettings(...))`` is what ``hybrid convert`` runs::

    OUT/                      the distilled student: a checkpoint folder (recipe.yaml, model.safetensors,
                              tokenizer.json) that ``hybrid generate OUT`` runs; its recipe's train:
                              section fine-tunes it (``hybrid train OUT/recipe.yaml --out runs/ft``)
      stages/conversion.json  teacher, plan, data, held-out text, budgets (what the report rebuilds from),
                              and the layer scores that chose the plan (``keep_attention``)
      stages/init/            the converted-at-init student (checkpoint)
      stages/stage1/          step_* checkpoints, latest, metrics.jsonl, loss.png of each stage
      stages/stage2/ ...
      stages/teacher_samples.jsonl  text sampled from the teacher, part of the data (``convert.samples``),
                              and teacher_samples.json beside it, the settings it was sampled with

Running the same command again resumes: a finished stage is not trained again, an interrupted one
continues from its newest checkpoint, a larger budget extends the stage. A later stage that already
started from an earlier stage's final weights refuses to continue once that earlier stage has been
extended (delete its folder to redo it from the new weights).

``keep_attention=N`` (``--keep-attention N``) makes ``plan`` the target and keeps as attention the
N converted layers whose restoring alone lowers the KL to the teacher most (``convert.layer_scores``,
``select_layers``); a resumed run reuses the recorded choice.

Data: text/JSONL files and folders (``hybrid.training.data``), by default the built-in Shakespeare corpus
without the held-out play (``HELD_OUT``, which the report scores), followed by text sampled from the
teacher (``convert.samples``: continuations of varied everyday openings, temperature 1, top-p 0.95, up
to 512 tokens each), which broadens the narrow corpus. ``teacher_sample_tokens`` (``--teacher-samples``)
sets how much; by default, with the built-in corpus, ``sample_budget``: a quarter of the stage 1 + 2
budgets, at most 2M tokens (whole samples; none below one); with the user's ``data`` none, the
corpus being their choice. Samples already in the folder are not sampled again. Data that holds no
text (an empty file, a folder without text files) is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convert.errors import TeacherError
from convert.evaluate import window_len
from convert.init import convert_teacher, new_parameter_names
from convert.layer_scores import DEFAULT_SEQUENCES, as_sequences, check_keep, layer_scores
from convert.losses import alignment_objective, kl_objective
from convert.plan import LayerPlan, plan_student
from convert.samples import sample_budget, sample_count, sample_teacher
from convert.teacher import Teacher, load_teacher
from hybrid.formats.atomic import write_text
from hybrid.formats.checkpoint import load_checkpoint, save_checkpoint
from hybrid.formats.run_folder import TRAINER_JSON, latest_checkpoint
from hybrid.model.device import resolve_device
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, build_dataclass
from hybrid.training import data as datalib
from hybrid.training.config import TrainConfig
from hybrid.training.loop import Objective, TrainSummary, accumulate_gradients, train

STAGES = ("stage1", "stage2", "stage3")
HELD_OUT = ("tragedies/hamlet.md",)  # plays of the built-in corpus kept out of the default distillation data
CONVERSION_FILE = "conversion.json"
FINAL_FILES = ("tokenizer.json", "model.safetensors", "recipe.yaml")  # moved into OUT in this order
COMMON_DEFAULTS: dict[str, Any] = {"val_fraction": 0.01, "val_every": 0, "val_batches": 4, "ckpt_every": 50,
                                   "keep_last": 2, "log_every": 1, "weight_decay": 0.0, "grad_clip": 1.0}
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage1": {"seq_len": 512, "batch_size": 8, "min_lr_ratio": 0.01, "schedule": "cosine"},
    "stage2": {"seq_len": 512, "batch_size": 8, "schedule": "constant"},
    "stage3": {"seq_len": 1024, "batch_size": 8, "lr": 1e-5, "min_lr_ratio": 0.1, "schedule": "cosine"},
}
# What each stage trains (``stageN.params``): ``memory``, the converted layers' parameters that did not
# come from the teacher (KVM's merge gate, temperatures and state offset; an LRNN mixer's gates and decays);
# ``mixers``, every parameter of the converted layers' mixers; ``all``, every parameter.
STAGE_PARAMETERS = {"stage1": "memory", "stage2": "all", "stage3": "all"}
PARAMETER_LR = {"memory": 3e-2, "mixers": 1e-3, "all": 1e-4}  # stage 1 and 2's lr for each (stage 3: 1e-5)
MAX_WARMUP = 50  # warm-up steps: 10% of a stage's steps, at most this many (unless set)


# ----------------------------------------------------------------------------- stage settings

def stage_config(stage: str, tokens: int, common: dict[str, Any], overrides: dict[str, Any] | None = None
                 ) -> TrainConfig:
    """The ``TrainConfig`` of one stage: ``COMMON_DEFAULTS``, ``STAGE_DEFAULTS[stage]``, then ``common``
    (data, out_dir, init_from, seed, device...), then the user's ``overrides``; ``tokens`` is the budget
    (``max_tokens``). Warm-up is 10% of the steps, at most ``MAX_WARMUP``, unless set. A budget below one
    batch is refused (the stage would silently train a whole batch more than asked)."""
    overrides = dict(overrides or {})
    params = stage_parameters(stage, overrides.pop("params", None))
    lr = {} if stage == "stage3" else {"lr": PARAMETER_LR[params]}
    values = {**COMMON_DEFAULTS, **STAGE_DEFAULTS[stage], **lr, **common, **overrides, "max_tokens": tokens,
              "max_steps": None}
    batch = values["batch_size"] * values["seq_len"]
    if tokens < batch:
        raise TeacherError(f"the {stage} budget of {tokens} tokens is less than one batch ({values['batch_size']} "
                           f"sequences of {values['seq_len']} tokens = {batch}): raise --{stage}-tokens or lower "
                           f"--set {stage}.batch_size / {stage}.seq_len")
    if "warmup_steps" not in overrides:
        values["warmup_steps"] = min(MAX_WARMUP, math.ceil(tokens / batch) // 10)
    try:
        return build_dataclass(TrainConfig, values, f"{stage}.")
    except ValueError as err:
        raise TeacherError(f"{stage} settings: {err}") from None


def stage_parameters(stage: str, params: str | None = None) -> str:
    """The parameter set a stage trains: ``params`` (``--set STAGE.params=...``) or ``STAGE_PARAMETERS``."""
    params = STAGE_PARAMETERS[stage] if params is None else params
    if params not in PARAMETER_LR:
        raise TeacherError(f"{stage}.params={params!r}: choose one of {', '.join(PARAMETER_LR)} (memory: the "
                           "converted layers' new parameters; mixers: their whole mixers; all: every parameter)")
    return params


def trainable_parameters(stage: str, params: str, converted: Sequence[int], new: Sequence[str]
                         ) -> Callable[[str], bool] | None:
    """Which parameters ``params`` trains, by name (None: every one): ``converted`` the converted
    layers, ``new`` the names of their parameters that did not come from the teacher
    (``convert.init.new_parameter_names``). Refuses an empty set."""
    if params == "all":
        return None
    if params == "mixers":
        prefixes = tuple(f"blocks.{i}.mixer." for i in converted)
        return lambda name: name.startswith(prefixes)
    new = frozenset(new)
    if not new:
        raise TeacherError(f"{stage}.params=memory: the plan's converted layers have no parameters of their own "
                           f"(all copied from the teacher); set {stage}.params=mixers or all")
    return new.__contains__


def stage_objective(stage: str, teacher: HybridLM, converted: Sequence[int], temperature: float,
                    trainable: Callable[[str], bool] | None = None) -> Objective | None:
    """The stage's objective, training the parameters ``trainable`` names (None: stage 1 the converted
    mixers, stage 2 and 3 every parameter); None for stage 3 training all: plain next-token cross-entropy."""
    if stage == "stage1":
        objective = alignment_objective(teacher, converted)
    elif stage == "stage2":
        objective = kl_objective(teacher, temperature)
    elif trainable is None:
        return None
    else:
        objective = Objective(accumulate_gradients)
    return objective if trainable is None else dataclasses.replace(objective, trainable=trainable)


def run_stage(stage: str, recipe: Recipe, teacher: HybridLM, converted: Sequence[int], config: TrainConfig,
              temperature: float = 1.0, progress: bool = True,
              trainable: Callable[[str], bool] | None = None) -> TrainSummary:
    """Train one stage into ``config.out_dir`` (resuming it), starting from ``config.init_from``;
    ``trainable``: the parameters it trains (``trainable_parameters``; None: ``stage_objective``'s).

    Refuses to continue a stage whose checkpoints started from other weights than ``init_from`` (an
    earlier stage was extended since), and a ``seq_len`` that does not reach past the student's
    window, inside which a converted KVM/BSWA student already equals the teacher."""
    check_reaches_past_window(stage, recipe, converted, config)
    newest = latest_checkpoint(Path(config.out_dir))
    if newest is not None:
        started_from = json.loads((newest / TRAINER_JSON).read_text())["config"].get("init_from")
        if started_from != config.init_from:
            raise TeacherError(f"{config.out_dir} started from {started_from}, but the stage before it now ends at "
                               f"{config.init_from}: delete {config.out_dir} to redo {stage} from the new weights, "
                               "or keep the earlier stage's budget")
    device = resolve_device(config.device)
    teacher.to(device)
    return train(recipe, config, resume=True, progress=progress,
                 objective=stage_objective(stage, teacher, converted, temperature, trainable))


def check_reaches_past_window(stage: str, recipe: Recipe, converted: Sequence[int], config: TrainConfig) -> None:
    """Refuse a stage 1/2 ``seq_len`` within the window of a student whose converted layers are all
    KVM/BSWA: there the student equals the teacher, so the losses are zero."""
    window = window_len(recipe.model)
    if stage != "stage3" and window and config.seq_len <= window and all(
            hasattr(recipe.model.layers[i].options, "n_bswa_chunks") for i in converted):
        raise TeacherError(f"{stage}.seq_len {config.seq_len} is within the student's window of {window} tokens, "
                           "where it already equals the teacher: nothing to learn; use a longer seq_len")


# ----------------------------------------------------------------------------- data

def default_sources() -> list[str]:
    """The built-in corpus's plays except ``HELD_OUT``."""
    folder = datalib.builtin_corpus()
    return [str(p) for p in sorted(folder.rglob("*.md")) if p.relative_to(folder).as_posix() not in HELD_OUT]


def held_out_files() -> list[Path]:
    """The held-out plays the report scores (``HELD_OUT`` in the built-in corpus)."""
    folder = datalib.builtin_corpus()
    return [folder / name for name in HELD_OUT]


def check_disjoint(sources: Sequence[str], held_out: Sequence[Path]) -> None:
    """Refuse distillation data that contains a held-out file (the report would score training text)."""
    held = {p.resolve() for p in held_out}
    files = [f for s in map(Path, sources) for f in (s.rglob("*") if s.is_dir() else [s])]
    overlap = sorted(str(p) for p in files if p.resolve() in held)
    if overlap:
        raise TeacherError(f"the distillation data includes the held-out text {', '.join(overlap)}: leave it out "
                           "(the report measures perplexity on it)")


def check_data(sources: Sequence[str]) -> None:
    """Refuse, before any work, distillation data that the stages could not train on: what
    ``hybrid.training.data`` refuses (a missing path, a folder without data files, an unsupported
    file type) and a source that holds no text (an empty file, a folder of empty files)."""
    for source in sources:
        if not any(holds_text(path) for path in datalib.source_files([source])):
            what = "only empty files" if Path(source).is_dir() else "no text (the file is empty)"
            raise TeacherError(f"the data source {source} holds {what}: name text, JSONL or Parquet files with "
                               "something to distil on")


def holds_text(path: Path) -> bool:
    """Whether the data file ``path`` holds anything but white space (read in blocks of 1 MiB until the
    first text; a saved dataset folder counts as text)."""
    if path.is_dir():
        return True
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            if chunk.strip():
                return True
    return False


# ----------------------------------------------------------------------------- the whole conversion

@dataclasses.dataclass(frozen=True)
class ConversionSettings:
    """What ``hybrid convert`` does (see the module docstring)."""

    teacher: str  # HF folder or .gguf file
    out: str  # output folder
    plan: str  # layer plan (convert.plan), e.g. "K*30"
    mixers: dict[str, dict] = dataclasses.field(default_factory=dict)  # student mixer options {"kvm": {...}}
    budgets: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"stage1": 5_000_000, "stage2": 20_000_000, "stage3": 0})  # tokens; 0 skips
    stage_overrides: dict[str, dict] = dataclasses.field(default_factory=dict)  # {"stage2": {"lr": 3e-5}}
    data: tuple[str, ...] | None = None  # None: the built-in corpus without HELD_OUT
    teacher_sample_tokens: int | None = None  # sampled from the teacher, after the data (None: sample_tokens())
    temperature: float = 1.0  # stage 2's KL temperature
    teacher_layers: int | None = None  # use only the teacher's first layers (quick trials)
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    cache_dir: str | None = None  # token cache (None: hybrid train's default)
    time_limit_s: float | None = None  # for all stages together; a stage stopped by it resumes on the next run
    keep_attention: int | None = None  # plan is the target; keep its N best-scoring layers as attention (select_layers)

    def identity(self) -> dict:
        """What makes two runs the same conversion (a resumed run must match)."""
        return {"teacher": str(Path(self.teacher).resolve()), "teacher_layers": self.teacher_layers,
                "plan": self.plan, "keep_attention": self.keep_attention, "mixers": self.mixers}

    def sample_tokens(self) -> int:
        """Tokens of text to sample from the teacher: ``teacher_sample_tokens`` when set, else the
        default mix (``sample_budget``) with the built-in data and none with the user's ``data``."""
        if self.teacher_sample_tokens is not None:
            return self.teacher_sample_tokens
        return sample_budget(self.budgets) if self.data is None else 0


@dataclasses.dataclass
class ConversionResult:
    out: Path
    stages: dict[str, TrainSummary]
    finished: bool  # False: a stage stopped at the time limit; run again to continue

    def describe(self) -> str:
        lines = [f"{stage}: {summary.describe()}" for stage, summary in self.stages.items()]
        lines.append(f"wrote {self.out}" if self.finished else
                     "stopped at the time limit: run the same command again to continue")
        return "\n".join(lines)


def run_conversion(settings: ConversionSettings, progress: bool = True) -> ConversionResult:
    """Convert, distil and export (see the module docstring); resumes an interrupted run."""
    started = time.monotonic()
    say = (lambda m: print(f"[{m}]", file=sys.stderr)) if progress else (lambda m: None)
    unknown = sorted(set(settings.budgets) - set(STAGES)) + sorted(set(settings.stage_overrides) - set(STAGES))
    if unknown:
        raise TeacherError(f"unknown stages {unknown}: the stages are {', '.join(STAGES)}")
    n_samples = sample_count(settings.sample_tokens())
    if settings.data is not None:
        check_data(settings.data)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    stages_dir = out / "stages"
    recorded = _recorded_conversion(out, settings)

    teacher = load_teacher(settings.teacher, n_layers=settings.teacher_layers)
    target = plan_student(teacher.recipe, settings.plan, settings.mixers)
    check_converts(target, settings.keep_attention)
    held_out = held_out_files()
    sources = list(settings.data) if settings.data is not None else default_sources()
    check_disjoint(sources, held_out)
    tokenizer = teacher.text_tokenizer()
    common = {"out_dir": None, "seed": settings.seed, "threads": settings.threads, "device": settings.device,
              "cache_dir": settings.cache_dir, "data": list(sources)}
    for stage in STAGES:  # every stage's settings checked before any work
        if settings.budgets.get(stage, 0):
            config = stage_config(stage, settings.budgets[stage], {**common, "out_dir": str(stages_dir / stage)},
                                  settings.stage_overrides.get(stage))
            check_reaches_past_window(stage, target.student, target.converted, config)
    cache = Path(settings.cache_dir) if settings.cache_dir else datalib.default_cache_dir()
    selection = None
    if settings.keep_attention is not None:
        check_keep(settings.keep_attention, target)
        selection = recorded.get("layer_selection") or select_layers(
            settings, teacher, datalib.build_token_cache(sources, tokenizer, cache, progress=progress), progress)
        say(f"kept layers {selection['kept']} as attention: restoring them alone lowered the KL to the teacher "
            f"most (scores in stages/{CONVERSION_FILE})")
    student, teacher, plan = convert_teacher(teacher, selection["plan"] if selection else settings.plan,
                                             settings.mixers)
    say(f"{teacher.source}: {plan.summary()}")
    trainables = stage_trainables(settings, plan, new_parameter_names(student, plan))
    stages_dir.mkdir(parents=True, exist_ok=True)
    record = {"identity": settings.identity(), "plan_summary": plan.summary(), "converted": list(plan.converted),
              "data": sources, "held_out": [str(p) for p in held_out], "budgets": settings.budgets,
              "stage_overrides": settings.stage_overrides, "temperature": settings.temperature,
              "window": window_len(plan.student.model), "layer_selection": selection, "teacher_samples": None,
              "stage_parameters": {stage: params for stage, (params, _) in trainables.items()}}
    record_path = stages_dir / CONVERSION_FILE
    write_text(record_path, json.dumps(record, indent=1) + "\n")  # first: the folder is a conversion's
    if n_samples:
        teacher.model.to(resolve_device(settings.device))
        samples = sample_teacher(teacher.model, tokenizer, settings.sample_tokens(), stages_dir, settings.seed,
                                 progress)
        say(f"distilling also on {samples.samples:,} samples of the teacher's text ({samples.tokens:,} tokens)")
        sources.append(str(samples.path))
        record["teacher_samples"] = samples.to_dict()
        write_text(record_path, json.dumps(record, indent=1) + "\n")
    common["data"] = sources
    init_dir = stages_dir / "init"
    if not (init_dir / "model.safetensors").is_file():
        save_checkpoint(init_dir, plan.student, student, tokenizer)
    del student
    return _distil(settings, plan, teacher.model, common, trainables, started, say, progress)


def stage_trainables(settings: ConversionSettings, plan: LayerPlan, new: Sequence[str]
                     ) -> dict[str, tuple[str, Callable[[str], bool] | None]]:
    """Per stage with a budget: its parameter set and what it trains (``trainable_parameters``)."""
    result = {}
    for stage in STAGES:
        if settings.budgets.get(stage, 0):
            params = stage_parameters(stage, settings.stage_overrides.get(stage, {}).get("params"))
            result[stage] = params, trainable_parameters(stage, params, plan.converted, new)
    return result


def check_converts(target: LayerPlan, keep_attention: int | None) -> None:
    """Refuse a conversion that would convert no layer: a plan of ``A`` only, or keeping every
    converted layer of the target plan as attention."""
    if not target.converted:
        raise TeacherError(f"the plan {target.letters} keeps every teacher layer: nothing to convert; "
                           "use K (KVM) or another mixer letter for the layers to convert")
    if keep_attention is not None and keep_attention >= len(target.converted):
        raise TeacherError(f"--keep-attention {keep_attention} keeps all {len(target.converted)} layers the plan "
                           f"converts: nothing left to convert; choose 0..{len(target.converted) - 1}")


def _recorded_conversion(out: Path, settings: ConversionSettings) -> dict:
    """The record of the conversion ``out`` already holds ({} for a new folder); refuses a folder that
    is not a conversion, or holds another conversion than ``settings`` describe."""
    record_path = out / "stages" / CONVERSION_FILE
    if out.exists() and not record_path.is_file() and any(out.iterdir()):
        raise TeacherError(f"{out} exists and is not a conversion folder (no stages/{CONVERSION_FILE}): "
                           "choose a new output folder")
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if recorded:
        changed = [f"{k}: {recorded['identity'].get(k)!r} there, {v!r} now"
                   for k, v in settings.identity().items() if recorded["identity"].get(k) != v]
        if changed:
            raise TeacherError(f"{out} holds another conversion ({'; '.join(changed)}): choose a new output folder")
    return recorded


def _distil(settings: ConversionSettings, plan: LayerPlan, teacher: HybridLM, common: dict[str, Any],
            trainables: dict[str, tuple], started: float, say: Callable[[str], None],
            progress: bool) -> ConversionResult:
    """Train the stages with a budget (``trainables``: what each trains), each from the previous one's
    final checkpoint (the first from ``stages/init``), then export the last as ``OUT``; stops early at
    the time limit."""
    out = Path(settings.out)
    stages_dir = out / "stages"
    previous, summaries = str(stages_dir / "init"), {}
    for stage in STAGES:
        tokens = settings.budgets.get(stage, 0)
        if not tokens:
            continue
        left = None
        if settings.time_limit_s is not None:
            left = settings.time_limit_s - (time.monotonic() - started)
            if left <= 0:
                return ConversionResult(out, summaries, False)
        config = stage_config(stage, tokens, {**common, "out_dir": str(stages_dir / stage), "init_from": previous,
                                              "time_limit_s": left}, settings.stage_overrides.get(stage))
        params, trainable = trainables[stage]
        say(f"{stage}: {tokens:,} tokens, {config.total_steps} steps of {config.batch_size}x{config.seq_len}, "
            f"training {params} parameters at lr {config.lr:g}")
        summary = run_stage(stage, plan.student, teacher, plan.converted, config, settings.temperature, progress,
                            trainable)
        summaries[stage] = summary
        if summary.stopped == "time_limit":
            return ConversionResult(out, summaries, False)
        previous = str(summary.checkpoint)
    export_final(out, Path(previous), plan.student, stage_config(
        "stage3", max(settings.budgets.get("stage3", 0), 1_000_000),
        {**common, "init_from": str(out.resolve())}, settings.stage_overrides.get("stage3")))
    return ConversionResult(out, summaries, True)


def select_layers(settings: ConversionSettings, teacher: Teacher, data_tokens, progress: bool = True) -> dict:
    """``keep_attention``: the record of the plan chosen by ``convert.layer_scores`` (the target plan
    ``settings.plan`` with its best layers kept as attention), measured on the first
    ``DEFAULT_SEQUENCES`` sequences of stage 2's length of the distillation data (``data_tokens``,
    1-D ids), not on the held-out text, which the report scores."""
    seq_len = {**STAGE_DEFAULTS["stage2"], **settings.stage_overrides.get("stage2", {})}["seq_len"]
    ids = as_sequences(np.asarray(data_tokens[:DEFAULT_SEQUENCES * seq_len]).astype(np.int64), seq_len,
                       "the distillation data")
    teacher.model.to(resolve_device(settings.device))
    scores = layer_scores(teacher, settings.plan, settings.mixers, ids, progress=progress)
    return scores.to_dict(keep=settings.keep_attention)


def export_final(out: Path, checkpoint: Path, recipe: Recipe, fine_tune: TrainConfig) -> Path:
    """Make ``out`` a checkpoint folder of ``checkpoint``'s weights whose recipe's train: section is
    ``fine_tune`` (stage 3's settings, starting from ``out``). The files are written as a checkpoint
    under ``out/stages/final`` and then renamed into ``out`` one by one, the recipe last (``out``
    itself cannot be swapped atomically: it holds ``stages/``)."""
    _, model, tokenizer = load_checkpoint(checkpoint)
    staging = out / "stages" / "final"
    save_checkpoint(staging, dataclasses.replace(recipe, train=fine_tune.to_dict()), model, tokenizer)
    for name in FINAL_FILES:
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
    shutil.rmtree(staging)
    return out
