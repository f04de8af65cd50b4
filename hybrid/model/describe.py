"""What a recipe builds, for people to read (``hybrid info``): its layers, parameters and decode state
against context; and the byte and count formats the toolkit prints.

State bytes come from ``state_at`` on the meta device: exact shapes after T tokens, nothing
allocated, so a 32k (or 1M) context costs nothing to report.
"""

from __future__ import annotations

import torch

from blocks.registry import get_mixer
from blocks.state import STATE_KINDS
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe
from hybrid.model.state_shapes import state_at


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def describe(recipe: Recipe, model: HybridLM, contexts: list[int], batch_size: int = 1) -> str:
    """The report as text (the model may be on any device; its dtype sets the state's)."""
    cfg = recipe.model
    lines = [f"recipe: {recipe.source}", f"fingerprint: {cfg.fingerprint()}",
             (f"d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
             f"block: {cfg.block.norm} + {cfg.block.mlp} MLP (hidden {cfg.block.hidden_size(cfg.d_model)})"
             f"{', MLP token shift' if cfg.block.mlp_token_shift else ''}"
             f"{', tied head' if cfg.tie_embeddings else ', untied head'}"), ""]
    lines.append(f"{'layer':>5}  {'mixer':<16} {'kind':<10} {'params':>9}")
    for i, (layer, block) in enumerate(zip(cfg.layers, model.blocks)):
        spec = get_mixer(layer.mixer)
        params = sum(p.numel() for p in block.parameters())
        name = layer.mixer if layer.name == layer.mixer else f"{layer.name} ({layer.mixer})"
        lines.append(f"{i:>5}  {name:<16} {spec.state_kind:<10} {human_count(params):>9}")
    total = model.num_parameters()
    lines += ["", (f"parameters: {human_count(total)} total, "
                  f"{human_count(model.num_parameters(include_head=False))} without the head, "
                  f"{human_count(model.num_parameters(include_embeddings=False, include_head=False))} non-embedding")]
    lines += ["", f"decode state (batch {batch_size}, {next(model.parameters()).dtype}):",
              f"{'context':>9}  " + "".join(f"{k:>12}" for k in STATE_KINDS) + f"{'total':>12}"]
    for n in contexts:
        nbytes = state_at(model, n, batch_size, device="meta").bytes_by_kind()
        lines.append(f"{n:>9}  " + "".join(f"{human_bytes(nbytes[k]) if k in nbytes else '-':>12}" for k in STATE_KINDS)
                     + f"{human_bytes(sum(nbytes.values())):>12}")
    return "\n".join(lines)


def build_for_info(recipe: Recipe) -> HybridLM:
    """The model with real (CPU) weights: ``state_at`` runs one token to learn the state layout."""
    with torch.no_grad():
        return HybridLM(recipe.model).eval()
