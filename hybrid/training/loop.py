"""Training: a recipe's ``train:`` section -> a trained model in checkpoint folders that resume exactly.

``hybrid train RECIPE`` reads ``TrainConfig`` from the recipe's ``train:`` section (``--set
train.KEY=VALUE`` overrides a value; both go through the same strict checks), tokenizes the data
once (``hybrid.training.data``'s cache) and trains::

    out_dir/
      step_000200/           a checkpoint folder: what ``hybrid generate out_dir/step_000200`` loads
        recipe.yaml          (the expanded recipe, its train: section the settings of this run)
        model.safetensors
        trainer.safetensors  optimizer moments and step counts, RNG states: tensors only, no pickle
        trainer.json         step, data position, schedule, loss window, settings, fingerprints,
                             and the names that tie each tensor in trainer.safetensors to its parameter
      latest                 the name of the newest checkpoint folder (``hybrid generate out/$(cat out/latest)``)
      metrics.jsonl          one JSON line per logged step: loss, lr, grad norm, tokens/s, val loss/ppl
      loss.png               the training and validation loss curves

Optimisation: AdamW with two parameter groups. Weight decay applies to the matrices that map one
space to another, the weights of ``nn.Linear`` and ``nn.Embedding`` modules (the embedding too: with
tied embeddings it is also the output layer, and GPT-2/nanoGPT decay it). Everything else is not
decayed: norm gains and biases, all biases, short-convolution filters, token-shift mixes,
temperatures, decay/step parameters (``A_log``, ``dt_bias``, ``D``) and other per-channel vectors,
including 2-D ones like RWKV-7's ``r_k`` (which is why the rule is by module type, not by ``ndim``).
The learning rate warms up linearly over ``warmup_steps`` and then decays (cosine or linear) to
``lr * min_lr_ratio`` at the last step, or stays constant. Gradients are clipped by their global norm.

Batches: ``batch_size`` is the number of sequences per optimizer step; ``grad_accum`` splits each
batch into that many micro-batches whose gradients add up to the whole batch's (a memory knob: the
data and the maths stay the same, only the float rounding of the sums changes). Batch ``step`` is a
pure function of (seed, step) (``hybrid.training.data.PackedBatches``), so the data position a checkpoint
saves is the step.

Resuming (the default) continues from the newest ``step_*`` folder: model, optimizer, schedule
position, data position, RNG states and the running loss window, so on CPU with the same settings
and thread count the losses after a resume equal those of an uninterrupted run bitwise. The recipe's
model and tokenizer must be those of the checkpoint, and the settings that define the data stream
(data, text_field, seq_len, batch_size, val_fraction, seed) must not change; other settings may
(a lower lr after a divergence, more steps), and the run says which changed.

A fresh run starts from the recipe's random initialisation, or from the weights of a checkpoint
folder (``init_from``: fine-tuning, e.g. a model ``hybrid convert`` wrote); a resumed run ignores it.

A non-finite loss or gradient norm stops the run before the weights are touched
(``TrainingDiverged``, naming the step and the last good checkpoint, which is kept).

Several processes: ``torchrun --nproc_per_node=N -m hybrid train RECIPE`` trains data-parallel
(``hybrid.training.distributed``; ``parallel: ddp`` or ``fsdp``). ``batch_size`` stays the global batch: each
process takes ``batch_size / N`` of its sequences (and splits them into ``grad_accum`` micro-batches),
so the losses match a one-process run up to float rounding. Every process computes, but only the
first (rank 0) prints, writes metrics and checkpoints; a checkpoint has the same files whatever the
process count, so a run may resume with another count (same ``batch_size``). Validation is split
across the processes. The output folder must be one that every process reads (one machine, or a
shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from blocks.config import ConfigError, require, require_choice
from blocks.state import StateError
from hybrid.training import data as datalib
from hybrid.training import distributed
from hybrid.formats.checkpoint import CheckpointError, _fsync_folder, _swap_into_place, load_checkpoint, save_checkpoint
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, RecipeError, build_dataclass, deep_merge, model_to_dict
from hybrid.model.state import atomic_save_safetensors, read_safetensors
from hybrid.formats.tokenizer import Tokenizer, load_tokenizer

SCHEDULES = ("cosine", "linear", "constant")
AUTOCASTS = ("auto", "bf16", "off")
PARALLEL = distributed.PARALLEL_MODES
TRAINER_FORMAT = "kvm-hybrid-trainer"
TRAINER_VERSION = 1
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LATEST_FILE = "latest"
STEP_FOLDER = re.compile(r"step_(\d{6,})")
DATA_STREAM_FIELDS = ("data", "text_field", "seq_len", "batch_size", "val_fraction", "seed")
"""Settings a resumed run must share with its checkpoint: they define the batches the saved step points into."""


class TrainError(ValueError):
    """A run that cannot start or resume (settings, checkpoints); the message says what and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the weights were not updated with it."""


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A recipe's ``train:`` section. Exactly one of ``max_steps`` and ``max_tokens`` sets the length."""

    data: tuple[str, ...] | None = None  # text/JSONL files and folders (relative paths: from the working
    # directory); None: the built-in corpus (hybrid.training.data.builtin_corpus)
    text_field: str = "text"  # JSONL key that holds the text
    cache_dir: str | None = None  # token cache; None: $XDG_CACHE_HOME/kvm-hybrid/tokens (keyed by content)
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per step and process (divides batch_size / processes)
    max_steps: int | None = None
    max_tokens: int | None = None  # training tokens; rounded up to whole steps
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    weight_decay: float = 0.1  # on Linear and Embedding weights only (see the module docstring)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    val_fraction: float = 0.01  # share of the data held out for validation
    val_every: int = 200  # steps between validations (and at the end); 0: never
    val_batches: int = 16  # validation batches of batch_size sequences
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    log_every: int = 10  # steps between metrics lines; each reports the mean loss since the last one
    out_dir: str | None = None  # None: runs/<recipe name>
    init_from: str | None = None  # checkpoint folder (or run folder: its newest) whose weights start a fresh run
    seed: int = 0  # initial weights and data order
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    autocast: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 (CUDA only) | off
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    parallel: str = "ddp"  # with several processes (torchrun): ddp (a full copy per process) | fsdp (weights,
    # gradients and optimizer state sharded across them) | none (refuses several processes)
    threads: int | None = None  # torch CPU threads; None: torch's default. Bitwise resume needs the same count
    time_limit_s: float | None = None  # stop cleanly (with a checkpoint) after this many seconds

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "grad_accum", "val_batches", "ckpt_every", "keep_last", "log_every")
        for name in positive:
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "threads"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        require((self.max_steps is None) != (self.max_tokens is None), "max_steps",
                "set exactly one of max_steps and max_tokens (the other null)")
        require(self.batch_size % self.grad_accum == 0, "grad_accum",
                f"must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        require(self.data is None or len(self.data) > 0, "data", "must list at least one file or folder, or be null")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require_choice("schedule", self.schedule, SCHEDULES)
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {list(self.betas)}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", f"must be > 0 or null, got {self.grad_clip}")
        require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.val_every >= 0, "val_every", f"must be >= 0 (0: no validation), got {self.val_every}")
        require(self.val_every == 0 or self.val_fraction > 0, "val_every",
                "validation needs held-out data: set val_fraction > 0, or val_every: 0")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "device",
                f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        require_choice("autocast", self.autocast, AUTOCASTS)
        require_choice("parallel", self.parallel, PARALLEL)
        require(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s",
                f"must be > 0 or null, got {self.time_limit_s}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / self.tokens_per_step)

    def to_dict(self) -> dict:
        """Plain YAML/JSON data (lists, not tuples): what a checkpoint's recipe.yaml and trainer.json record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type))
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def config_from_recipe(recipe: Recipe, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The recipe's ``train:`` section with ``overrides`` merged over it (``None`` resets a key to its
    default), validated strictly: an unknown key gets a did-you-mean, a wrong type or range names the
    YAML path (``RecipeError``)."""
    merged = deep_merge(recipe.train, overrides or {})
    for name in _FLOAT_FIELDS:  # YAML 1.1 reads 3e-4 (no dot) as a string: take it as the number it is
        if isinstance(merged.get(name), str) and _NUMBER.fullmatch(merged[name]):
            merged[name] = float(merged[name])
    try:
        return build_dataclass(TrainConfig, merged, "train.")
    except ConfigError as err:
        where = f"{recipe.source}{' with the --set overrides' if overrides else ''}"
        raise RecipeError(f"{where}: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "train.data=[a.txt, b/]"]`` -> ``{"lr": 0.0003, "data": ["a.txt", "b/"]}``.

    Values are read as YAML (so lists, null and numbers work as in a recipe)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}", "expected train.KEY=VALUE, e.g. --set train.lr=3e-4")
        path = key.strip().split(".")
        if path[0] != "train" or len(path) < 2:
            raise ConfigError(f"--set {item}", f"only the train: section can be set here: write "
                                               f"train.{key.strip()}=... (model changes belong in a recipe "
                                               "that extends this one)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}", f"the value is not valid YAML: {err}") from None
        node = out
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


# ----------------------------------------------------------------------------- optimisation

def parameter_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the parameters to decay, names of the others): see the module docstring for the rule."""
    modules = dict(model.named_modules())
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # a tied weight is listed once
        if not param.requires_grad:  # frozen (an Objective's choice): not optimised at all
            continue
        owner, _, leaf = name.rpartition(".")
        matrix = leaf == "weight" and isinstance(modules[owner], (nn.Linear, nn.Embedding))
        (decay if matrix else no_decay).append(name)
    return decay, no_decay


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the two parameter groups; returns it with the parameter names in its order."""
    decay, no_decay = parameter_groups(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": config.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)
    return optimizer, decay + no_decay


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0 is the first): linear warm-up to ``lr`` over
    ``warmup_steps`` steps, then cosine or linear decay reaching ``lr * min_lr_ratio`` at the last step.
    A pure function of the step, so the schedule's state in a checkpoint is the step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - 1 - config.warmup_steps))
    low = config.lr * config.min_lr_ratio
    if config.schedule == "cosine":
        return low + (config.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr - (config.lr - low) * progress


def accumulate_gradients(model: HybridLM, inputs: Tensor, targets: Tensor, grad_accum: int,
                         autocast: torch.dtype | None = None) -> float:
    """Forward and backward over ``inputs``/``targets`` (B, T) in ``grad_accum`` equal micro-batches.

    The gradients added to ``.grad`` are those of the whole batch's mean next-token loss, which is
    returned; targets of -100 take no loss (``cross_entropy``'s ``ignore_index``: the mean is then over
    each micro-batch's scored targets). ``autocast``: run the forward under autocast to this dtype
    (the loss is taken in fp32). A DDP ``model`` all-reduces the gradients in the last micro-batch only.
    """
    device = inputs.device.type
    total = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(zip(inputs.chunk(grad_accum), targets.chunk(grad_accum))):
        with distributed.gradient_sync(model, enabled=i == grad_accum - 1):
            with torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext():
                logits = model(x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / grad_accum
            loss.backward()
        total += loss.detach()
    return total.item()


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a run minimises when it is not the next-token loss of every parameter: the stages of
    ``convert.distill`` (align layer outputs with a teacher's, distil its logits) train with this loop.

    ``loss(model, inputs, targets, grad_accum, autocast) -> float`` does what ``accumulate_gradients``
    does: adds the whole batch's gradients to ``.grad`` and returns its mean loss. ``trainable(name)``
    says which parameters are trained; the others are frozen (``requires_grad`` False), left out of the
    optimizer and its checkpointed state, and stay bitwise unchanged."""

    loss: Callable[[HybridLM, Tensor, Tensor, int, torch.dtype | None], float]
    trainable: Callable[[str], bool] | None = None


@torch.no_grad()
def evaluate(model: HybridLM, tokens, config: TrainConfig, device: torch.device,
             autocast: torch.dtype | None = None) -> float:
    """Mean next-token loss over the first ``val_batches`` batches of held-out ``tokens`` (in order).

    Several processes share the batches (batch ``i`` in process ``i % world_size``) and add up their
    sums. Under FSDP every forward is a collective, so a process that has run out of batches runs a
    last one again, uncounted, until all have done as many forwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rank, size = distributed.rank(), distributed.world_size()
    batches = [b for _, b in zip(range(config.val_batches),
                                 datalib.iterate_eval_batches(tokens, config.seq_len, config.batch_size))]
    for i in range(rank, math.ceil(len(batches) / size) * size, size):
        x, y = (t.to(device) for t in batches[min(i, len(batches) - 1)])
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            logits = model(x).logits
        if i < len(batches):
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    total, count = distributed.total([total, count])
    model.train(was_training)
    return total / count


def enable_activation_checkpointing(model: HybridLM) -> None:
    """Recompute each block's activations during the backward pass instead of keeping them: memory
    per layer drops to the block's input, for about one more forward of compute. The block's own
    ``forward`` is wrapped on the instance, so parameter names and checkpoints are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class TrainSummary:
    """What a ``train`` call did."""

    out_dir: Path
    start_step: int  # the step it resumed from (0: a fresh start)
    step: int  # the step it reached
    total_steps: int
    stopped: str  # "completed" | "time_limit" | "already_done"
    checkpoint: Path | None  # the newest checkpoint folder
    loss: float | None  # the last logged training loss
    val_loss: float | None  # the last validation loss
    tokens_per_s: float  # training tokens per second of this call's steps
    elapsed_s: float

    def describe(self) -> str:
        parts = [f"step {self.step}/{self.total_steps}",
                 {"completed": "done", "time_limit": "stopped at the time limit (run again to continue)",
                  "already_done": "already trained to the last step"}[self.stopped]]
        if self.start_step:
            parts.append(f"resumed from step {self.start_step}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f} (ppl {math.exp(min(self.val_loss, 700)):.2f})")
        if self.step > self.start_step:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s, {self.elapsed_s:.1f} s")
        if self.checkpoint is not None:
            parts.append(f"checkpoint {self.checkpoint}")
        return "; ".join(parts)


def train(recipe: Recipe, config: TrainConfig, resume: bool = True, progress: bool = True,
          batches=None, objective: Objective | None = None) -> TrainSummary:
    """Train the recipe's model as ``config`` says, writing checkpoints, metrics and the loss plot to
    ``config.out_dir``. ``resume``: continue from the newest checkpoint there (False refuses to touch
    an out_dir that has checkpoints). ``progress``: a progress bar and status lines on stderr.
    ``batches``: train on these instead of ``config.data``'s text, for synthetic tasks
    (``hybrid.evaluation.recall.RecallBatches``): ``batches.batch(step)`` returns (inputs, targets) of shape
    (batch_size, seq_len), a pure function of the step so that a resumed run continues the stream;
    a target of -100 takes no loss. Validation reads held-out text, so it needs ``val_every: 0``.

    ``objective``: what to minimise and which parameters to train, instead of every parameter's
    next-token loss (``Objective``).

    Raises ``TrainError`` for settings or checkpoints that do not fit, ``TrainingDiverged`` for a
    NaN/inf loss; ``hybrid.training.data.DataError`` for unusable data. ``config.threads`` sets torch's
    CPU thread count for the process.

    In a process that ``torchrun`` started, the call joins the launch's other processes
    (``hybrid.training.distributed.process_group``) and trains data-parallel with them (``config.parallel``);
    every process returns the same summary. Synthetic ``batches`` and an ``objective`` train in one
    process only.
    """
    try:
        device = distributed.local_device(_device(config.device))
        with distributed.process_group(device):
            return _train(recipe, config, resume, progress, batches, objective, device)
    except distributed.DistributedError as err:
        raise TrainError(str(err)) from None


def _train(recipe: Recipe, config: TrainConfig, resume: bool, progress: bool, batches,
           objective: Objective | None, device: torch.device) -> TrainSummary:
    """``train`` in this process, once it has joined the other processes of its launch (if any)."""
    started = time.monotonic()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    autocast = _autocast_dtype(config.autocast, device)
    out_dir = Path(config.out_dir) if config.out_dir is not None else Path("runs") / Path(recipe.source).stem
    main = distributed.is_main()
    progress = progress and main  # one progress bar, one copy of each message
    say = _printer(progress)
    ranks = distributed.world_size()
    if ranks > 1 and (batches is not None or objective is not None):
        raise TrainError("synthetic batches and training objectives (convert's stages) train in one process; "
                         "start it without torchrun")
    if config.batch_size % (ranks * config.grad_accum) != 0:
        raise TrainError(f"train.batch_size {config.batch_size} (the global batch) must split evenly into "
                         f"{ranks} processes x train.grad_accum {config.grad_accum} micro-batches")

    if main:
        _remove_leftovers(out_dir)
    resume_from = distributed.from_main(latest_checkpoint(out_dir))  # all processes resume the same folder
    if resume_from is not None and not resume:
        raise TrainError(f"{out_dir} already holds checkpoints (up to {resume_from.name}); resume them "
                         "(drop --no-resume) or train into another --out folder")
    source = Path(recipe.source)
    tokenizer = load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None,
                               vocab_size=recipe.model.vocab_size)
    if batches is None:
        with distributed.main_first():  # the main process tokenizes; the others open its cache file
            train_tokens, val_tokens = _prepare_data(config, tokenizer, progress)
        batches = datalib.PackedBatches(train_tokens, config.seq_len, config.batch_size // ranks, config.seed,
                                        rank=distributed.rank(), world_size=ranks)
    elif config.val_every:
        raise TrainError("train.val_every must be 0 when the batches come from a synthetic source: "
                         "validation reads held-out text (evaluate the task yourself)")

    torch.manual_seed(config.seed)
    model = HybridLM(recipe.model)
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = _read_trainer_files(resume_from)
        _check_compatible(resume_from, saved["info"], recipe, config, tokenizer, say)
        _load_model_weights(resume_from, model)
    elif config.init_from is not None:
        _load_initial_weights(Path(config.init_from), recipe, model)
    model.to(device).train()
    if objective is not None and objective.trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(objective.trainable(name))
        if not any(p.requires_grad for p in model.parameters()):
            raise TrainError("the objective trains none of the model's parameters")
    step_loss = accumulate_gradients if objective is None else objective.loss
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    model = distributed.wrap(model, config.parallel, device)
    optimizer, names = build_optimizer(distributed.unwrap(model), config)
    step, window = 0, []
    if resume_from is not None:
        _load_optimizer(resume_from, optimizer, names, saved)
        _restore_rng(saved["tensors"], device)
        step, window = saved["info"]["step"], list(saved["info"]["loss_window"])
        say(f"resuming from {resume_from} (step {step})")
    if ranks > 1:  # each process its own random stream from here on (see distributed.rank_seed)
        torch.manual_seed(distributed.rank_seed(config.seed, step))
    start_step, total = step, config.total_steps

    metrics = MetricsLog(out_dir / METRICS_FILE, keep_through=step) if main else None
    summary = TrainSummary(out_dir, start_step, step, total, "already_done" if step >= total else "completed",
                           resume_from, None, None, 0.0, 0.0)
    if step >= total:
        return summary
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    # tokens/s counts training time only: validation and checkpoint time is left out of the window
    window_start, window_tokens, window_pause, train_start = time.monotonic(), 0, 0.0, time.monotonic()
    try:
        while step < total:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = (t.to(device, non_blocking=True) for t in batches.batch(step))
            loss = step_loss(model, inputs, targets, config.grad_accum, autocast)
            # under FSDP the norm comes back as a replicated DTensor (the shards' norms combined)
            grad_norm = distributed.full_tensor(
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)).item()
            loss, grad_norm = distributed.mean([loss, grad_norm])  # every process logs and decides alike
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(out_dir)
                keep = (f"the last good checkpoint, {last}, is kept: resume from it with a lower train.lr, "
                        "a longer train.warmup_steps or train.grad_clip set" if last is not None else
                        "no checkpoint was written before it (lower train.lr or set train.grad_clip)")
                raise TrainingDiverged(f"step {step + 1}: the training loss is {loss} (gradient norm {grad_norm}); "
                                       f"stopped without applying this step. {keep}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append(loss)
            window_tokens += config.tokens_per_step
            bar.update(1)

            timed_out = (config.time_limit_s is not None and
                         distributed.any_process(time.monotonic() - started >= config.time_limit_s))
            finished = step == total or timed_out
            record: dict[str, Any] = {}
            if step % config.log_every == 0 or finished:
                now = time.monotonic()
                summary.loss = sum(window) / len(window)
                record.update(loss=summary.loss, lr=lr, grad_norm=grad_norm, tokens=step * config.tokens_per_step,
                              tokens_per_s=window_tokens / max(now - window_start - window_pause, 1e-9))
                bar.set_postfix(loss=f"{summary.loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                window, window_start, window_tokens, window_pause = [], now, 0, 0.0
            pause_start = time.monotonic()
            if config.val_every and (step % config.val_every == 0 or finished):
                summary.val_loss = evaluate(distributed.unwrap(model), val_tokens, config, device, autocast)
                record.update(val_loss=summary.val_loss, val_ppl=math.exp(min(summary.val_loss, 700)))
                if progress:
                    bar.write(f"step {step}: val loss {summary.val_loss:.4f}, ppl {record['val_ppl']:.2f}",
                              file=sys.stderr)
            if record and main:
                metrics.write({"step": step, **record})
            if step % config.ckpt_every == 0 or finished:
                summary.checkpoint = save_training_checkpoint(
                    out_dir, step, recipe, config, model, tokenizer, optimizer, names,
                    {"loss_window": list(window), "elapsed_s": time.monotonic() - train_start}, config.keep_last)
                if main:
                    plot_metrics(metrics.path, out_dir / PLOT_FILE)
                distributed.barrier()  # the checkpoint is complete before any process goes on or ends
            window_pause += time.monotonic() - pause_start
            if timed_out and step < total:
                summary.stopped = "time_limit"
                break
    finally:
        bar.close()
        if metrics is not None and metrics.path.is_file():
            plot_metrics(metrics.path, out_dir / PLOT_FILE)
    summary.step = step
    summary.elapsed_s = time.monotonic() - train_start
    summary.tokens_per_s = (step - start_step) * config.tokens_per_step / max(summary.elapsed_s, 1e-9)
    return summary


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"train.device is {name!r} but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def _autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``auto`` or ``bf16``); CPU trains in fp32."""
    if mode == "bf16" and device.type != "cuda":
        raise TrainError("train.autocast bf16 needs a CUDA device; CPU training runs in float32 (autocast: auto)")
    return torch.bfloat16 if mode != "off" and device.type == "cuda" else None


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"[{message}]", file=sys.stderr)
    return say


def _prepare_data(config: TrainConfig, tokenizer: Tokenizer, progress: bool):
    """(train tokens, validation tokens) from the cached token file of ``config.data``."""
    sources = list(config.data) if config.data is not None else [datalib.builtin_corpus()]
    cache = Path(config.cache_dir) if config.cache_dir is not None else _default_cache_dir()
    tokens = datalib.build_token_cache(sources, tokenizer, cache, text_field=config.text_field, progress=progress)
    return datalib.split_train_val(tokens, config.val_fraction, config.seq_len)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvm-hybrid" / "tokens"


# ----------------------------------------------------------------------------- checkpoints

def save_training_checkpoint(out_dir: Path, step: int, recipe: Recipe, config: TrainConfig, model: HybridLM,
                             tokenizer: Tokenizer, optimizer: torch.optim.Optimizer, names: list[str],
                             extra: dict, keep_last: int) -> Path:
    """Write ``out_dir/step_NNNNNN`` atomically, point ``latest`` at it and delete all but the newest
    ``keep_last`` step folders. The folder is assembled under a hidden name (the model checkpoint,
    then the trainer files), flushed to disk and renamed into place, so a ``step_*`` folder is
    always complete; a run killed midway leaves at most a hidden folder that the next save removes.

    Every process of a data-parallel run calls it and only the main one writes. ``model`` may be
    wrapped (``hybrid.training.distributed.wrap``); under FSDP the full weights and optimizer moments are
    gathered from the shards first, so the files are those a one-process run writes."""
    folder = out_dir / f"step_{step:06d}"
    whole = _whole_model(model)
    tensors, structure = _optimizer_tensors(optimizer, names)
    if not distributed.is_main():
        return folder
    staging = out_dir / f".{folder.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    save_checkpoint(staging, dataclasses.replace(recipe, train=config.to_dict()), whole, tokenizer)
    tensors.update(_rng_tensors())
    atomic_save_safetensors(tensors, staging / TRAINER_TENSORS,
                            {"format": TRAINER_FORMAT, "format_version": str(TRAINER_VERSION)})
    info = {"format": TRAINER_FORMAT, "format_version": TRAINER_VERSION, "step": step,
            "data_position": {"next_batch": step, "seed": config.seed},
            "scheduler": {"schedule": config.schedule, "next_step": step, "next_lr": lr_at(step, config)},
            "tokens_seen": step * config.tokens_per_step, **extra, "optimizer": structure,
            "config": config.to_dict(), "model_fingerprint": recipe.model.fingerprint(),
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    (staging / TRAINER_JSON).write_text(json.dumps(info, indent=1) + "\n")
    _fsync_folder(staging)
    _swap_into_place(staging, folder)
    _write_atomic(out_dir / LATEST_FILE, folder.name + "\n")
    for old in step_folders(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return folder


def step_folders(out_dir: Path) -> list[Path]:
    """The complete checkpoint folders in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / TRAINER_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (by step number, which a crash between the folder's
    rename and the ``latest`` update cannot make stale), or None."""
    folders = step_folders(out_dir)
    return folders[-1] if folders else None


def _remove_leftovers(out_dir: Path) -> None:
    """Delete what a killed run can leave half-written: hidden staging folders and temporary files
    of this module's own names (a complete checkpoint is never among them)."""
    if not out_dir.is_dir():
        return
    names = "|".join(re.escape(name) for name in (LATEST_FILE, METRICS_FILE, PLOT_FILE))
    pattern = re.compile(rf"\.+step_\d{{6,}}\..+|\.({names})\..+")
    for path in out_dir.iterdir():
        if not pattern.fullmatch(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's identity (type, file contents, vocabulary size, eos id)."""
    return hashlib.sha256(json.dumps(datalib.tokenizer_identity(tokenizer), sort_keys=True).encode()).hexdigest()[:16]


def _whole_model(model: nn.Module) -> HybridLM | None:
    """The model with all of its weights in this process: itself, or DDP's inner module; under FSDP
    (a collective) a copy assembled from the gathered shards in the main process, None elsewhere."""
    if not distributed.is_sharded(model):
        return distributed.unwrap(model)
    state = distributed.full_state_dict(model)
    if state is None:
        return None
    with torch.device("meta"):  # no memory, and no draw from the RNG, for weights about to be replaced
        whole = HybridLM(model.config)
    whole.load_state_dict(state, assign=True)
    return whole


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], dict]:
    """The optimizer's per-parameter state as named tensors (``optimizer.<param>.<key>``) plus the
    JSON structure that says which keys each parameter has; no pickling anywhere. FSDP's sharded
    moments are gathered whole (every process takes part); only the main process keeps them."""
    tensors: dict[str, Tensor] = {}
    keys: dict[str, list[str]] = {}
    for index, entries in optimizer.state_dict()["state"].items():
        name = names[index]
        keys[name] = sorted(entries)
        for key, value in entries.items():
            value = distributed.full_tensor(value)
            if distributed.is_main():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"type": type(optimizer).__name__, "param_names": names, "state_keys": keys}


def _rng_tensors() -> dict[str, Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _restore_rng(tensors: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and device.type == "cuda" and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary result files
    os.replace(tmp, path)


def _read_trainer_files(folder: Path) -> dict:
    """{"info": trainer.json, "tensors": trainer.safetensors}, checked for format and completeness."""
    path = folder / TRAINER_JSON
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise TypeError(f"expected a JSON object, got {type(info).__name__}")
    except (OSError, ValueError, TypeError) as err:
        raise TrainError(f"{path} is not readable (corrupt?): {err}. Delete {folder} to resume from the "
                         "checkpoint before it") from None
    if info.get("format") != TRAINER_FORMAT or info.get("format_version") != TRAINER_VERSION:
        raise TrainError(f"{path}: not a trainer state this version reads (format {info.get('format')!r} "
                         f"version {info.get('format_version')!r}; expected {TRAINER_FORMAT!r} {TRAINER_VERSION})")
    required = ("step", "loss_window", "optimizer", "config", "model_fingerprint", "tokenizer")
    missing = [k for k in required if k not in info]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)} (corrupt or edited?). Delete {folder} to resume "
                         "from the checkpoint before it")
    try:
        metadata, tensors = read_safetensors(folder / TRAINER_TENSORS, what="trainer state")
    except StateError as err:
        raise TrainError(f"{err}. Delete {folder} to resume from the checkpoint before it") from None
    if metadata.get("format") != TRAINER_FORMAT or "rng.torch" not in tensors:
        raise TrainError(f"{folder / TRAINER_TENSORS} is not a trainer state (format {metadata.get('format')!r})")
    return {"info": info, "tensors": tensors}


def _check_compatible(folder: Path, info: dict, recipe: Recipe, config: TrainConfig, tokenizer: Tokenizer,
                      say) -> None:
    """Refuse a checkpoint of another model, tokenizer or data stream; report changed settings."""
    if info["model_fingerprint"] != recipe.model.fingerprint():
        try:
            saved_recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
            diffs = _differences(saved_recipe["model"], model_to_dict(recipe.model), "model.")
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            diffs = []
        detail = f": {'; '.join(diffs[:5])}" if diffs else ""
        raise TrainError(f"{folder} holds another model than {recipe.source} (architecture fingerprint "
                         f"{info['model_fingerprint']} vs {recipe.model.fingerprint()}){detail}. Resume with the "
                         "recipe it was trained with, or train into another --out folder")
    if info["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise TrainError(f"{folder} was trained with another tokenizer than {recipe.source} names; resume with "
                         "the same tokenizer, or train into another --out folder")
    now = config.to_dict()
    saved = info["config"]
    stream = [f"train.{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now"
              for k in DATA_STREAM_FIELDS if saved.get(k) != now[k]]
    if stream:
        raise TrainError(f"{folder} cannot continue with these settings: " + "; ".join(stream) +
                         ". They define the batches its data position counts in; keep them, or train into "
                         "another --out folder")
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        say("resuming with changed settings: " + ", ".join(changed))


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """YAML paths where two plain-data trees differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} in the checkpoint, {new!r} now"]


def _load_model_weights(folder: Path, model: HybridLM) -> None:
    try:
        _, saved, _ = load_checkpoint(folder)
    except CheckpointError as err:
        raise TrainError(f"cannot resume from {folder}: {err}. Delete it to resume from the checkpoint "
                         "before it") from None
    model.load_state_dict(saved.state_dict())


def _load_initial_weights(folder: Path, recipe: Recipe, model: HybridLM) -> None:
    """``train.init_from``: a fresh run's weights from a checkpoint folder (or a run folder's newest
    checkpoint) that holds this recipe's model."""
    if folder.is_dir() and not (folder / "recipe.yaml").is_file() and latest_checkpoint(folder) is not None:
        folder = latest_checkpoint(folder)
    try:
        saved_recipe, saved, _ = load_checkpoint(folder)
    except CheckpointError as err:
        raise TrainError(f"train.init_from: {err}") from None
    if saved_recipe.model.fingerprint() != recipe.model.fingerprint():
        raise TrainError(f"train.init_from: {folder} holds another model than {recipe.source} (architecture "
                         f"fingerprint {saved_recipe.model.fingerprint()} vs {recipe.model.fingerprint()}); "
                         f"train the recipe saved with it, {folder / 'recipe.yaml'}")
    model.load_state_dict(saved.state_dict())


