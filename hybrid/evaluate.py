"""``hybrid eval``: perplexity and loss by position on text, and needle-in-a-haystack retrieval.

**Perplexity and loss by position** (``score_documents``). Every document is tokenized and cut into
windows of ``max_len + 1`` tokens that overlap by one token, so every token after a document's first
is predicted exactly once; each window starts from an empty state and runs through the model
``chunk`` tokens per forward (the state carries between chunks, so memory is bounded and the
result is that of one long forward). The loss of predicting the token at window position p + 1 is
binned by p into ``bucket``-token buckets: the paper's per-position plot (1024-position buckets up
to 32k); for a tiny CPU model pick small buckets and windows. Perplexity = exp(total NLL / number
of predictions), so the buckets' losses weighted by their prediction counts average to the
overall loss.

The default text is the built-in corpus's held-out tail (``heldout_text``): the last 0.5 % of its
bytes, in the order training reads the corpus (sorted play files), which is the end of *Timon of
Athens*, about 26.6 KB, cut to start at a line. ``hybrid train`` on the built-in corpus with its
default ``val_fraction`` (0.01) holds out the last 1 % of the token stream for validation, about
twice as much, so a model trained that way has never seen this text.

**Needle in a haystack** (``make_niah_sample``, ``run_niah``): our own seeded, offline generator in
the style of RULER's single-needle tasks (NIAH-S1/S2/S3, the paper's long-context table). A prompt of
about ``context`` tokens: an instruction line, a haystack with one needle sentence "The special magic
number for KEY is VALUE." at a chosen relative depth (0 = first sentence, 1 = just before the query),
then the query "What is the special magic number for KEY mentioned in the provided text? The special
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
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.data import builtin_corpus, find_documents
from hybrid.generate import SamplingConfig, generate
from hybrid.model import HybridLM
from hybrid.tokenizer import Tokenizer

HELDOUT_FRACTION = 0.005


# ----------------------------------------------------------------------------- text

def heldout_text() -> str:
    """The built-in corpus's held-out tail (see the module docstring)."""
    data = [doc.text.encode("utf-8") for doc in find_documents([builtin_corpus()])]
    want = int(sum(map(len, data)) * HELDOUT_FRACTION)
    tail = data[-1][-want:]
    tail = tail[tail.index(b"\n") + 1:]  # start at a line (and never inside a UTF-8 sequence)
    return tail.decode("utf-8")


def load_texts(paths: Sequence[str] | None) -> list[str]:
    """The documents of text/JSONL files and folders (as ``hybrid train`` reads them); None: the
    held-out tail of the built-in corpus."""
    if not paths:
        return [heldout_text()]
    return [doc.text for doc in find_documents(paths)]


# ----------------------------------------------------------------------------- perplexity

@torch.no_grad()
def token_losses(model: HybridLM, ids: Sequence[int], chunk: int = 1024) -> torch.Tensor:
    """NLL (nats, fp32) of each token ``ids[1:]`` given the ones before it, one sequence from an empty
    state, ``chunk`` tokens per forward. Returns a tensor of ``len(ids) - 1`` losses."""
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=model.device)[None]
    state, losses = None, []
    for start in range(0, tokens.shape[1] - 1, chunk):
        inputs = tokens[:, start:min(start + chunk, tokens.shape[1] - 1)]
        out = model(inputs, state)
        state = out.state
        targets = tokens[0, start + 1:start + 1 + inputs.shape[1]]
        losses.append(F.cross_entropy(out.logits[0].float(), targets, reduction="none"))
    return torch.cat(losses).cpu() if losses else torch.zeros(0)


@dataclasses.dataclass
class ScoreResult:
    """Summed losses of every prediction, and per position bucket (bucket b: window positions
    ``[b * bucket, (b + 1) * bucket)``)."""

    bucket: int
    total_nll: float = 0.0
    count: int = 0
    bucket_nll: list[float] = dataclasses.field(default_factory=list)
    bucket_count: list[int] = dataclasses.field(default_factory=list)
    windows: int = 0

    @property
    def loss(self) -> float:
        return self.total_nll / self.count if self.count else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def add(self, losses: torch.Tensor) -> None:
        """Add one window's losses (position p at index p)."""
        n_buckets = math.ceil(len(losses) / self.bucket)
        while len(self.bucket_nll) < n_buckets:
            self.bucket_nll.append(0.0)
            self.bucket_count.append(0)
        for b in range(n_buckets):
            part = losses[b * self.bucket:(b + 1) * self.bucket].double()
            self.bucket_nll[b] += float(part.sum())
            self.bucket_count[b] += len(part)
        self.total_nll += float(losses.double().sum())
        self.count += len(losses)
        self.windows += 1

    def by_position(self) -> list[tuple[int, int, int, float]]:
        """(first position, last position + 1, predictions, mean loss) of every non-empty bucket."""
        return [(b * self.bucket, (b + 1) * self.bucket, n, nll / n)
                for b, (nll, n) in enumerate(zip(self.bucket_nll, self.bucket_count)) if n]


def score_documents(model: HybridLM, tokenizer: Tokenizer, texts: Sequence[str], max_len: int = 32768,
                    chunk: int = 1024, bucket: int = 1024,
                    progress: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Perplexity and loss by position of ``texts`` (see the module docstring)."""
    if min(max_len, chunk, bucket) < 1:
        raise ValueError(f"max_len, chunk and bucket must be >= 1, got {max_len}, {chunk}, {bucket}")
    result = ScoreResult(bucket)
    windows = []
    for text in texts:
        ids = tokenizer.encode(text)
        windows += [ids[s:s + max_len + 1] for s in range(0, max(len(ids) - 1, 0), max_len)]
    for i, window in enumerate(windows):
        result.add(token_losses(model, window, chunk))
        if progress is not None:
            progress(i + 1, len(windows))
    if result.count == 0:
        raise ValueError("the texts hold no token to predict (each document needs at least two tokens)")
    return result


def write_loss_by_position(result: ScoreResult, out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``loss_by_position.csv`` and ``loss_by_position.png`` (mean loss per bucket against position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result.by_position()
    csv_path = out_dir / "loss_by_position.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position_start", "position_end", "predictions", "loss", "perplexity"])
        for start, end, n, loss in rows:
            writer.writerow([start, end, n, f"{loss:.6f}", f"{math.exp(loss):.6g}"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([(start + end) / 2 for start, end, _, _ in rows], [loss for *_, loss in rows], marker="o", markersize=3)
    ax.set_xlabel(f"position in the window (buckets of {result.bucket} tokens)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = out_dir / "loss_by_position.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


# ----------------------------------------------------------------------------- needle in a haystack

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(1, len(styles), figsize=(5 * len(styles), 4), squeeze=False)
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
    plt.close(fig)
    return csv_path, png_path
