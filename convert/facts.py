"""Knowledge kept: the teacher's and a student's greedy continuations of short factual prompts.

Each prompt of ``FACT_PROMPTS`` is read after a preamble of held-out text long enough to put it
beyond the student's window (twice the window), so that the student's compressed memory is in use
when it answers; a prompt *agrees* when the student's first ``AGREE_TOKENS`` greedy tokens are the
teacher's. The preamble is the ``PREAMBLE_DOMAIN`` text when the report has it: after it SmolLM2
still answers most prompts as expected (after the play, it answers in the play's voice).
"""

from __future__ import annotations

from hybrid.formats.tokenizer import Tokenizer
from hybrid.generation.generate import SamplingConfig, generate
from hybrid.model.model import HybridLM

FACT_PROMPTS = (
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
    "The play Romeo and Juliet was written by",
    "The chemical symbol for gold is",
    "The first president of the United States was",
    "The boiling point of water at sea level is",
    "The tallest mountain in the world is",
    "The currency of Japan is the",
    "The Great Wall is in",
)
AGREE_TOKENS = 8
PREAMBLE_DOMAIN = "technical docs"  # convert.heldout's domain whose text precedes the prompts


def preamble_ids(tokenizer: Tokenizer, text: str, window: int) -> list[int]:
    """The first ``2 * window`` tokens of ``text`` and a paragraph break: what every prompt follows."""
    ids = tokenizer.encode(text)[: 2 * window]
    if len(ids) < 2 * window:
        raise ValueError(f"the preamble text has {len(ids)} tokens, fewer than twice the window ({2 * window})")
    return ids + tokenizer.encode("\n\n")


def greedy_continuations(model: HybridLM, tokenizer: Tokenizer, preamble: list[int]) -> list[list[int]]:
    """Each fact prompt's first ``AGREE_TOKENS`` greedy tokens after ``preamble`` (token ids)."""
    config = SamplingConfig(temperature=0.0, max_new_tokens=AGREE_TOKENS)
    prompts = [preamble + tokenizer.encode(prompt) for prompt in FACT_PROMPTS]
    model.eval()
    return [list(tokens) for tokens in generate(model, prompts, config).tokens]


def fact_rows(tokenizer: Tokenizer, teacher: list[list[int]], student: list[list[int]]) -> list[dict]:
    """The report's rows: prompt, both continuations as text, and whether they agree."""
    return [{"prompt": prompt, "teacher": tokenizer.decode(t), "student": tokenizer.decode(s), "agree": t == s}
            for prompt, t, s in zip(FACT_PROMPTS, teacher, student)]