def _load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: list[str], saved: dict) -> None:
    """Put the saved moments back; the hyperparameters stay those of the current settings. Under FSDP
    each process keeps its shard of each (whole) saved moment."""
    structure, tensors = saved["info"]["optimizer"], saved["tensors"]
    path = folder / TRAINER_TENSORS
    if structure.get("type") != type(optimizer).__name__ or structure.get("param_names") != names:
        raise TrainError(f"{folder / TRAINER_JSON}: the optimizer state is for other parameters than this "
                         f"model's {type(optimizer).__name__} (corrupt or edited?)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, name in enumerate(names):
        entries = {}
        for key in structure["state_keys"].get(name, []):
            tensor = tensors.get(f"optimizer.{name}.{key}")
            if tensor is None:
                raise TrainError(f"{path} lacks optimizer.{name}.{key} (corrupt?). Delete {folder} to resume "
                                 "from the checkpoint before it")
            entries[key] = distributed.shard_like(tensor, params[index])
        if entries:
            state[index] = entries
    current = optimizer.state_dict()
    try:
        optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    except (ValueError, RuntimeError) as err:
        raise TrainError(f"{path}: the optimizer state does not fit this model ({err})") from None
    shapes = [(n, tuple(state[i]["exp_avg"].shape), tuple(p.shape)) for i, (n, p) in enumerate(zip(names, params))
              if i in state and "exp_avg" in state[i] and state[i]["exp_avg"].shape != p.shape]
    if shapes:
        name, got, want = shapes[0]
        raise TrainError(f"{path}: optimizer state for {name} has shape {got}, the parameter {want} (corrupt?)")


# ----------------------------------------------------------------------------- metrics

class MetricsLog:
    """``metrics.jsonl``, one JSON object per line. Opening it for a run that starts at step ``s``
    keeps only the lines of steps ``<= s``: a killed run's lines past its last checkpoint (and a
    half-written last line) go, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_through: int):
        self.path = path
        kept = [line for line in _read_lines(path) if line["step"] <= keep_through]
        path.parent.mkdir(parents=True, exist_ok=True)
        if kept or path.exists():
            _write_atomic(path, "".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (unreadable lines skipped)."""
    return _read_lines(Path(path))


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Draw the training and validation loss against the step into ``png_path`` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = _read_lines(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val), "o-", label="validation", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
