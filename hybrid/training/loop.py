"""The train loop: a recipe and its ``TrainConfig`` -> a trained model, in checkpoint folders that resume exactly.

``train`` tokenizes the data once (``hybrid.training.data``'s cache), builds the model (fresh, from
``init_from``, or resumed: ``hybrid.training.checkpointing``), and runs optimizer steps
(``hybrid.training.optimizer``), logging ``metrics.jsonl`` (``hybrid.training.metrics``; TensorBoard
events too with ``train.tensorboard``), validating, and checkpointing into its run folder
(``hybrid.formats.run_folder``).

Batches: ``batch_size`` is the number of sequences per optimizer step; ``grad_accum`` splits each
batch into that many micro-batches whose gradients add up to the whole batch's (a memory knob: the
data and the maths stay the same, only the float rounding of the sums changes). Batch ``step`` is a
pure function of (seed, step) (``hybrid.training.data.PackedBatches``), so the data position a
checkpoint saves is the step. Gradients are clipped by their global norm.

Document isolation (``document_isolation``): each batch also says where the documents packed into
its rows begin, the model keeps them apart (every layer restarts at a document's first token), and a
target that begins a document takes no loss; validation runs the same way.

A non-finite loss or gradient norm stops the run before the weights are touched
(``TrainingDiverged``, naming the step and the last good checkpoint, which is kept).

Several processes: ``torchrun --nproc_per_node=N -m hybrid train RECIPE`` trains data-parallel
(``hybrid.training.distributed``; ``parallel: ddp`` or ``fsdp``). ``batch_size`` stays the global
batch: each process takes ``batch_size / N`` of its sequences (and splits them into ``grad_accum``
micro-batches), so the losses match a one-process run up to float rounding. Every process computes,
but only the first (rank 0) prints, writes metrics and checkpoints; a checkpoint has the same files
whatever the process count, so a run may resume with another count (same ``batch_size``). Validation
is split across the processes. The output folder must be one that every process reads (one machine,
or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.formats.run_folder import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR, latest_checkpoint, remove_leftovers
from hybrid.formats.tokenizer import Tokenizer, load_tokenizer
from hybrid.model.device import DeviceError, resolve_device
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe
from hybrid.training import data as datalib
from hybrid.training import distributed
from hybrid.training.checkpointing import (
    load_initial_weights,
    resume_trainer,
    resume_weights,
    save_training_checkpoint,
)
from hybrid.training.config import TrainConfig, TrainError
from hybrid.training.metrics import MetricsLog, plot_metrics
from hybrid.training.optimizer import build_optimizer, lr_at


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the weights were not updated with it."""


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device_type``; no autocast when ``dtype`` is None."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def accumulate_gradients(model: HybridLM, inputs: Tensor, targets: Tensor, grad_accum: int,
                         autocast: torch.dtype | None = None, document_starts: Tensor | None = None) -> float:
    """Forward and backward over ``inputs``/``targets`` (B, T) in ``grad_accum`` equal micro-batches.

    The gradients added to ``.grad`` are those of the whole batch's mean next-token loss, which is
    returned; targets of -100 take no loss (``cross_entropy``'s ``ignore_index``: the mean is then over
    each micro-batch's scored targets). ``autocast``: run the forward under autocast to this dtype
    (the loss is taken in fp32). A DDP ``model`` all-reduces the gradients in the last micro-batch only.

    ``document_starts`` (B, T) bool: the rows pack documents that the model keeps apart (``HybridLM``).
    The targets that begin a document take no loss, so micro-batches score different numbers of
    targets: the loss is then the mean over the whole batch's scored targets, whatever ``grad_accum``.
    """
    total = torch.zeros((), device=inputs.device)
    starts = [None] * grad_accum if document_starts is None else document_starts.chunk(grad_accum)
    scored = None if document_starts is None else (targets != datalib.IGNORE).sum().clamp_min(1)
    for i, (x, y, s) in enumerate(zip(inputs.chunk(grad_accum), targets.chunk(grad_accum), starts)):
        with distributed.gradient_sync(model, enabled=i == grad_accum - 1):
            with autocast_context(inputs.device.type, autocast):
                logits = model(x, document_starts=s).logits
            if scored is None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / grad_accum
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / scored
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
             autocast: torch.dtype | None = None, document_starts=None) -> float:
    """Mean next-token loss over the first ``val_batches`` batches of held-out ``tokens`` (in order);
    with their ``document_starts``, the documents kept apart as in training (document isolation).

    Several processes share the batches (batch ``i`` in process ``i % world_size``) and add up their
    sums. Under FSDP every forward is a collective, so a process that has run out of batches runs a
    last one again, uncounted, until all have done as many forwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rank, size = distributed.rank(), distributed.world_size()
    batches = [b for _, b in zip(range(config.val_batches), datalib.iterate_eval_batches(
        tokens, config.seq_len, config.batch_size, document_starts))]
    for i in range(rank, math.ceil(len(batches) / size) * size, size):
        x, y, *starts = (t.to(device) for t in batches[min(i, len(batches) - 1)])
        with autocast_context(device.type, autocast):
            logits = model(x, document_starts=starts[0] if starts else None).logits
        if i < len(batches):
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += int((y != datalib.IGNORE).sum())
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
        device = distributed.local_device(resolve_device(config.device, "train.device"))
        with distributed.process_group(device):
            return _train(recipe, config, resume, progress, batches, objective, device)
    except (DeviceError, distributed.DistributedError) as err:
        raise TrainError(str(err)) from None


@dataclasses.dataclass
class _Run:
    """What the steps of one ``train`` call work with, once ``_start`` has set it up."""

    recipe: Recipe
    config: TrainConfig
    out_dir: Path
    device: torch.device
    autocast: torch.dtype | None
    tokenizer: Tokenizer
    batches: Any  # .batch(step) -> (inputs, targets), or (inputs, targets, document starts)
    val_tokens: Any  # held-out tokens (None for synthetic batches, which do not validate)
    val_starts: Any  # where documents start in them (document isolation), or None
    model: nn.Module  # wrapped for data parallelism (distributed.wrap)
    step_loss: Callable[[HybridLM, Tensor, Tensor, int, torch.dtype | None], float]
    optimizer: torch.optim.Optimizer
    names: list[str]  # parameter names in the optimizer's order
    step: int
    losses: list[float]  # the losses since the last metrics line (saved with each checkpoint)
    metrics: MetricsLog | None  # the main process's metrics.jsonl (None elsewhere)
    progress: bool
    summary: TrainSummary


def _train(recipe: Recipe, config: TrainConfig, resume: bool, progress: bool, batches,
           objective: Objective | None, device: torch.device) -> TrainSummary:
    """``train`` in this process, once it has joined the other processes of its launch (if any)."""
    started = time.monotonic()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    run = _start(recipe, config, resume, progress and distributed.is_main(), batches, objective, device)
    if run.step < config.total_steps:
        _steps(run, started)
    return run.summary


def _start(recipe: Recipe, config: TrainConfig, resume: bool, progress: bool, batches,
           objective: Objective | None, device: torch.device) -> _Run:
    """Check the settings, find the checkpoint to resume, and build the data, model and optimizer.
    ``progress``: this process prints (one progress bar, one copy of each message)."""
    autocast = _autocast_dtype(config.autocast, device)
    out_dir = Path(config.out_dir) if config.out_dir is not None else Path("runs") / Path(recipe.source).stem
    say = _printer(progress)
    ranks = distributed.world_size()
    if ranks > 1 and (batches is not None or objective is not None):
        raise TrainError("synthetic batches and training objectives (convert's stages) train in one process; "
                         "start it without torchrun")
    if config.document_isolation and (batches is not None or objective is not None):
        raise TrainError("train.document_isolation needs text data and the next-token loss: synthetic batches "
                         "and convert's objectives say nothing of documents; set it to false")
    if config.batch_size % (ranks * config.grad_accum) != 0:
        raise TrainError(f"train.batch_size {config.batch_size} (the global batch) must split evenly into "
                         f"{ranks} processes x train.grad_accum {config.grad_accum} micro-batches")
    if distributed.is_main():
        remove_leftovers(out_dir)
    resume_from = distributed.from_main(latest_checkpoint(out_dir))  # all processes resume the same folder
    if resume_from is not None and not resume:
        raise TrainError(f"{out_dir} already holds checkpoints (up to {resume_from.name}); resume them "
                         "(drop --no-resume) or train into another --out folder")
    source = Path(recipe.source)
    tokenizer = load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None,
                               vocab_size=recipe.model.vocab_size)
    batches, val_tokens, val_starts = _data(config, tokenizer, progress, batches)

    torch.manual_seed(config.seed)
    model = HybridLM(recipe.model)
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = resume_weights(resume_from, recipe, config, tokenizer, model, say)
    elif config.init_from is not None:
        load_initial_weights(Path(config.init_from), recipe, model)
    model = _prepare_model(model, config, objective, device)
    optimizer, names = build_optimizer(distributed.unwrap(model), config)
    step, losses = 0, []
    if resume_from is not None:
        step, losses = resume_trainer(resume_from, saved, optimizer, names, device)
        say(f"resuming from {resume_from} (step {step})")
    if ranks > 1:  # each process its own random stream from here on (see distributed.rank_seed)
        torch.manual_seed(distributed.rank_seed(config.seed, step))

    metrics = None
    if distributed.is_main():
        metrics = MetricsLog(out_dir / METRICS_FILE, keep_through=step,
                             tensorboard=out_dir / TENSORBOARD_DIR if config.tensorboard else None)
    total = config.total_steps
    summary = TrainSummary(out_dir, step, step, total, "already_done" if step >= total else "completed",
                           resume_from, None, None, 0.0, 0.0)
    step_loss = accumulate_gradients if objective is None else objective.loss
    return _Run(recipe, config, out_dir, device, autocast, tokenizer, batches, val_tokens, val_starts, model,
                step_loss, optimizer, names, step, losses, metrics, progress, summary)


def _data(config: TrainConfig, tokenizer: Tokenizer, progress: bool, batches) -> tuple[Any, Any, Any]:
    """(training batches, validation tokens, where documents start in them): ``config.data``'s text
    packed into batches, or the synthetic ``batches`` given (which have no validation text). The
    document starts are None without ``document_isolation``."""
    if batches is not None:
        if config.val_every:
            raise TrainError("train.val_every must be 0 when the batches come from a synthetic source: "
                             "validation reads held-out text (evaluate the task yourself)")
        return batches, None, None
    with distributed.main_first():  # the main process tokenizes; the others open its cache file
        train_tokens, val_tokens, train_starts, val_starts = _prepare_data(config, tokenizer, progress)
    ranks = distributed.world_size()
    return datalib.PackedBatches(train_tokens, config.seq_len, config.batch_size // ranks, config.seed,
                                 rank=distributed.rank(), world_size=ranks,
                                 document_starts=train_starts), val_tokens, val_starts


def _prepare_model(model: HybridLM, config: TrainConfig, objective: Objective | None,
                   device: torch.device) -> nn.Module:
    """The model on ``device`` in train mode, with only the objective's parameters trainable,
    activation checkpointing if asked, wrapped for data parallelism."""
    model.to(device).train()
    if objective is not None and objective.trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(objective.trainable(name))
        if not any(p.requires_grad for p in model.parameters()):
            raise TrainError("the objective trains none of the model's parameters")
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    return distributed.wrap(model, config.parallel, device)


@dataclasses.dataclass
class _Throughput:
    """Tokens per second of training since the last metrics line; validation and checkpoint time
    (``pause``) is left out."""

    start: float = dataclasses.field(default_factory=time.monotonic)
    tokens: int = 0
    pause: float = 0.0

    def tokens_per_s(self, now: float) -> float:
        return self.tokens / max(now - self.start - self.pause, 1e-9)


def _steps(run: _Run, started: float) -> None:
    """Optimizer steps from ``run.step`` to the last (or the time limit), with metrics, validation and
    checkpoints as ``run.config`` says; fills in ``run.summary``."""
    from tqdm.auto import tqdm

    config, summary, total = run.config, run.summary, run.config.total_steps
    bar = tqdm(total=total, initial=run.step, unit="step", disable=not run.progress, dynamic_ncols=True,
               file=sys.stderr)
    throughput, train_start = _Throughput(), time.monotonic()
    try:
        while run.step < total:
            lr, loss, grad_norm = _optimizer_step(run)
            run.step += 1
            run.losses.append(loss)
            throughput.tokens += config.tokens_per_step
            bar.update(1)
            timed_out = (config.time_limit_s is not None and
                         distributed.any_process(time.monotonic() - started >= config.time_limit_s))
            finished = run.step == total or timed_out
            record: dict[str, Any] = {}
            if run.step % config.log_every == 0 or finished:
                now = time.monotonic()
                summary.loss = sum(run.losses) / len(run.losses)
                record.update(loss=summary.loss, lr=lr, grad_norm=grad_norm, tokens=run.step * config.tokens_per_step,
                              tokens_per_s=throughput.tokens_per_s(now))
                bar.set_postfix(loss=f"{summary.loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                run.losses, throughput = [], _Throughput(start=now)
            pause_start = time.monotonic()
            _validate_and_save(run, record, finished, bar, train_start)
            throughput.pause += time.monotonic() - pause_start
            if timed_out and run.step < total:
                summary.stopped = "time_limit"
                break
    finally:
        bar.close()
        if run.metrics is not None:
            run.metrics.close()
            if run.metrics.path.is_file():
                plot_metrics(run.metrics.path, run.out_dir / PLOT_FILE)
    summary.step = run.step
    summary.elapsed_s = time.monotonic() - train_start
    summary.tokens_per_s = (run.step - summary.start_step) * config.tokens_per_step / max(summary.elapsed_s, 1e-9)


def _optimizer_step(run: _Run) -> tuple[float, float, float]:
    """One optimizer step on batch ``run.step``: (its learning rate, mean loss, gradient norm). A
    non-finite loss or gradient norm raises ``TrainingDiverged`` before the weights change."""
    config = run.config
    lr = lr_at(run.step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inputs, targets, *starts = (t.to(run.device, non_blocking=True) for t in run.batches.batch(run.step))
    loss = run.step_loss(run.model, inputs, targets, config.grad_accum, run.autocast, *starts)
    # under FSDP the norm comes back as a replicated DTensor (the shards' norms combined)
    grad_norm = distributed.full_tensor(
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or math.inf)).item()
    loss, grad_norm = distributed.mean([loss, grad_norm])  # every process logs and decides alike
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        last = latest_checkpoint(run.out_dir)
        keep = (f"the last good checkpoint, {last}, is kept: resume from it with a lower train.lr, "
                "a longer train.warmup_steps or train.grad_clip set" if last is not None else
                "no checkpoint was written before it (lower train.lr or set train.grad_clip)")
        raise TrainingDiverged(f"step {run.step + 1}: the training loss is {loss} (gradient norm {grad_norm}); "
                               f"stopped without applying this step. {keep}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, loss, grad_norm


def _validate_and_save(run: _Run, record: dict[str, Any], finished: bool, bar, train_start: float) -> None:
    """After step ``run.step``: validate, write the metrics line ``record`` and save a checkpoint,
    each when it is due (or ``finished``)."""
    config, summary, step = run.config, run.summary, run.step
    if config.val_every and (step % config.val_every == 0 or finished):
        summary.val_loss = evaluate(distributed.unwrap(run.model), run.val_tokens, config, run.device, run.autocast,
                                    run.val_starts)
        record.update(val_loss=summary.val_loss, val_ppl=math.exp(min(summary.val_loss, 700)))
        if run.progress:
            bar.write(f"step {step}: val loss {summary.val_loss:.4f}, ppl {record['val_ppl']:.2f}", file=sys.stderr)
    if record and run.metrics is not None:
        run.metrics.write({"step": step, **record})
    if step % config.ckpt_every == 0 or finished:
        summary.checkpoint = save_training_checkpoint(
            run.out_dir, step, run.recipe, config, run.model, run.tokenizer, run.optimizer, run.names,
            {"loss_window": list(run.losses), "elapsed_s": time.monotonic() - train_start}, config.keep_last)
        if run.metrics is not None:
            plot_metrics(run.metrics.path, run.out_dir / PLOT_FILE)
        distributed.barrier()  # the checkpoint is complete before any process goes on or ends


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
    """(train tokens, validation tokens, where documents start in each) from the cached token file of
    ``config.data``; the document starts are None without ``document_isolation``."""
    sources = list(config.data) if config.data is not None else [datalib.builtin_corpus()]
    cache = Path(config.cache_dir) if config.cache_dir is not None else datalib.default_cache_dir()
    tokens = datalib.build_token_cache(sources, tokenizer, cache, text_field=config.text_field, progress=progress)
    train, val = datalib.split_train_val(tokens, config.val_fraction, config.seq_len)
    if not config.document_isolation:
        return train, val, None, None
    return train, val, *datalib.split_document_starts(tokens.document_starts, len(train))
