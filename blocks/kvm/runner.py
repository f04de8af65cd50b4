"""Which way a call runs (``runner_for``): with autograd, without it in PyTorch, or with the C kernels.

Every runner follows the same ``CallSchedule`` and gives the same numbers up to float rounding; the
autograd runner is the reference the others are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from blocks.kvm.autograd import AutogradRunner
from blocks.kvm.codec import SlotCodec
from blocks.kvm.inference import InferenceRunner
from blocks.kvm.native import NativeHelpersRunner, NativeRunner
from blocks.kvm.reads import ReadScales
from blocks.kvm.state import ReadView
from blocks.native import kvm_cpu


def runner_for(codec: SlotCodec, scales: ReadScales, tensors: tuple[Tensor, ...],
               kept_view: ReadView | None) -> AutogradRunner | InferenceRunner:
    """The runner of a call on ``tensors`` (its q, k, v and gate) in the current grad mode.
    ``kept_view``: the read view the state came with (the runners without autograd reuse it)."""
    if torch.is_grad_enabled():
        return AutogradRunner(codec, scales)
    if native_kernels_apply(codec, scales, tensors):
        if kvm_cpu.blas_kernels():
            return NativeRunner(codec, scales, kept_view)
        return NativeHelpersRunner(codec, scales, kept_view)
    return InferenceRunner(codec, scales, kept_view, split_reads=tensors[0].device.type == "cpu")


def native_kernels_apply(codec: SlotCodec, scales: ReadScales, tensors: tuple[Tensor, ...]) -> bool:
    """Whether the C kernels can run a no-grad call: the normed read and no state offset (they add
    nothing to the slots' logits), fp32 CPU tensors, a LayerNorm with fp32 parameters as state-key
    norm, no bf16 rounding of state values, and the kernels built here."""
    norm = codec.norm
    return (not codec.config.bf16_state_values and not codec.config.reads_mean
            and scales.state_offset is None
            and type(norm) is nn.LayerNorm and norm.weight is not None and norm.weight.dtype == torch.float32
            and (norm.bias is None or norm.bias.dtype == torch.float32)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and kvm_cpu.library() is not None)
