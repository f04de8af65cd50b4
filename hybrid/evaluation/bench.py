"""What ``hybrid bench`` measures: prefill time, decode time per token and state bytes against context
length, for whole models (recipes, checkpoints) or one mixer, each against the full-attention model
of the same size measured in the same run.

What is measured, at each context length T:

* **prefill**: a real forward over T random tokens (``hybrid.generation.generate.prefill``: one forward by
  default, ``prefill_chunk`` tokens per forward where memory needs it), asking only for the last
  position's logits as generation does. One short warm-up forward first; contexts above
  ``max_prefill`` are skipped (full attention at 32k on a CPU takes minutes), their columns empty.
* **decode**: the time per token of ``steps`` consecutive one-token forwards starting at position
  T, each fed the previous step's argmax. The state they start from is ``state_at(model, T)``:
  exactly the shapes a T-token prefill leaves (KVM slots and window, KV cache, recurrent
  matrices), with random contents. Decode cost depends only on those shapes, while a real prefill
  of T tokens would cost more than the measurement itself for full attention on a CPU (and would
  have to be repeated for every repeat, as decoding grows the state). The mean over ``steps``
  tokens includes the chunk-boundary state updates a KVM layer makes every ``chunk_len`` tokens,
  amortised as in a long generation (the default, 256, is one paper-sized chunk). These are the
  toolkit's own layers as ``hybrid generate`` runs them: full attention appends to its KV cache in
  place (``blocks.token_buffer``; the first step copies the cache into a buffer with room).
* **state bytes** by kind (recurrent, kvm, window, kv) after T tokens, from ``state_at`` (exact).

Every timing is repeated ``repeats`` times and reported as median, min and max (spread = max -
min). Ratios are against the baseline measured in the same run: prefill and decode speed-up =
baseline time / model time; state fraction = model bytes / baseline bytes.

The baseline (``full_attention_config``): the same model with every mixer replaced by causal
softmax ``attention``. A layer that already projects q/k/v (KVM, sliding-window and block
sliding-window attention) keeps its projection options: heads, head_dim, q/k norm, RoPE, token
shift, value residual; an LRNN layer (GLA, Mamba-2, Gated DeltaNet, RWKV-7) takes those of the
model's first projected layer, so the baseline of a hybrid is the uniform transformer its
attention layers imply (``hybrids/gla_kvm`` -> exactly ``paper/120m/gptalpha``); a model of LRNN
layers only gets attention with the layer's ``num_heads`` and head_dim = d_model / num_heads.
Everything else (width, depth, MLPs, norms, vocabulary) is unchanged. A baseline shared by
several models is measured once; a model that is already full attention is its own baseline.

A single mixer (``single_mixer_config``) is benchmarked as a one-layer model whose other parts
cost next to nothing: byte vocabulary (only the last position's logits are computed) and a
32-wide MLP, so the times are the mixer's, projections included.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from blocks.attention import AttentionConfig
from blocks.projection import ProjectionConfig
from blocks.registry import get_mixer
from blocks.state import STATE_KINDS
from hybrid.generation.generate import prefill, synchronize
from hybrid.model.describe import human_bytes
from hybrid.model.model import HybridLM
from hybrid.model.recipe import LayerConfig, ModelConfig, recipe_from_dict
from hybrid.model.state_shapes import state_at

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
SINGLE_MIXER_VOCAB = 256
SINGLE_MIXER_MLP = 32
WARMUP_TOKENS = 256


# ----------------------------------------------------------------------------- models to compare

def full_attention_config(config: ModelConfig) -> ModelConfig:
    """``config`` with every mixer replaced by full causal attention (see the module docstring)."""
    projection_fields = [f.name for f in dataclasses.fields(ProjectionConfig)]

    def as_attention(options) -> AttentionConfig:
        return AttentionConfig(**{name: getattr(options, name) for name in projection_fields})

    projected = [layer.options for layer in config.layers if isinstance(layer.options, ProjectionConfig)]
    template = as_attention(projected[0]) if projected else None
    names: dict[AttentionConfig, str] = {}
    layers = []
    for layer in config.layers:
        if isinstance(layer.options, ProjectionConfig):
            options = as_attention(layer.options)
        elif template is not None:
            options = template
        else:
            heads = getattr(layer.options, "num_heads", None) or max(1, config.d_model // 64)
            options = AttentionConfig(num_heads=heads, head_dim=config.d_model // heads)
        name = names.setdefault(options, "attention" if not names else f"attention_{len(names) + 1}")
        layers.append(LayerConfig(name, "attention", options))
    return dataclasses.replace(config, layers=tuple(layers))


def single_mixer_config(mixer: str, options: dict, d_model: int) -> ModelConfig:
    """A one-layer model around one mixer (byte vocabulary, 32-wide MLP): the mixer's cost alone.
    ``options`` are the mixer's recipe options (validated as in a recipe)."""
    get_mixer(mixer)  # an unknown name fails here, listing the valid ones
    data = {"model": {"vocab_size": SINGLE_MIXER_VOCAB, "d_model": d_model, "n_layers": 1, "layers": [mixer],
                      "mixers": {mixer: dict(options)}, "block": {"mlp_hidden": SINGLE_MIXER_MLP}}}
    return recipe_from_dict(data, source=f"--mixer {mixer}").model


