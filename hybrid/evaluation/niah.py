"""``hybrid eval --niah``: needle-in-a-haystack retrieval, on prompts generated offline.

``make_niah_sample`` and ``run_niah``: our own seeded, offline generator in the style of RULER's
single-needle tasks (NIAH-S1/S2/S3, the paper's long-context table). A prompt of about ``context``
tokens: an instruction line, a haystack with one needle sentence "The special magic number for KEY
is VALUE." at a chosen relative depth (0 = first sentence, 1 = just before the query), then the
query "What is the special magic number for KEY mentioned in the provided text? The special
magic number for KEY mentioned in the provided text is". Styles:

* ``passkey`` (RULER S1): a haystack of the same five filler sentences repeated; value 7 digits.
* ``word`` (RULER S2): an essay-like haystack, consecutive sentences of the built-in corpus with
  speaker names, headings and stage directions removed; value 7 digits.
* ``uuid`` (RULER S3): the essay haystack; the value is a uuid-like 8-4-4-4-12 hex string.

Keys are two-word "adjective-noun" names. The model continues the prompt greedily; the score is
exact match: the first digit run (or uuid-shaped string) of its output must equal the value.
Everything is a pure function of (seed, style, context, depth, index).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hybrid.formats.tokenizer import Tokenizer
from hybrid.generation.generate import SamplingConfig, generate
from hybrid.model.model import HybridLM
from hybrid.training.data import builtin_corpus, find_documents

NIAH_STYLES = ("passkey", "word", "uuid")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "misty", "noble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
              "wild", "young", "zealous", "bitter", "crisp", "dizzy", "early", "fierce", "grand", "humble")
NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tower",
         "umbrella", "valley", "wagon", "yarrow", "zephyr", "beacon", "cellar", "dune", "ember", "forest")
INSTRUCTION = ("Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {kind}s afterwards.\n")
NEEDLE = "The special magic {kind} for {key} is {value}."
QUERY = ("\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
         "The special magic {kind} for {key} mentioned in the provided text is")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DIGITS = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class NiahSample:
    """One prompt. ``needle_start``: character offset of the needle in ``prompt``; the haystack
    (needle included) spans ``prompt[haystack_start:haystack_end]``."""

    style: str
    context: int
    depth: float
    index: int
    prompt: str
    answer: str
    key: str
    needle_start: int
    haystack_start: int
    haystack_end: int

    @property
    def relative_depth(self) -> float:
        """Where the needle starts, as a fraction of the haystack without it."""
        needle_len = len(NEEDLE.format(kind=value_kind(self.style), key=self.key, value=self.answer))
        return (self.needle_start - self.haystack_start) / max(1, self.haystack_end - self.haystack_start - needle_len)


def value_kind(style: str) -> str:
    return "uuid" if style == "uuid" else "number"


def _clean_play(text: str) -> str:
    """A play as prose: no headings, speaker names or stage directions; verse lines joined."""
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "**")) or (line.startswith("_") and line.endswith("_")):
            continue
        kept.append(line.replace("_", ""))
    return " ".join(kept)


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Sentences of the built-in corpus in reading order (the essay haystack)."""
    sentences: list[str] = []
    for doc in find_documents([builtin_corpus()]):
        for sentence in re.split(r"(?<=[.!?])\s+", _clean_play(doc.text)):
            sentence = " ".join(sentence.split())
            if len(sentence) > 1:
                sentences.append(sentence)
    return tuple(sentences)


def make_niah_sample(style: str, context: int, depth: float, index: int, tokenizer: Tokenizer,
                     seed: int = 0) -> NiahSample:
    """A prompt of about ``context`` tokens with the needle at relative ``depth`` (0..1) of the haystack,
    placed at the sentence boundary nearest to it. Deterministic in its arguments."""
    if style not in NIAH_STYLES:
        raise ValueError(f"unknown NIAH style {style!r}; styles: {', '.join(NIAH_STYLES)}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"niah|{seed}|{style}|{context}|{depth!r}|{index}")
    kind = value_kind(style)
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if style == "uuid":
        hexes = "".join(rng.choice("0123456789abcdef") for _ in range(32))
        value = "-".join((hexes[:8], hexes[8:12], hexes[12:16], hexes[16:20], hexes[20:]))
    else:
        value = str(rng.randrange(1_000_000, 10_000_000))
    instruction = INSTRUCTION.format(kind=kind)
    needle = NEEDLE.format(kind=kind, key=key, value=value)
    query = QUERY.format(kind=kind, key=key)
    budget = context - len(tokenizer.encode(instruction + needle + query)) - 1
    if budget < 16:
        raise ValueError(f"a {style} NIAH prompt needs more than {context} tokens: its instruction, needle and query "
                         f"alone take {context - budget - 1}; use longer contexts")
    pool = NOISE if style == "passkey" else essay_sentences()
    start = 0 if style == "passkey" else rng.randrange(len(pool))
    haystack, used = [], 0
    for offset in range(max(budget, 0)):  # each sentence costs at least one token: enough tries
        sentence = pool[(start + offset) % len(pool)]
        cost = len(tokenizer.encode(" " + sentence))
        if used + cost <= budget:  # a sentence too long for what is left is skipped
            haystack.append(sentence)
            used += cost
        elif budget - used < 16:
            break
    lengths = [len(s) + 1 for s in haystack]
    target = depth * sum(lengths)
    boundaries = [0]
    for n in lengths:
        boundaries.append(boundaries[-1] + n)
    at = min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - target))
    parts = haystack[:at] + [needle] + haystack[at:]
    body = " ".join(parts)
    needle_start = len(instruction) + sum(len(s) + 1 for s in haystack[:at])
    prompt = instruction + body + query
    return NiahSample(style, context, depth, index, prompt, value, key, needle_start,
                      len(instruction), len(instruction) + len(body))


