"""The ways a call runs with the fused C kernels (blocks/native/kvm_cpu.c): without autograd, on CPU
in fp32, with a LayerNorm as state-key norm (``runner.runner_for`` says where they apply).

Both follow the PyTorch no-grad path (blocks/kvm/inference.py) and replace parts of it:

* ``NativeRunner``, where torch exports a BLAS sgemm for the kernels to call: a boundary update is
  one kernel, per kv head and in cache (prepare the leaving tokens, score them against a block of
  slots at a time keeping each token's best, append the most novel, merge the rest, re-read the
  slots they touch); a call's run of whole chunks is one C call for all their updates and reads (a
  graph of tasks, per kv head update then reads), each chunk's read one online softmax over its
  slots and its window that skips the window's masked keys.
* ``NativeHelpersRunner``, without that BLAS: the PyTorch path's updates with their preparation,
  routing and merge in C, and the split read's join in C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocks.kvm.codec import Incoming, SlotCodec
from blocks.kvm.inference import InferenceRunner
from blocks.kvm.routing import Routed
from blocks.kvm.schedule import CallSchedule, ChunkStep, Update
from blocks.kvm.tokens import RawTokens
from blocks.native import kvm_cpu


def norm_args(codec: SlotCodec) -> tuple[Tensor, Tensor | None, float]:
    """The state-key LayerNorm's weight, bias and eps, as the kernels take them."""
    norm = codec.norm
    return norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), norm.eps


def preparation_args(codec: SlotCodec) -> tuple:
    """How the kernels prepare leaving tokens: the norm's parameters, the zeroed dims, which of key
    and value the merge gate weighs, and whether routing runs over fewer dims."""
    config = codec.config
    return (*norm_args(codec), codec.zero_dims, config.merge_gate_keys, config.merge_gate_values,
            codec.fewer_routing_dims is not None)


class NativeRunner(InferenceRunner):
    """A call's chunk steps by the BLAS kernels: updates by ``kvm_cpu.absorb``, a run of whole
    chunks by ``kvm_cpu.run_chunks`` (or ``attend_chunk`` each, when the call updates nothing)."""

    def update(self, update: Update, raw: RawTokens) -> None:
        config = self.codec.config
        leaving = raw.between(update.leaving, update.leaving + config.chunk_len)
        kvm_cpu.absorb(*leaving, *preparation_args(self.codec), config.sink_len, update.appends,
                       config.merge_gate_appends, config.use_vlens, *self.room.buffers, update.slots)

    def read_whole_chunks(self, q: Tensor, out: Tensor, schedule: CallSchedule, run: tuple[ChunkStep, ...],
                          raw: RawTokens) -> None:
        config = self.codec.config
        # each query head's logit scales, fp32: (Hq,) for the state and (Hq,) for the window
        scales = tuple((self.scales.scale * (torch.ones(q.shape[1]) if t is None else t.detach().float())).contiguous()
                       for t in (self.scales.state_temp, self.scales.window_temp))
        if self.room is None:  # no update in this call: each chunk reads the slots as they came
            for step in run:
                keys, values = raw.keys_values(step.window, step.window + config.window_len)
                rows = schedule.rows(step.queries)
                kvm_cpu.attend_chunk(q[:, :, rows], *self.slot_reads(step)[:2], keys, values, *scales, out[:, :, rows])
            return
        first, last = run[0], run[-1]
        rows = schedule.rows(range(first.queries.start, last.queries.stop))
        tokens = raw.between((first.chunk - config.n_bswa_chunks) * config.chunk_len, last.queries.stop)
        appends = [-1 if step.update is None else step.update.appends for step in run]  # -1: no update there
        kvm_cpu.run_chunks(q[:, :, rows], out[:, :, rows], *tokens, appends, first.slots_before, *scales,
                           *preparation_args(self.codec), config.sink_len, config.merge_gate_appends, config.use_vlens,
                           *self.room.buffers)


class NativeHelpersRunner(InferenceRunner):
    """The PyTorch no-grad path with the kernels that need no BLAS: a leaving chunk prepared by
    ``kvm_cpu.incoming``, routed by ``best_slots`` and ``route``, merged and re-read by
    ``merge_and_read``; the split read joined by ``join``."""

    incoming_buffers: tuple[Tensor, Tensor, Tensor] | None = None  # ``incoming``'s outputs, reused

    def incoming(self, k: Tensor, v: Tensor, g: Tensor) -> Incoming:
        # into the same buffers every chunk: they are consumed by the update that follows
        self.incoming_buffers = kvm_cpu.incoming(k, v, g, *preparation_args(self.codec),
                                                 out=self.incoming_buffers)
        return Incoming(self.incoming_buffers[0], v, *self.incoming_buffers[1:])

    def route(self, incoming: Incoming, num: int) -> tuple[Tensor, Tensor, Tensor]:
        # the scores a block of slots at a time, each block reduced while in cache
        return kvm_cpu.best_slots(self.room.features[:, :, :num], incoming.routing, self.codec.config.sink_len,
                                  self.room.scores)

    def best_among_new(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return kvm_cpu.route(rows, 0)[1:]

    def merge(self, routed: Routed, update: Update) -> None:
        config = self.codec.config
        kvm_cpu.merge_and_read(*self.room.buffers, routed.target.contiguous(), routed.merging.contiguous(),
                               not config.use_vlens, update.slots + update.appends, update.slots,
                               *norm_args(self.codec), self.codec.zero_dims, config.use_vlens,
                               self.codec.fewer_routing_dims is not None)

    def join(self, o_w: Tensor, lse_w: Tensor, o_s: Tensor, lse_s: Tensor, out: Tensor) -> None:
        kvm_cpu.join(o_w, lse_w, o_s, lse_s, out)
