"""A model's decoding state at any context length, without processing that many tokens.

Decode cost and memory depend only on the *shapes* of the state: how many KVM slots and window
tokens, how many cached keys. ``state_at(model, n)`` builds a state of exactly the shapes the model
would hold after ``n`` tokens, so ``hybrid info`` can report bytes at 32k and the decode benchmark
can time a step at position 32k without a 32k-token prefill (which, for full attention on a CPU,
would take longer than the measurement). The shapes follow the same integer schedules the layers
use (``blocks.kvm.slots_after``, the attention layers' ``held``: window and sink tokens); a test checks them against
real prefills.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blocks.attention import SoftmaxAttention
from blocks.kvm import KVMAttention, slots_after, window_begin
from blocks.state import LayerState
from hybrid.model.state import ModelState


def token_axis_lengths(mixer, n_tokens: int) -> dict[str, int]:
    """Length of the token/slot axis (dim 2) of each growing state tensor after ``n_tokens`` tokens;
    empty for fixed-size (recurrent) states."""
    if isinstance(mixer, KVMAttention):
        slots = slots_after(n_tokens, mixer.config)
        window = n_tokens - window_begin(n_tokens, mixer.config)
        return {"slot_keys": slots, "slot_values": slots, "slot_lens": slots,
                "window_keys": window, "window_values": window, "window_gates": window}
    if isinstance(mixer, SoftmaxAttention):
        sinks, begin = mixer.held(n_tokens)
        lengths = {"keys": n_tokens - begin, "values": n_tokens - begin}
        if mixer.sink_len:
            lengths.update(sink_keys=sinks, sink_values=sinks)
        return lengths
    return {}


def _resized(template: LayerState, lengths: dict[str, int], n_tokens: int, make) -> LayerState:
    changes: dict = {}
    for field in dataclasses.fields(template):
        value = getattr(template, field.name)
        if field.name in lengths:
            shape = list(value.shape)
            shape[2] = lengths[field.name]
            changes[field.name] = make(shape, value)
        elif field.name == "seq_len":
            changes[field.name] = n_tokens
    return dataclasses.replace(template, **changes)


@torch.no_grad()
def state_at(model, n_tokens: int, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
    """A ``ModelState`` shaped as after ``n_tokens`` tokens: random contents (normal; KVM slot
    lengths positive) so a decode step from it does the real work. ``device="meta"`` gives shapes
    and bytes without allocating."""
    template = model(torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)).state
    device = torch.device(device) if device is not None else model.device

    def make(shape: list[int], like: Tensor) -> Tensor:
        out = torch.empty(shape, dtype=like.dtype, device=device)
        if device.type != "meta" and out.is_floating_point():
            out.normal_()
            if shape[-1] == 1:  # KVM slot lengths and merge gates are positive
                out.abs_()
        return out

    layers = []
    for block, layer_state in zip(model.blocks, template.layers):
        lengths = token_axis_lengths(block.mixer, n_tokens)
        layer_state = _resized(layer_state, lengths, n_tokens, make)
        layers.append(layer_state.to(device) if device.type != "meta" else _on_meta(layer_state))
    tails = [None if t is None else make(list(t.shape), t) for t in template.mlp_tails]
    return ModelState(layers, tails, n_tokens)


def _on_meta(state: LayerState) -> LayerState:
    return dataclasses.replace(state, **{f.name: torch.empty_like(getattr(state, f.name), device="meta")
                                         for f in dataclasses.fields(state)
                                         if isinstance(getattr(state, f.name), Tensor)})

