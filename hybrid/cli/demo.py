"""``hybrid demo``: stream a long random sequence through KVM layers and watch the state stay small.

Builds paper-shaped KVM layers (d_model 768, 6 heads of 128, chunk 256, window 2 chunks) with the
fixed-256 and the 16*sqrt(T) budgets, feeds them the same random sequence piece by piece (each
call continues the previous state), and prints, at each context length, the state each layer
carries against the KV cache a full-attention layer of the same shape would need.
"""

from __future__ import annotations

import argparse
import time

import torch

from blocks.kvm import KVMAttention, KVMConfig, slots_after
from hybrid.cli.options import add_seed, token_count

D_MODEL, HEADS = 768, 6
BUDGETS = {
    "fixed-256": {"budget": "fixed", "state_min_len": 256},
    "16*sqrt(T)": {"budget": "power_law", "growth_factor": 16.0, "state_min_len": 256},
}


def add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="stream a long sequence through KVM layers: state size vs context",
                               description="Stream a long random sequence through KVM layers (fixed and "
                                           "16*sqrt(T) budgets) and print their state against a full KV cache.")
    demo.add_argument("--length", type=token_count, default=16384, help="tokens to stream (default 16384)")
    demo.add_argument("--piece", type=token_count, default=2048, help="tokens per call; each call continues the state")
    add_seed(demo)
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    run_demo(length=args.length, piece=args.piece, seed=args.seed)
    return 0


def run_demo(length: int = 16384, piece: int = 2048, seed: int = 0) -> None:
    torch.manual_seed(seed)
    layers = {name: KVMAttention(KVMConfig(num_heads=HEADS, rope_partial_dim=64, qk_norm="layernorm",
                                           rope_style="kvm_paper", **budget), d_model=D_MODEL).eval()
              for name, budget in BUDGETS.items()}
    states = dict.fromkeys(layers)
    x = torch.randn(1, length, D_MODEL)
    head_dim = D_MODEL // HEADS
    print(f"KVM layer, d_model {D_MODEL}, {HEADS} heads x {head_dim}, chunk 256, window 512, fp32, batch 1; "
          f"sequence fed {piece} tokens per call")
    print(f"{'context':>8} | {'full-attn KV cache':>18} | " + " | ".join(f"{n + ' state':>24}" for n in layers)
          + " | " + " | ".join(f"{n + ' s/1k tok':>19}" for n in layers))
    with torch.inference_mode():
        for end in range(piece, length + 1, piece):
            row, speed = [], []
            for name, layer in layers.items():
                start = time.perf_counter()
                _, states[name] = layer(x[:, end - piece:end], states[name])
                speed.append((time.perf_counter() - start) / piece * 1000)
                state = states[name]
                assert state.num_slots == slots_after(end, layer.config)
                row.append(f"{state.num_slots:>5} slots {state.nbytes() / 2**20:6.2f} MiB")
            kv = 2 * end * HEADS * head_dim * 4
            shares = [f"{r} {100 * states[n].nbytes() / kv:4.1f}%" for r, n in zip(row, layers)]
            print(f"{end:>8} | {kv / 2**20:>14.1f} MiB | " + " | ".join(f"{s:>24}" for s in shares)
                  + " | " + " | ".join(f"{s:>19.4f}" for s in speed))
    print("The KVM state stops growing (fixed) or grows like sqrt(T); the KV cache grows with every token.")
