"""Sane limits on what a recipe may ask for, checked before anything is allocated.

A recipe is a few numbers, and a few wrong digits ask for petabytes: ``vocab_size: 1000000000000``,
``layers: "G*99999999999"``, a KVM ``chunk_len`` longer than any context. Torch would fail deep
inside an allocation (or the machine would swap for minutes), so ``check_model_size`` estimates
what the model needs first, without building it (each distinct mixer is built once on the meta
device, which holds shapes and no data), and refuses with the estimate in the message:

* at most ``MAX_LAYERS`` layers, and a pattern is never expanded beyond that;
* no weight wider than ``MAX_WIDTH`` in any dimension, checked after the memory (an expansion factor
  of a million makes a layer whose activations and state no machine holds, even where its weights fit);
* no window (KVM and block sliding-window chunks times their count, sliding-window attention's
  ``window``) longer than ``MAX_CONTEXT``, the longest context the toolkit sizes or runs;
* the weights in fp32, plus the decode state at batch 1 (the full window of every windowed layer,
  the fixed-size state of every recurrent one, from a one-token forward on the meta device), must
  fit this machine's memory: every model is built on the CPU first.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from blocks.config import ConfigError, check_heads
from blocks.registry import get_mixer

MAX_LAYERS = 4096
MAX_CONTEXT = 1 << 24
"""The longest context (tokens) that commands size, measure or run: 16M."""
MAX_WIDTH = 1 << 24
"""The widest any weight may be in any dimension (the vocabulary, d_model, a layer's projections)."""
FP32_BYTES = 4


def memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: float) -> str:
    """A byte count in GiB, for the messages here (which may be about petabytes)."""
    return f"{n / 2 ** 30:,.1f} GiB"


def check_model_size(config: Any) -> None:
    """Refuse a ``ModelConfig`` whose windows exceed ``MAX_CONTEXT``, whose weights and decode state
    would not fit in memory, or that is wider than ``MAX_WIDTH``; a ``ConfigError`` names the recipe
    path and the estimate."""
    d, vocab = config.d_model, config.vocab_size
    parts = {f"embedding (vocab_size {vocab} x d_model {d})": vocab * d}
    if not config.tie_embeddings:
        parts[f"untied head (vocab_size {vocab} x d_model {d})"] = vocab * d
    hidden = config.block.hidden_size(d)
    parts[f"{config.n_layers} MLPs (d_model {d} x hidden {hidden})"] = config.n_layers * _mlp_weights(config, hidden)
    state_bytes = 0
    built: dict[str, tuple[int, int, str]] = {}
    for layer in config.layers:
        if layer.name not in built:
            built[layer.name] = _mixer_size(layer, d, config.n_layers)
        weights, state, _ = built[layer.name]
        parts[f"mixers {layer.name}"] = parts.get(f"mixers {layer.name}", 0) + weights
        state_bytes += state
    weight_bytes = FP32_BYTES * sum(parts.values())
    available = memory_bytes()
    if weight_bytes + state_bytes > available:
        largest = sorted(parts.items(), key=lambda item: -item[1])[:2]
        detail = ", ".join(f"{name} {gib(FP32_BYTES * n)}" for name, n in largest)
        state = f", and the decode state at batch 1 {gib(state_bytes)}" if state_bytes >= 2 ** 26 else ""
        raise ConfigError("model", f"the weights would need {gib(weight_bytes)} in fp32 ({detail}){state}: more "
                                   f"than this machine's {gib(available)} of memory; choose smaller sizes")
    too_wide = [(path, what) for path, what in (
        ("model.vocab_size", f"a vocabulary of {vocab:,}" if vocab > MAX_WIDTH else ""),
        ("model.d_model", f"a model {d:,} wide" if d > MAX_WIDTH else ""),
        ("model.block", f"an MLP hidden layer {hidden:,} wide" if hidden > MAX_WIDTH else ""),
        *((f"model.mixers.{name}", wide) for name, (_, _, wide) in built.items())) if what]
    if too_wide:
        path, what = too_wide[0]
        raise ConfigError(path, f"{what} is wider than any layer may be (at most {MAX_WIDTH:,} in each dimension): "
                                "an option is too large")


