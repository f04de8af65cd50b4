"""What the ``hybrid init`` and ``hybrid generate`` commands do, apart from parsing arguments.

``open_model`` accepts a checkpoint folder or a recipe (random weights, for trying a recipe
out); ``generate_text`` streams text to a writer and reports speed and state memory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from hybrid.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hybrid.generation.generate import SamplingConfig, generate
from hybrid.model.describe import human_bytes
from hybrid.model.model import HybridLM
from hybrid.model.recipe import Recipe, load_recipe
from hybrid.model.state import ModelState
from hybrid.formats.tokenizer import Tokenizer, load_tokenizer


class UsageError(ValueError):
    """A command used the wrong way (no prompt, a multi-token stop string...)."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_from_recipe(recipe: Recipe, seed: int) -> tuple[HybridLM, Tokenizer]:
    source = Path(recipe.source)
    tokenizer = load_tokenizer(recipe.tokenizer, source.parent if source.is_file() else None,
                               vocab_size=recipe.model.vocab_size)
    torch.manual_seed(seed)
    return HybridLM(recipe.model).eval(), tokenizer


def init_checkpoint(recipe_path: str, out: str, seed: int) -> Path:
    """A checkpoint folder with freshly initialised weights (the start of training)."""
    recipe = load_recipe(recipe_path)
    model, tokenizer = build_from_recipe(recipe, seed)
    return save_checkpoint(out, recipe, model, tokenizer)


def import_published(source: str, out: str, compat: bool) -> Path:
    """A published KVM-paper checkpoint (recursal/KVM-paper format) saved as our checkpoint folder."""
    from hybrid.formats.published import load_published

    recipe, model = load_published(source, compat=compat)
    return save_checkpoint(out, recipe, model)


def open_model(source: str, device: str, dtype: str | None, seed: int, log: TextIO
               ) -> tuple[Recipe, HybridLM, Tokenizer]:
    """A checkpoint folder, a training run folder (its newest checkpoint), or a recipe file/name
    (random weights: says so on ``log``)."""
    if Path(source).is_dir():
        folder = Path(source)
        if not (folder / "recipe.yaml").is_file():
            from hybrid.formats.run_folder import latest_checkpoint

            newest = latest_checkpoint(folder)
            if newest is not None:
                print(f"[{source} is a training run: using its newest checkpoint, {newest.name}]", file=log)
                folder = newest
        return load_checkpoint(folder, device=device, dtype=DTYPES[dtype] if dtype else None)
    try:
        recipe = load_recipe(source)
    except Exception:
        if Path(source).exists():
            raise
        raise CheckpointError(f"{source!r} is neither a checkpoint folder nor a recipe") from None
    print(f"[{source} is a recipe: random weights, seed {seed}; pass a checkpoint folder for a trained model]",
          file=log)
    model, tokenizer = build_from_recipe(recipe, seed)
    return recipe, model.to(device=device, dtype=DTYPES[dtype] if dtype else None), tokenizer


def generate_text(model: HybridLM, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig,
                  state_in: str | None, state_out: str | None, prefill_chunk: int,
                  out: TextIO | None = None, log: TextIO | None = None) -> ModelState:
    """Stream the continuation of ``prompt`` to ``out``; speed and state memory go to ``log``.

    ``state_in``: a state saved earlier (``state_out`` of another run) that the prompt continues.
    ``state_out``: where to save the state after the prompt and the generated text.
    """
    out, log = out or sys.stdout, log or sys.stderr  # looked up now, so redirections apply
    fingerprint = model.config.fingerprint()
    state = None
    if state_in is not None:
        state = ModelState.load(state_in, fingerprint, model.state_classes(), device=model.device)
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
        final.save(state_out, fingerprint)
        print(f"[state saved to {state_out}; continue it with --state {state_out}]", file=log)
    return final