def extract_answer(style: str, generated: str) -> str | None:
    """The value the model gave: the first uuid-shaped string (uuid style) or digit run, or None."""
    match = (_UUID if style == "uuid" else _DIGITS).search(generated.lower() if style == "uuid" else generated)
    return match.group(0) if match else None


def niah_correct(style: str, generated: str, answer: str) -> bool:
    """Exact match of the first value in ``generated`` with ``answer``."""
    return extract_answer(style, generated) == answer


@dataclasses.dataclass(frozen=True)
class NiahResult:
    sample: NiahSample
    prompt_tokens: int
    generated: str
    correct: bool


def run_niah(model: HybridLM, tokenizer: Tokenizer, styles: Sequence[str], contexts: Sequence[int],
             depths: Sequence[float], samples: int, seed: int = 0, prefill_chunk: int = 1024,
             log: Callable[[str], None] | None = None) -> list[NiahResult]:
    """Generate every (style, context, depth, index) sample, let the model answer greedily, score it."""
    results = []
    for style in styles:
        for context in contexts:
            for depth in depths:
                for index in range(samples):
                    sample = make_niah_sample(style, context, depth, index, tokenizer, seed)
                    ids = tokenizer.encode(sample.prompt)
                    budget = len(tokenizer.encode(" " + sample.answer)) + 4
                    out = generate(model, [ids], SamplingConfig(temperature=0, max_new_tokens=budget),
                                   prefill_chunk_size=prefill_chunk)
                    text = tokenizer.decode(out.tokens[0])
                    results.append(NiahResult(sample, len(ids), text, niah_correct(style, text, sample.answer)))
                    if log is not None:
                        log(f"{style:>8} {context:>7} depth {depth:.2f} #{index}: "
                            f"{'ok ' if results[-1].correct else 'miss'} {sample.answer!r} <- {text.strip()[:40]!r}")
    return results


def niah_table(results: Sequence[NiahResult]) -> dict[tuple[str, int], float]:
    """Accuracy (0..1) per (style, context)."""
    table: dict[tuple[str, int], list[bool]] = {}
    for r in results:
        table.setdefault((r.sample.style, r.sample.context), []).append(r.correct)
    return {k: sum(v) / len(v) for k, v in table.items()}


def write_niah(results: Sequence[NiahResult], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``niah.csv`` (one row per sample) and ``niah.png`` (accuracy per depth x context, one panel per style)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "niah.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["style", "context", "depth", "index", "prompt_tokens", "key", "answer", "generated",
                         "correct"])
        for r in results:
            s = r.sample
            writer.writerow([s.style, s.context, s.depth, s.index, r.prompt_tokens, s.key, s.answer, r.generated,
                             int(r.correct)])
    styles = list(dict.fromkeys(r.sample.style for r in results))
    fig = Figure(figsize=(5 * len(styles), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(styles), squeeze=False)
    fig.subplots_adjust(wspace=0.4)
    for ax, style in zip(axes[0], styles):
        mine = [r for r in results if r.sample.style == style]
        contexts = sorted({r.sample.context for r in mine})
        depths = sorted({r.sample.depth for r in mine})
        grid = [[sum(r.correct for r in mine if r.sample.depth == d and r.sample.context == c)
                 / max(1, sum(1 for r in mine if r.sample.depth == d and r.sample.context == c))
                 for c in contexts] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), accuracy in np.ndenumerate(np.array(grid)):
            ax.text(j, i, f"{100 * accuracy:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{style}")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(title)
    png_path = out_dir / "niah.png"
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    return csv_path, png_path