def _mlp_weights(config: Any, hidden: int) -> int:
    block, d = config.block, config.d_model
    projections = 3 if block.mlp == "swiglu" else 2
    biases = (projections - 1) * hidden + d if block.mlp_bias else 0
    return projections * d * hidden + biases + (d if block.mlp_token_shift else 0)


def _mixer_size(layer: Any, d_model: int, n_layers: int) -> tuple[int, int, str]:
    """(parameters of one such mixer, bytes of its decode state at batch 1, and what of it is wider
    than ``MAX_WIDTH``: '' when nothing is)."""
    path = f"model.mixers.{layer.name}"
    window = _window_tokens(path, layer.options)
    mixer = _build_on_meta(path, layer, d_model, n_layers)
    too_wide = next((f"its weight {name} {tuple(weight.shape)}" for name, weight in mixer.named_parameters()
                     if max(weight.shape, default=0) > MAX_WIDTH), "")
    weights = sum(p.numel() for p in mixer.parameters())
    if window is not None:  # the keys and values of a full window (its buffer holds more)
        options = layer.options
        _, kv_heads, head_dim = check_heads(d_model, options.num_heads, options.num_kv_heads, options.head_dim)
        return weights, 2 * window * kv_heads * head_dim * FP32_BYTES, too_wide
    if get_mixer(layer.mixer).state_kind != "recurrent":
        return weights, 0, too_wide
    try:  # a fixed-size state: what one token leaves, shapes only
        with torch.device("meta"), torch.no_grad():
            _, state = mixer(torch.empty(1, 1, d_model), None, {})
    except (RuntimeError, ValueError, NotImplementedError):  # not on meta: the real forward says what it needs
        return weights, 0, too_wide
    return weights, state.nbytes(), too_wide


def _window_tokens(path: str, options: Any) -> int | None:
    """The tokens a windowed mixer keeps (KVM and block sliding window: its chunks; sliding window:
    ``window``), at most ``MAX_CONTEXT``; None for other mixers."""
    window = getattr(options, "window", None)
    chunk = getattr(options, "chunk_len", None)
    if chunk is not None:
        window = chunk * options.n_bswa_chunks
        if window > MAX_CONTEXT:
            raise ConfigError(f"{path}.chunk_len", f"chunk_len {chunk} x n_bswa_chunks {options.n_bswa_chunks} is "
                                                   f"a window of {window:,} tokens, longer than any context "
                                                   f"(at most {MAX_CONTEXT:,}): choose a smaller chunk_len")
    elif window is not None and window > MAX_CONTEXT:
        raise ConfigError(f"{path}.window", f"{window:,} tokens is longer than any context (at most "
                                            f"{MAX_CONTEXT:,}): choose a smaller window")
    return window


def _build_on_meta(path: str, layer: Any, d_model: int, n_layers: int) -> torch.nn.Module:
    """The layer's mixer on the meta device (shapes, no data); its rules that need ``d_model`` are
    checked on the way, their errors named by the recipe path."""
    options = layer.options
    try:
        with torch.device("meta"):
            return get_mixer(layer.mixer).cls(options, d_model=d_model, layer_idx=0, n_layers=n_layers)
    except ConfigError as err:  # a rule that needs d_model (head sizes)
        raise ConfigError(f"{path}.{err.field}", err.reason) from None
    except (OverflowError, TypeError, RuntimeError):  # torch refuses a size: caused by a huge option, or a bug
        large = [name for name, value in dataclasses.asdict(options).items()
                 if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) >= 2 ** 31]
        if not large:
            raise
        raise ConfigError(f"{path}.{large[0]}", f"{getattr(options, large[0])!r} makes sizes beyond what torch can "
                                                "hold; choose a smaller value") from None
