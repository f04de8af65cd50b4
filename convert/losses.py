"""The distillation losses: what each stage of ``convert.distill`` minimises, as train-loop ``Objective``s.

* **stage 1, alignment** (``alignment_objective``): each converted layer's new mixer reads the
  teacher's normed hidden state at that layer and learns to output what the teacher's attention
  outputs there. One teacher pass gives every layer's input and target, so all layers train at once
  and independently of each other. Loss: the mean over converted layers of the MSE divided by the
  mean square of the teacher's output (a relative error, so deep layers with large activations do
  not dominate). Only the converted layers' mixer parameters train.
* **stage 2, logit distillation** (``kl_objective``): KL(teacher || student) of the next-token
  distributions at a temperature T (times T², so gradients keep their scale), averaged over tokens;
  the whole student trains.

``alignment_losses`` and ``mean_kl`` measure the same losses without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid.model.model import HybridLM
from hybrid.training.loop import Objective, autocast_context


def teacher_mixer_io(teacher: HybridLM, inputs: Tensor, layers: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """``{layer: (mixer input, mixer output)}`` of the teacher on ``inputs`` (B, T): the normed
    residual stream each listed layer's attention reads and what it adds back. The teacher runs only
    up to the last listed layer (no head)."""
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(index: int):
        def record(module, args, output):
            captured[index] = (args[0], output[0])
        return record

    handles = [teacher.blocks[i].mixer.register_forward_hook(hook(i)) for i in layers]
    try:
        x = teacher.embed(inputs)
        if teacher.embed_norm is not None:
            x = teacher.embed_norm(x)
        ctx: dict = {}
        for block in teacher.blocks[:max(layers) + 1]:
            x, _, _ = block(x, None, None, ctx)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def relative_mse(output: Tensor, target: Tensor) -> Tensor:
    """MSE of ``output`` against ``target`` divided by the mean square of ``target`` (fp32)."""
    target = target.float()
    return (output.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _alignment_terms(teacher: HybridLM, student: HybridLM, inputs: Tensor, layers: Sequence[int],
                     autocast: torch.dtype | None) -> dict[int, Tensor]:
    with torch.no_grad(), autocast_context(inputs.device.type, autocast):
        io = teacher_mixer_io(teacher, inputs, layers)
    with autocast_context(inputs.device.type, autocast):
        outputs = {i: student.blocks[i].mixer(x, None, {})[0] for i, (x, _) in io.items()}
    return {i: relative_mse(outputs[i], io[i][1]) for i in layers}


@torch.no_grad()
def alignment_losses(teacher: HybridLM, student: HybridLM, inputs: Tensor, layers: Sequence[int]) -> dict[int, float]:
    """Stage 1's loss per converted layer (relative MSE of the student mixer against the teacher's
    attention, both reading the teacher's hidden states) on ``inputs`` (B, T)."""
    return {i: v.item() for i, v in _alignment_terms(teacher, student, inputs, layers, None).items()}


def alignment_objective(teacher: HybridLM, layers: Sequence[int]) -> Objective:
    """Stage 1: the mean of ``alignment_losses`` over ``layers``, training only their mixers."""
    layers = tuple(layers)
    prefixes = tuple(f"blocks.{i}.mixer." for i in layers)

    def loss(model: HybridLM, inputs: Tensor, targets: Tensor, grad_accum: int, autocast) -> float:
        total = 0.0
        for x in inputs.chunk(grad_accum):
            terms = _alignment_terms(teacher, model, x, layers, autocast)
            value = torch.stack(list(terms.values())).mean() / grad_accum
            value.backward()
            total += value.item()
        return total

    return Objective(loss, trainable=lambda name: name.startswith(prefixes))


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over tokens of KL(teacher || student) of the softened distributions, times T²."""
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def kl_objective(teacher: HybridLM, temperature: float = 1.0) -> Objective:
    """Stage 2: ``kl_divergence`` of the whole student against the teacher."""
    def loss(model: HybridLM, inputs: Tensor, targets: Tensor, grad_accum: int, autocast) -> float:
        total = 0.0
        for x in inputs.chunk(grad_accum):
            with torch.no_grad(), autocast_context(x.device.type, autocast):
                teacher_logits = teacher(x).logits
            with autocast_context(x.device.type, autocast):
                student_logits = model(x).logits
            value = kl_divergence(student_logits, teacher_logits, temperature) / grad_accum
            value.backward()
            total += value.item()
        return total

    return Objective(loss)


@torch.no_grad()
def mean_kl(teacher: HybridLM, student: HybridLM, inputs: Tensor, temperature: float = 1.0) -> float:
    """Stage 2's loss on ``inputs`` (B, T), without gradients."""
    return kl_divergence(student(inputs).logits, teacher(inputs).logits, temperature).item()
