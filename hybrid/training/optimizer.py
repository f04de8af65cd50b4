"""Optimisation: AdamW over two parameter groups, and the learning-rate schedule.

Weight decay applies to the matrices that map one space to another, the weights of ``nn.Linear``
and ``nn.Embedding`` modules (the embedding too: with tied embeddings it is also the output layer,
and GPT-2/nanoGPT decay it). Everything else is not decayed: norm gains and biases, all biases,
short-convolution filters, token-shift mixes, temperatures, decay/step parameters (``A_log``,
``dt_bias``, ``D``) and other per-channel vectors, including 2-D ones like RWKV-7's ``r_k`` (which is
why the rule is by module type, not by ``ndim``). The learning rate warms up linearly over
``warmup_steps`` and then decays (cosine or linear) to ``lr * min_lr_ratio`` at the last step, or stays
constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybrid.training.config import TrainConfig


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
