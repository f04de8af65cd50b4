"""KVM attention vs causal SDPA on this machine: prefill time, decode time per token, state bytes.

Operator level (after the q/k/v projections, as the paper's kernel benchmarks): batch 1, 6 heads,
head_dim 128, chunk 256, window 2 chunks, fp32. Every figure is measured in this run; ratios are
against full causal ``F.scaled_dot_product_attention`` measured alongside: the prefills of SDPA and
of each KVM variant (and its flash calls) at every length run in turn, round after round, so the
ratios between lengths (how a prefill grows with T) are measured in the same phases of the
machine too. Decode is timed the same way: passes of one chunk of one-token steps from the state
at position T, every length and variant in turn.

Each figure comes as the fastest sample (as timeit reports: other load only ever adds time) and
the median (the typical cost); ratios against SDPA use the fastest. This shared machine runs at
two speeds that switch every few seconds: passes of the same decode work at 2k and 32k, taken in
turn 40 times each, ranged 0.50-1.54 ms per token, the fast ones 0.55-0.62 and the slow ones near
0.8; and over eight runs of this bench, the fastest of 15 passes set 32k against 2k anywhere from
0.92x to 1.43x. A short run catches a quiet moment more often than a long one (a 0.2 s prefill at
8k more than a 0.8 s one at 32k), which biased the fastest samples' growth with T; so a KVM
prefill sample runs as many tokens at every length (the longest length's: at T = 32k a 2k
prefill is 16 calls in a row) and lasts about as long. KVM, whose samples are short, gets two
prefill samples and three decode passes a round; SDPA's runs (14 s at 32k) span many switches.

"flash calls" is the time of the attention calls KVM's PyTorch read makes (the windows of a few
chunks per call, then each chunk's read of its slots at that chunk's slot count), run alone with the
kernel SDPA uses: what KVM would cost on that kernel if routing, merging and every other state
update were free, so "cap" = SDPA / that is the best ratio a KVM built on PyTorch's flash kernel
could reach here. The fused C read (blocks/native) skips the window's masked keys, which that
kernel computes, so with the C kernels on, a prefill can beat the cap.

The allocator matters at these sizes. With glibc's defaults a freed block of 32 MiB or more goes
back to the kernel, so a prefill whose output is that large (fp32 here: T >= 11k) writes new pages
on every call, and one below it reuses memory; the header line says which regime a run measured.
``GLIBC_TUNABLES`` as below keeps every block in the heap, so that all lengths reuse their memory.

    python benchmarks/bench_kvm.py                      # T = 2k, 8k, 16k, 32k
    python benchmarks/bench_kvm.py --lengths 2048 8192 --repeats 3
    KVM_NATIVE=0 python benchmarks/bench_kvm.py        # KVM in PyTorch only, without the C kernels
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 python benchmarks/bench_kvm.py
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch
import torch.nn.functional as F

from blocks.kvm import WINDOW_CALL_BYTES, KVMConfig, kvm_attention, slots_after
from blocks.native import kvm_cpu
from hybrid.evaluation.bench import Timing

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

HEADS, HEAD_DIM, CHUNK = 6, 128, 256
KVM_PREFILLS_PER_ROUND, KVM_DECODES_PER_ROUND = 2, 3  # KVM's runs are short: samples of each per round
VARIANTS = {
    "kvm fixed-256": KVMConfig(num_heads=HEADS, chunk_len=CHUNK, rope_partial_dim=64, state_min_len=256),
    "kvm 16*sqrt(T)": KVMConfig(num_heads=HEADS, chunk_len=CHUNK, rope_partial_dim=64, budget="power_law",
                               growth_factor=16, state_min_len=256),
}


def timed_in_turn(fns: dict, rounds: int, runs_per_round: dict | None = None,
                  calls: dict | None = None) -> dict[str, Timing]:
    """For each named function, its wall-clock seconds per call over its samples, after one
    warm-up call: the fastest, the median and the spread. The functions run in turn, round after
    round, so that both speeds of this shared machine (see the module docstring) hit all of them in
    the same mix instead of whichever ran then. ``runs_per_round``: samples of a named function in
    each round (1 if not named); ``calls``: consecutive calls one sample times (1 if not named), so
    that the samples of short and long functions last about as long."""
    runs_per_round, calls = runs_per_round or {}, calls or {}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls.get(name, 1)
            for _ in range(runs_per_round.get(name, 1)):
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - start) / n)
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


def decode_pass(step, state, tokens: int):
    """A function running ``tokens`` consecutive one-token steps from ``state`` (a whole chunk, so
    it includes one state update); every call starts again from that same state."""
    def run():
        s = state
        for _ in range(tokens):
            s = step(s)
    return run


def flash_calls(q, k, v, cfg: KVMConfig) -> None:
    """The flash-attention calls of KVM's PyTorch read over q, k, v (1, H, T, d), nothing else: plain
    causal attention over the first window, the masked windows of the later chunks a few chunks per
    call (as KVM groups them), and per chunk a read of as many slots as the state holds then (random
    slots: only their number matters)."""
    c, w = cfg.chunk_len, cfg.window_len
    t, d = q.shape[2], q.shape[3]
    F.scaled_dot_product_attention(q[:, :, :w], k[:, :, :w], v[:, :, :w], is_causal=True)
    visible = torch.arange(w)[None, :] <= w - c + torch.arange(c)[:, None]
    mask = torch.zeros(c, w).masked_fill_(~visible, -torch.inf)
    group = max(1, WINDOW_CALL_BYTES // (q[0, :, :c].numel() * q.element_size()))  # chunks per call, as KVM's
    for lo in range(cfg.n_bswa_chunks, t // c, group):  # chunks [lo, hi) past the first window
        hi = min(lo + group, t // c)
        tiles = lambda x: x[0, :, (lo - 1) * c:hi * c].unfold(1, w, c).transpose(-1, -2)  # noqa: E731, B023  (H, n, W, d)
        FLASH(q[0, :, lo * c:hi * c].unflatten(1, (hi - lo, c)), tiles(k), tiles(v), attn_mask=mask)
    slots = torch.randn(2, *q.shape[:2], slots_after(t, cfg), d)
    for i in range(cfg.n_bswa_chunks, t // c):
        s = slots_after(i * c + 1, cfg)
        FLASH(q[:, :, i * c:(i + 1) * c], slots[0, :, :, :s], slots[1, :, :, :s])


def _kvm_step(q1, k1, v1, g1, cfg: KVMConfig, norm, temps, state):
    """One decode step of KVM: the token (q1, k1, v1, g1) after ``state``; returns the new state."""
    return kvm_attention(q1, k1, v1, g1, cfg, state, state_key_norm=norm, window_temp=temps, state_temp=temps)[1]


def _native_status() -> str:
    if kvm_cpu.library() is None:
        return "off (KVM_NATIVE=0 or no C compiler): PyTorch throughout"
    return "state update and chunk read" if kvm_cpu.blas_kernels() else "state update (no BLAS for the chunk read)"


def _malloc_regime() -> str:
    """What this run's allocator does with large blocks: glibc's defaults unless tuned by environment."""
    tuned = {name: os.environ[name] for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                                                 "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD") if os.environ.get(name)}
    if not tuned:
        return "glibc defaults (outputs of 32 MiB or more are new pages on every call)"
    return " ".join(f"{name}={value}" for name, value in tuned.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of samples (timeit's default is 5 too)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(HEAD_DIM)
    temps = torch.ones(HEADS)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H={HEADS} d={HEAD_DIM} "
          f"C={CHUNK} W={2 * CHUNK}, fp32, best and median of {args.repeats} rounds (KVM: {KVM_PREFILLS_PER_ROUND} prefill "
          f"samples of {max(args.lengths)} tokens and {KVM_DECODES_PER_ROUND} decode passes a round), "
          f"KVM C kernels: {_native_status()}")
    print(f"# malloc: {_malloc_regime()}")
    print(f"{'T':>6} {'variant':>15} {'prefill s':>9} {'median':>7} {'spread':>7} {'vs SDPA':>8} {'flash calls':>11} "
          f"{'cap':>5} {'decode ms':>9} {'median':>7} {'slots':>6} {'state MiB':>9} {'% of KV':>7}")
    with torch.inference_mode():
        inputs, prefills = {}, {}
        for t in args.lengths:
            q, k, v = (torch.randn(1, HEADS, t, HEAD_DIM) for _ in range(3))
            inputs[t] = q, k, v, 1 + F.elu(torch.randn(1, HEADS, t, 1))
            prefills[t, "sdpa"] = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
            for name, cfg in VARIANTS.items():
                prefills[t, name] = functools.partial(kvm_attention, *inputs[t], cfg, state_key_norm=norm,
                                                      window_temp=temps, state_temp=temps)
                prefills[t, f"{name} flash"] = functools.partial(flash_calls, q, k, v, cfg)
        kvm_prefills = [key for key in prefills if key[1] != "sdpa"]
        tokens = max(args.lengths)  # every KVM sample runs this many tokens: a 2k prefill 16 times in a row at 32k
        prefill = timed_in_turn(prefills, args.repeats, dict.fromkeys(kvm_prefills, KVM_PREFILLS_PER_ROUND),
                                {key: max(1, tokens // key[0]) for key in kvm_prefills})
        decodes, states = {}, {}  # one chunk of one-token steps at position T, in turn
        for t, (q, k, v, gate) in inputs.items():
            q1, k1, v1, g1 = q[:, :, :1], k[:, :, :1], v[:, :, :1], gate[:, :, :1]
            cache = [torch.cat([x, torch.zeros(1, HEADS, CHUNK, HEAD_DIM)], 2) for x in (k, v)]  # preallocated

            def sdpa_step(n, cache=cache, q1=q1, k1=k1, v1=v1):
                cache[0][:, :, n], cache[1][:, :, n] = k1[:, :, 0], v1[:, :, 0]
                F.scaled_dot_product_attention(q1, cache[0][:, :, :n + 1], cache[1][:, :, :n + 1])
                return n + 1

            decodes[t, "sdpa"] = decode_pass(sdpa_step, t, CHUNK)
            for name, cfg in VARIANTS.items():
                states[t, name] = prefills[t, name]()[1]
                step = functools.partial(_kvm_step, q1, k1, v1, g1, cfg, norm, temps)
                decodes[t, name] = decode_pass(step, states[t, name], CHUNK)
        kvm_decodes = dict.fromkeys((key for key in decodes if key[1] != "sdpa"), KVM_DECODES_PER_ROUND)
        decode = {key: Timing(tuple(seconds / CHUNK for seconds in timing.times))
                  for key, timing in timed_in_turn(decodes, args.repeats, kvm_decodes).items()}
        for t in inputs:
            sdpa, kv_bytes = prefill[t, "sdpa"], 2 * t * HEADS * HEAD_DIM * 4
            print(f"{t:>6} {'causal SDPA':>15} {sdpa.min:>9.3f} {sdpa.median:>7.3f} {sdpa.spread:>7.3f} {1.0:>8.2f} "
                  f"{sdpa.min:>11.3f} {1.0:>5.1f} {decode[t, 'sdpa'].min * 1e3:>9.3f} "
                  f"{decode[t, 'sdpa'].median * 1e3:>7.3f} {t:>6} {kv_bytes / 2**20:>9.1f} {100.0:>7.1f}")
            for name in VARIANTS:
                run, flash, state, step = prefill[t, name], prefill[t, f"{name} flash"], states[t, name], decode[t, name]
                print(f"{t:>6} {name:>15} {run.min:>9.3f} {run.median:>7.3f} {run.spread:>7.3f} "
                      f"{sdpa.min / run.min:>8.2f} {flash.min:>11.3f} {sdpa.min / flash.min:>5.1f} "
                      f"{step.min * 1e3:>9.3f} {step.median * 1e3:>7.3f} {state.num_slots:>6} "
                      f"{state.nbytes() / 2**20:>9.2f} {100 * state.nbytes() / kv_bytes:>7.2f}")
        for lo in args.lengths:  # how each prefill grows when T grows 4x (linear: 4)
            if 4 * lo in inputs:
                print(f"# prefill time at T={4 * lo} / at T={lo}, best; median: "
                      + _ratios(prefill, (4 * lo, lo), ("sdpa", *VARIANTS)))
        lo, hi = min(args.lengths), max(args.lengths)
        if hi > lo:  # flat in T: 1
            print(f"# decode time per token at T={hi} / at T={lo}, best; median: "
                  + _ratios(decode, (hi, lo), ("sdpa", *VARIANTS)))


def _ratios(timings: dict, lengths: tuple[int, int], names: tuple[str, ...]) -> str:
    """``name fastest; median`` of timings at lengths[0] over those at lengths[1], for each name."""
    hi, lo = lengths
    return ", ".join(f"{name} {timings[hi, name].min / timings[lo, name].min:.2f}; "
                     f"{timings[hi, name].median / timings[lo, name].median:.2f}" for name in names)

if __name__ == "__main__":
    main()