def describe_layers(config: ModelConfig) -> str:
    """The layer pattern in mixer symbols, e.g. ``GGGKGGGK``."""
    return "".join(get_mixer(layer.mixer).symbol for layer in config.layers)


# ----------------------------------------------------------------------------- timing

@dataclasses.dataclass(frozen=True)
class Timing:
    """Repeated wall-clock measurements of one thing (seconds)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def spread(self) -> float:
        return self.max - self.min


def repeat(repeats: int, fn: Callable[..., float], *args) -> Timing:
    """``repeats`` results of ``fn(*args)`` (each returns the seconds it measured)."""
    return Timing(tuple(fn(*args) for _ in range(repeats)))


@torch.no_grad()
def prefill_seconds(model: HybridLM, context: int, chunk: int | None, generator: torch.Generator) -> float:
    """Seconds to prefill ``context`` random tokens (one forward, or ``chunk`` tokens per forward)."""
    tokens = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(model.device)
    synchronize(model.device)
    start = time.perf_counter()
    prefill(model, tokens, chunk_size=chunk or context)
    synchronize(model.device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: HybridLM, context: int, steps: int, generator: torch.Generator) -> float:
    """Mean seconds per token of ``steps`` one-token forwards from a state shaped as after ``context``
    tokens (``state_at``; see the module docstring), after one untimed warm-up step."""
    state = state_at(model, context)
    token = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator).to(model.device)
    model(token, state)  # warm-up (allocator, lazy init); its state is discarded
    synchronize(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, state, last_only=True)
        state = out.state
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(model.device)
    return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- the benchmark

@dataclasses.dataclass
class Subject:
    """A model to measure: ``baseline`` names the row its ratios are against (itself for a baseline)."""

    name: str
    model: HybridLM
    role: str  # "model" | "baseline"
    baseline: str


@dataclasses.dataclass
class BenchSettings:
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    repeats: int = 3
    steps: int = 256
    max_prefill: int | None = None  # None: prefill at every context; 0: never
    prefill_chunk: int | None = None  # None: one forward
    seed: int = 0

    def __post_init__(self):
        for name in ("repeats", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError(f"contexts must be positive token counts, got {self.contexts}")


@dataclasses.dataclass
class BenchRow:
    """One model at one context length: the CSV row (``CSV_FIELDS``)."""

    model: str
    role: str
    baseline: str
    layers: str
    parameters: int
    context: int
    prefill: Timing | None
    decode: Timing
    state_bytes: dict[str, int]
    prefill_speedup: float | None = None
    decode_speedup: float | None = None
    state_fraction: float | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.state_bytes.values())

    def csv_record(self) -> dict:
        def fmt(x: float | None) -> str:
            return "" if x is None else f"{x:.6g}"

        p = self.prefill
        record = {"model": self.model, "role": self.role, "baseline": self.baseline, "layers": self.layers,
                  "parameters": self.parameters, "context": self.context,
                  "prefill_s_median": fmt(p and p.median), "prefill_s_min": fmt(p and p.min),
                  "prefill_s_max": fmt(p and p.max), "prefill_s_spread": fmt(p and p.spread),
                  "prefill_tokens_per_s": fmt(p and self.context / p.median),
                  "decode_ms_median": fmt(self.decode.median * 1e3), "decode_ms_min": fmt(self.decode.min * 1e3),
                  "decode_ms_max": fmt(self.decode.max * 1e3), "decode_ms_spread": fmt(self.decode.spread * 1e3),
                  "decode_tokens_per_s": fmt(1 / self.decode.median),
                  "state_bytes": self.total_bytes}
        record.update({f"state_bytes_{kind}": self.state_bytes.get(kind, 0) for kind in STATE_KINDS})
        record.update({"prefill_speedup": fmt(self.prefill_speedup), "decode_speedup": fmt(self.decode_speedup),
                       "state_fraction": fmt(self.state_fraction)})
        return record


CSV_FIELDS = list(BenchRow("", "", "", "", 0, 1, None, Timing((1.0,)), {}).csv_record())


def subjects_for(named_models: Sequence[tuple[str, HybridLM]], with_baseline: bool = True) -> list[Subject]:
    """The models to measure in the order given, each model's full-attention baseline just before it.
    A baseline is built with random weights (the model's dtype and device) unless one of the given
    models is that very architecture, which then serves as the baseline under its own name. Models
    sharing a baseline measure it once; a model that is already full attention is its own baseline."""
    by_fingerprint: dict[str, Subject] = {}
    ordered: list[Subject] = []
    given: dict[str, tuple[str, HybridLM]] = {}
    for name, model in named_models:
        given.setdefault(model.config.fingerprint(), (name, model))

    def add(subject: Subject, fingerprint: str) -> Subject:
        by_fingerprint[fingerprint] = subject
        ordered.append(subject)
        return subject

    for name, model in named_models:
        fingerprint = model.config.fingerprint()
        if fingerprint in by_fingerprint:
            continue
        if not with_baseline:
            add(Subject(name, model, "model", ""), fingerprint)
            continue
        base_config = full_attention_config(model.config)
        base_fingerprint = base_config.fingerprint()
        if base_fingerprint == fingerprint:
            add(Subject(name, model, "baseline", name), fingerprint)
            continue
        base = by_fingerprint.get(base_fingerprint)
        if base is None and base_fingerprint in given:
            base_name, base_model = given[base_fingerprint]
            base = add(Subject(base_name, base_model, "baseline", base_name), base_fingerprint)
        if base is None:
            torch.manual_seed(0)
            dtype = next(model.parameters()).dtype
            baseline = HybridLM(base_config).eval().to(device=model.device, dtype=dtype)
            label = f"full attention ({name})"
            base = add(Subject(label, baseline, "baseline", label), base_fingerprint)
        add(Subject(name, model, "model", base.name), fingerprint)
    return ordered


def run_bench(subjects: Sequence[Subject], settings: BenchSettings,
              log: Callable[[str], None] = print) -> list[BenchRow]:
    """Measure every subject at every context; rows in subject order, then context order."""
    rows: list[BenchRow] = []
    for subject in subjects:
        model = subject.model
        generator = torch.Generator().manual_seed(settings.seed)
        torch.manual_seed(settings.seed)  # state_at's random contents
        layers = describe_layers(model.config)
        log(f"\n{subject.name} [{subject.role}]: {layers}, d_model {model.config.d_model}, "
            f"{model.num_parameters() / 1e6:.2f}M parameters")
        log(f"{'T':>7} {'prefill s':>10} {'spread':>7} {'decode ms/tok':>13} {'spread':>7}  state by kind")
        prefill_seconds(model, min(WARMUP_TOKENS, min(settings.contexts)), settings.prefill_chunk, generator)
        for context in settings.contexts:
            measure_prefill = settings.max_prefill is None or context <= settings.max_prefill
            prefill_timing = None
            if measure_prefill:
                prefill_timing = repeat(settings.repeats, prefill_seconds, model, context, settings.prefill_chunk,
                                        generator)
            decode_timing = repeat(settings.repeats, decode_seconds, model, context, settings.steps, generator)
            nbytes = state_at(model, context, device="meta").bytes_by_kind()
            row = BenchRow(subject.name, subject.role, subject.baseline, layers, model.num_parameters(), context,
                           prefill_timing, decode_timing, nbytes)
            rows.append(row)
            kinds = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(nbytes.items()))
            prefill_text = (f"{prefill_timing.median:>10.4f} {prefill_timing.spread:>7.4f}" if prefill_timing
                            else f"{'-':>10} {'-':>7}")
            log(f"{context:>7} {prefill_text} {decode_timing.median * 1e3:>13.3f} "
                f"{decode_timing.spread * 1e3:>7.3f}  {kinds}")
    add_ratios(rows)
    return rows


def add_ratios(rows: Sequence[BenchRow]) -> None:
    """Fill each row's ratios against its baseline's row at the same context."""
    by_key = {(row.model, row.context): row for row in rows}
    for row in rows:
        base = by_key.get((row.baseline, row.context))
        if base is None:
            continue
        if row.prefill is not None and base.prefill is not None:
            row.prefill_speedup = base.prefill.median / row.prefill.median
        row.decode_speedup = base.decode.median / row.decode.median
        row.state_fraction = row.total_bytes / base.total_bytes if base.total_bytes else None


def summary(rows: Sequence[BenchRow]) -> str:
    """Ratios of every non-baseline model at each context, as text."""
    lines = [f"{'model':<40} {'T':>7} {'prefill x':>9} {'decode x':>9} {'state %':>8}"]
    for row in rows:
        if row.role == "baseline" or row.decode_speedup is None:
            continue
        prefill_text = f"{row.prefill_speedup:>8.2f}x" if row.prefill_speedup else f"{'-':>9}"
        state_text = f"{100 * row.state_fraction:>8.2f}" if row.state_fraction is not None else f"{'-':>8}"
        lines.append(f"{row.model[:40]:<40} {row.context:>7} {prefill_text} {row.decode_speedup:>8.2f}x {state_text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output files

def write_csv(rows: Sequence[BenchRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_record())
    return path


def plot(rows: Sequence[BenchRow], path: str | Path, title: str = "") -> Path:
    """Three panels against context length, log axes (the paper's style): prefill seconds, decode
    milliseconds per token at that position, state MiB. Bars span min..max of the repeats;
    baselines are dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    models = list(dict.fromkeys(row.model for row in rows))
    for name in models:
        mine = [row for row in rows if row.model == name]
        style = {"linestyle": "--" if mine[0].role == "baseline" else "-", "marker": "o", "markersize": 4,
                 "capsize": 3, "label": name}
        timed = [row for row in mine if row.prefill is not None]
        if timed:
            axes[0].errorbar([r.context for r in timed], [r.prefill.median for r in timed],
                             yerr=[[r.prefill.median - r.prefill.min for r in timed],
                                   [r.prefill.max - r.prefill.median for r in timed]], **style)
        axes[1].errorbar([r.context for r in mine], [r.decode.median * 1e3 for r in mine],
                         yerr=[[(r.decode.median - r.decode.min) * 1e3 for r in mine],
                               [(r.decode.max - r.decode.median) * 1e3 for r in mine]], **style)
        axes[2].plot([r.context for r in mine], [r.total_bytes / 2**20 for r in mine],
                     linestyle=style["linestyle"], marker="o", markersize=4, label=name)
    for ax, label in zip(axes, ("prefill time (s)", "decode time per token at position T (ms)", "state (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def header(settings: BenchSettings, device: torch.device) -> str:
    """The settings line printed above the tables."""
    prefill = ("off" if settings.max_prefill == 0 else
               f"up to T = {settings.max_prefill}" if settings.max_prefill else "every T")
    chunk = f"{settings.prefill_chunk} tokens per forward" if settings.prefill_chunk else "one forward"
    return (f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch 1; "
            f"median of {settings.repeats}; prefill {prefill} ({chunk}); decode: mean over {settings.steps} "
            f"steps from a state shaped as after T tokens")


def write_outputs(rows: Sequence[BenchRow], out_dir: str | Path, title: str, log: TextIO) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    csv_path = write_csv(rows, out_dir / "bench.csv")
    png_path = plot(rows, out_dir / "bench.png", title)
    print(f"wrote {csv_path} and {png_path}", file=log)
    return csv_path, png_path
