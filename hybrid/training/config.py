"""A run's settings: a recipe's ``train:`` section, read strictly into a ``TrainConfig``.

``hybrid train RECIPE`` reads ``TrainConfig`` from the recipe's ``train:`` section; overrides (``--set
train.KEY=VALUE``, ``hybrid.cli.train``) go through the same strict checks: an unknown key
gets a did-you-mean, a wrong type or range names the YAML path. Every key is documented on the
fields of ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from blocks.config import ConfigError, require, require_choice
from blocks.errors import InputError
from hybrid.model.recipe import Recipe, RecipeError, build_dataclass, deep_merge
from hybrid.training import distributed

SCHEDULES = ("cosine", "linear", "constant")
AUTOCASTS = ("auto", "bf16", "off")
PARALLEL = distributed.PARALLEL_MODES


class TrainError(InputError):
    """A run that cannot start or resume (settings, checkpoints); the message says what and the fix."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A recipe's ``train:`` section. Exactly one of ``max_steps`` and ``max_tokens`` sets the length."""

    data: tuple[str, ...] | None = None  # text/JSONL/Parquet files, folders saved by datasets, folders (relative
    # paths: from the working directory); None: the built-in corpus (hybrid.training.data.builtin_corpus)
    text_field: str = "text"  # the JSONL key, or the Parquet / saved-dataset column, that holds the text
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
    document_isolation: bool = False  # keep the documents packed into a sequence apart: every layer restarts
    # at each document's first token, and that token is not predicted from the document before it
    parallel: str = "ddp"  # with several processes (torchrun): ddp (a full copy per process) | fsdp (weights,
    # gradients and optimizer state sharded across them) | none (refuses several processes)
    threads: int | None = None  # torch CPU threads; None: torch's default. Bitwise resume needs the same count
    time_limit_s: float | None = None  # stop cleanly (with a checkpoint) after this many seconds
    tensorboard: bool = False  # also write the metrics as TensorBoard events to out_dir/tensorboard (the
    # 'tensorboard' extra): tensorboard --logdir out_dir

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
