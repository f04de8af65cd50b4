"""Key-Value Means (KVM) attention: block sliding window + a compressed, budgeted memory of the past.

Goldstein & Cheah, "Key-Value Means: Transformers with Expandable Block-Recurrent Compressed
Memory", arXiv 2605.09877. ``docs/kvm.md`` describes the algorithm as this package implements it:
as the published (v1) code behaves, generalised, with the differences listed at the end.

The sequence is cut into chunks of ``chunk_len`` (C) tokens. A query in chunk c attends, in one
softmax, to (a) the raw keys of a block sliding window of the last ``n_bswa_chunks`` (Nb) chunks up
to itself and (b) every slot of the compressed state, which covers exactly the tokens before the
window. Queries before position W = Nb*C see plain causal attention. The state starts as the first
chunk copied raw (slot 0 = token 0 is the "sink", never merged into). Each time a chunk leaves the
window, its C tokens either *append* (the most novel ones, while the budget allows: ``fixed``,
``power_law`` f*ctx^e, or ``saturation`` N*ctx/(N+ctx)) or *merge* winner-take-all into their most
similar slot. Slots store *sums* of gated keys and values; reads re-normalise them just in time:
keys through ``state_key_norm`` (a LayerNorm, so a sum reads as a mean direction), values as their
direction times the norm of the value that created the slot ("vlens"), or divided by a count.

One chunk schedule serves training, prefill, continuing a state by any number of tokens and
one-token decode: the state update for a chunk boundary runs when the first token past it is
processed, so "prefill P tokens, then continue" and "process everything at once" perform the same
updates. The package, in the order a call meets it:

* ``config``: the options; ``schedule``: the chunk schedule in integers (``plan_call``);
* ``attention``: ``kvm_attention``, which plans a call, reads the queries before W and hands the
  chunks from W on to a runner; ``runner``: ``runner_for``, which picks it;
* the runners, each one way of running the same schedule (docs/kvm.md §11): ``autograd`` (the
  reference: slots as new tensors at every update, every chunk one exact softmax), ``inference``
  (no autograd, in PyTorch: slots updated in place in a ``room``, whole chunks by the
  ``split_read``, a read view kept across decode steps) and ``native`` (the fused C kernels of
  blocks/native/kvm_cpu.c, compiled on first use; ``KVM_NATIVE=0`` turns them off);
* what they share: ``codec`` (how tokens become slots and slots are read), ``routing`` (where a
  leaving chunk goes), ``reads`` (the exact reads), ``tokens`` (the raw window) and ``state``;
* ``layer``: the ``KVMAttention`` mixer, registered as "kvm".

Decode, without autograd, appends to the raw window in place (blocks/token_buffer.py).

Differences from the published v1 code (kvm.md §6), each deliberate:

* Grouped-query attention (fewer key/value heads than query heads); one merge gate per KV head,
  temperatures per query head (as the published v2).
* Count averaging (``use_vlens=False``) keeps a per-slot count of absorbed tokens and divides each
  slot by its own count (v1 adds one to every slot per merge round, or crashes: B2).
* No hidden casts: state values are read in the model dtype (v1 rounds them through bf16 even in
  fp32 runs: B6). ``bf16_state_values=True`` restores that rounding to match the released code.
* Routing and novelty scores are computed in fp32 (v1 uses the model dtype, B7), on the ungated
  prepared keys (the positive gate does not change the argmax).
* ``merge_gate_initial_state=True`` gates the first chunk the same way in prefill and decode
  (v1 gates it only in prefill, breaking their equivalence: B3).
* Continuation by many tokens at once works (v1 asserts on multi-token decode, B11).

Kept on purpose because the released checkpoints depend on it: the state-key LayerNorm runs *after*
zeroing the rotated dims, so its mean-centring and bias re-populate them (B5).
"""

from blocks.kvm.attention import kvm_attention
from blocks.kvm.config import BUDGETS, KVMConfig
from blocks.kvm.layer import KVMAttention
from blocks.kvm.reads import repeat_heads
from blocks.kvm.schedule import boundary_update, coverage, runs_update, slots_after, target_slots, window_begin
from blocks.kvm.split_read import WINDOW_CALL_BYTES
from blocks.kvm.state import KVMState

__all__ = ["BUDGETS", "WINDOW_CALL_BYTES", "KVMAttention", "KVMConfig", "KVMState", "boundary_update", "coverage",
           "kvm_attention", "repeat_heads", "runs_update", "slots_after", "target_slots", "window_begin"]
