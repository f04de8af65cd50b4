"""Measuring a conversion: perplexity beyond the KVM window, and decode state bytes against a KV cache.

Inside the KVM window (``n_bswa_chunks * chunk_len`` tokens) a student initialised by
``convert.init`` computes exactly the teacher's attention, so perplexity over whole sequences
mostly measures what the conversion did not touch. What the conversion has to get right is the
compressed state, which only the queries *beyond* the window read: ``long_range_perplexity`` scores
only the predictions made at query positions ``>= window`` of each segment (the prediction of token
``p + 1`` is made at query position ``p``); ``long_range_predictions`` also gives each prediction's
top-1 token, for the agreement with the teacher.

``state_bytes`` reports the decode state per kind (``kvm``, ``window``, ``kv``, ``recurrent``) at
chosen context lengths from the state's shapes alone (``hybrid.model.state_shapes.state_at`` on the
meta device: nothing is allocated or run at that length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hybrid.model.model import HybridLM
from hybrid.model.recipe import ModelConfig
from hybrid.model.state_shapes import state_at


@torch.no_grad()
def perplexity(model: HybridLM, ids: torch.Tensor, start: int = 0) -> float:
    """exp(mean NLL) of the predictions made at query positions ``>= start`` of one sequence, i.e. of
    tokens ``ids[start+1:]`` given their whole prefix; ids: (T,)."""
    logits = model(ids[None].to(model.device)).logits[0, :-1].float()  # (T-1, V)
    return math.exp(F.cross_entropy(logits[start:], ids[1 + start:].to(logits.device)).item())


def window_len(config: ModelConfig) -> int:
    """The longest block-sliding window (``chunk_len * n_bswa_chunks``: KVM and BSWA layers) of a
    model in tokens; 0 when it has none."""
    return max((layer.options.chunk_len * layer.options.n_bswa_chunks for layer in config.layers
                if hasattr(layer.options, "n_bswa_chunks")), default=0)


@torch.no_grad()
def long_range_predictions(model: HybridLM, ids: torch.Tensor, window: int, segment_len: int,
                           batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions beyond the window: ``ids`` (1-D) cut into consecutive segments of
    ``segment_len`` tokens (a shorter tail is dropped), each read from an empty state, scored at query
    positions ``window .. segment_len - 2`` of every segment. -> (NLL of each prediction (N,) fp32,
    the model's top-1 token at each (N,)), in segment order."""
    if not 0 <= window < segment_len - 1:
        raise ValueError(f"segment_len {segment_len} leaves nothing beyond the window of {window} tokens to score")
    n = len(ids) // segment_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one segment of {segment_len}")
    was_training = model.training
    model.eval()
    segments = ids[:n * segment_len].view(n, segment_len)
    nll, top1 = [], []
    for rows in segments.split(batch_size):
        rows = rows.to(model.device)
        logits = model(rows).logits[:, window:-1].float().flatten(0, 1)  # (B * (L - 1 - window), V)
        nll.append(F.cross_entropy(logits, rows[:, window + 1:].flatten(), reduction="none").cpu())
        top1.append(logits.argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(nll), torch.cat(top1)


def long_range_perplexity(model: HybridLM, ids: torch.Tensor, window: int, segment_len: int,
                          batch_size: int = 4) -> float:
    """Perplexity on the tokens beyond the window (``long_range_predictions``)."""
    nll, _ = long_range_predictions(model, ids, window, segment_len, batch_size)
    return math.exp(nll.double().mean().item())


def state_bytes(model: HybridLM, contexts: Sequence[int], batch_size: int = 1) -> dict[int, dict[str, int]]:
    """``{context: {kind: bytes}}``: the decode state after ``context`` tokens, from shapes only."""
    return {n: state_at(model, n, batch_size, device="meta").bytes_by_kind() for n in contexts}
