"""``hybrid generate``: continue a prompt, streaming the text, with the prefill time, decode speed and
state memory on stderr; ``--save-state`` keeps the state after the prompt and the new text and
``--state`` continues one (prompt caching)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TextIO

import torch

from hybrid.cli.options import (
    UsageError,
    add_device,
    add_dtype,
    add_seed,
    count,
    integer,
    number,
    output_file,
    token_count,
    utf8_text,
)
from hybrid.formats.checkpoint import weights_identity
from hybrid.formats.model_source import open_model
from hybrid.formats.text_files import read_utf8
from hybrid.formats.tokenizer import Tokenizer
from hybrid.generation.generate import SamplingConfig, generate
from hybrid.model.describe import human_bytes
from hybrid.model.limits import MAX_CONTEXT
from hybrid.model.model import HybridLM
from hybrid.model.state import ModelState


def add_generate(commands) -> None:
    gen = commands.add_parser("generate", help="continue a prompt, streaming the text",
                              description="Continue a prompt with a checkpoint (or a recipe, with random weights), "
                                          "streaming the text; prints prefill time, decode tokens/s and the state "
                                          "memory by kind. --save-state keeps the state after the prompt and the "
                                          "new text; --state continues one (prompt caching) with the weights that "
                                          "made it. Stops with an error if the logits become NaN or infinite.")
    gen.add_argument("model", help="checkpoint folder, training run folder (its newest checkpoint), "
                                    "or a recipe file/name (random weights)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", type=utf8_text, help="text to continue")
    prompt.add_argument("--prompt-file", help="file whose text to continue (UTF-8)")
    gen.add_argument("--max-new-tokens", type=integer(0, MAX_CONTEXT, f"a token count in [0, {MAX_CONTEXT}]"),
                     default=128, help="tokens to generate (0: only read the prompt)")
    gen.add_argument("--temperature", type=number(0, math.inf, "a finite temperature >= 0"), default=0.8,
                     help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=count, default=None,
                     help="sample from the k most likely tokens (0: all of them, as without --top-k)")
    gen.add_argument("--top-p", type=number(0, 1, "a probability mass in (0, 1]", low_open=True), default=0.95,
                     help="nucleus sampling mass (default 0.95; 1 = off)")
    gen.add_argument("--stop", type=utf8_text, action="append", default=[], metavar="TEXT",
                     help="stop after this token (one token; repeatable). The tokenizer's end-of-text always stops")
    gen.add_argument("--no-eos-stop", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    add_seed(gen, "sampling seed (and init seed for a recipe)")
    gen.add_argument("--state", help="a saved state (from --save-state) that the prompt continues")
    gen.add_argument("--allow-other-weights", action="store_true",
                     help="continue a --state made with other weights of the same architecture (e.g. with the model "
                          "before fine-tuning); without it such a state is refused")
    gen.add_argument("--save-state", type=output_file, metavar="FILE",
                     help="save the state after prompt and output (safetensors)")
    gen.add_argument("--prefill-chunk", type=token_count, default=1024,
                     help="prompt tokens per forward during prefill (bounds memory; default 1024)")
    gen.add_argument("--allow-nonfinite-weights", action="store_true",
                     help="load a checkpoint whose weights hold NaN or infinite values (refused by default)")
    add_device(gen)
    add_dtype(gen)
    gen.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    if args.prompt is None and args.prompt_file is None:
        raise UsageError("give the text to continue with --prompt TEXT or --prompt-file FILE")
    prompt = args.prompt if args.prompt is not None else read_utf8(Path(args.prompt_file))
    _, model, tokenizer = open_model(args.model, args.device, args.dtype, args.seed, sys.stderr,
                                     allow_nonfinite=args.allow_nonfinite_weights)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None and not args.no_eos_stop else []
    for text in args.stop:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise UsageError(f"--stop {text!r} is {len(ids)} tokens; a stop must be exactly one token")
        stop += ids
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, stop_tokens=tuple(stop), seed=args.seed,
                              vocab_limit=tokenizer.vocab_size)
    with torch.inference_mode():
        generate_text(model, tokenizer, prompt, sampling, args.state, args.save_state, args.prefill_chunk,
                      allow_other_weights=args.allow_other_weights)
    return 0


def generate_text(model: HybridLM, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig,
                  state_in: str | None, state_out: str | None, prefill_chunk: int,
                  out: TextIO | None = None, log: TextIO | None = None, allow_other_weights: bool = False
                  ) -> ModelState:
    """Stream the continuation of ``prompt`` to ``out``; speed and state memory go to ``log``.

    ``state_in``: a state saved earlier (``state_out`` of another run) that the prompt continues; it
    must have been made with these weights unless ``allow_other_weights``.
    ``state_out``: where to save the state after the prompt and the generated text.
    """
    out, log = out or sys.stdout, log or sys.stderr  # looked up now, so redirections apply
    fingerprint, weights = model.config.fingerprint(), weights_identity(model)
    state = None
    if state_in is not None:
        state = ModelState.load(state_in, fingerprint, model.state_classes(), device=model.device,
                                weights=None if allow_other_weights else weights)
        print(f"[continuing a saved state of {state.seq_len} tokens]", file=log)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("the prompt is empty: give at least one character of text (--prompt or --prompt-file)")
    decoder = tokenizer.stream_decoder()

    def show(row: int, token: int) -> None:
        out.write(decoder.push(token))
        out.flush()

    result = generate(model, [ids], sampling, state=state, on_token=show, prefill_chunk_size=prefill_chunk)
    out.write(decoder.flush() + "\n")
    stats, final = result.stats, result.states[0]
    memory = ", ".join(f"{kind} {human_bytes(n)}" for kind, n in sorted(final.bytes_by_kind().items()))
    print(f"[prompt {len(ids)} tokens: prefill {stats.prefill_tokens} tokens in {stats.prefill_seconds:.2f} s; "
          f"{stats.generated_tokens} new tokens at {stats.decode_tokens_per_s:.1f} tokens/s; "
          f"finished by {result.finish_reasons[0]}]", file=log)
    print(f"[state after {final.seq_len} tokens: {human_bytes(final.nbytes())} ({memory})]", file=log)
    if state_out is not None:
        final.save(state_out, fingerprint, weights)
        print(f"[state saved to {state_out}; continue it with --state {state_out}]", file=log)
    return final
