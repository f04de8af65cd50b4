"""Text sampled from the teacher: part of the default distillation data of ``hybrid convert``.

Stage 2 matches the student's next-token distributions to the teacher's on the distillation text;
text the teacher writes itself covers what it knows more broadly than a narrow corpus (the built-in
one is Shakespeare). ``sample_teacher`` continues ``OPENINGS`` (varied everyday openings: stories,
letters, recipes, reviews, ...; no factual questions, which the conversion report checks) by up to
``SAMPLE_LEN`` tokens each (temperature 1, top-p 0.95, stopping at the tokenizer's end-of-sequence
token), ``BATCH_SIZE`` samples per ``hybrid.generation.generate`` call.

The samples go to ``stages/teacher_samples.jsonl`` of the conversion folder, one JSON object a line:
``{"i": index, "tokens": new tokens, "text": opening + continuation}``, appended (flushed and synced)
after each batch. An interrupted sampling resumes after the last complete line (a line cut short
by a kill is dropped), and a complete file is reused as it is. Sample ``i`` continues
``OPENINGS[i % len(OPENINGS)]`` in batch ``i // BATCH_SIZE``, which is seeded from (seed, its first
index): a sample is the same whether a first run or a resumed one made it. ``teacher_samples.json``
beside it records the settings (seed, ``SAMPLE_LEN``, the openings...); a file made with other
settings is refused. Asking for more samples than the file holds extends it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from convert.errors import TeacherError
from hybrid.formats.atomic import write_text
from hybrid.formats.tokenizer import Tokenizer
from hybrid.generation.generate import SamplingConfig, generate
from hybrid.model.model import HybridLM

SAMPLE_LEN = 512  # new tokens per sample, at most (a sample ends at the tokenizer's end-of-sequence token)
BATCH_SIZE = 8
TEMPERATURE = 1.0
TOP_P = 0.95
MAX_DEFAULT_TOKENS = 2_000_000  # sample_budget's cap
SAMPLES_FILE = "teacher_samples.jsonl"
SETTINGS_FILE = "teacher_samples.json"
OPENINGS = (
    "Once upon a time, in a village at the edge of a great forest,",
    "The last bus had already left when Maya realised that",
    "Nobody in our family ever talked about the summer when",
    "The robot had been switched off for eleven years, until one morning",
    "Chapter One\n\nThe rain had not stopped for three days, and",
    "It was the kind of quiet afternoon when",
    "Dear Grandma,\n\nThank you so much for the sweater you sent. It",
    "Dear Mr. Hollis,\n\nI am writing to let you know that",
    "To make this lemon cake, first preheat the oven and",
    "Ingredients: two cups of flour, three eggs, a pinch of salt.\n\nMethod:",
    "For a simple vegetable soup that feeds four, you will need",
    "How to fix a squeaky door: start by",
    "If your houseplants keep wilting, the first thing to check is",
    "Step 1: Unplug the router and wait thirty seconds.\nStep 2:",
    "Tips for a good night's sleep: keep your bedroom",
    "\"Are you sure this is the right road?\" asked Tom.\n\"Of course,\" said",
    "A: Did you finish the report for Friday?\nB: Almost, but",
    "\"I can't believe you kept the ticket all these years,\" she said, and",
    "I bought these headphones for my daily commute, and after two months",
    "Review: 3 out of 5 stars. The blender works well, but",
    "We stayed at this little hotel for a week in June. The rooms",
    "The town council of Millbrook voted on Tuesday to",
    "Residents of the small town of Pell Creek woke up on Sunday to find",
    "A bakery on Orchard Lane has won this year's county prize for",
    "The river keeps its quiet song\nbeneath the",
    "I wandered out at break of day,\nwhere",
    "Snow on the rooftops, smoke in the air,\nand",
    "Monday. Woke up late again and",
    "Dear diary, today was the strangest day of",
    "Travel journal, day three. The train wound slowly through the hills and",
    "In today's lecture we will look at why prices tend to rise when",
    "To understand how a habit forms, it helps to think about",
    "The basic idea behind saving money is simple:",
    "Let me explain why practice matters more than talent. Imagine",
    "Hi team,\n\nJust a quick reminder that the meeting on Thursday",
    "Subject: Moving house\n\nHi Sam,\n\nWe finally",
    "Hello,\n\nI ordered a lamp from your shop last week, and unfortunately",
    "Has anyone else had trouble getting their sourdough starter to",
    "Posted by greenthumb42: My tomato plants are turning yellow at the bottom and",
    "Quick question for the cyclists here: I have been riding to work for a month and",
    "Little Bear did not want to go to sleep, because",
    "There was once a tiny mouse who lived inside a teapot, and every morning",
    "The three goats looked at the old bridge and",
    "The first time I tried to ride a bicycle,",
    "Welcome to the guided tour of the old mill. On your left you can see",
    "Meeting notes, 4 March: The group agreed to",
    "We are looking for a friendly and reliable person to join our small team and",
    "My neighbour has a dog named Biscuit who",
)


@dataclasses.dataclass(frozen=True)
class TeacherSamples:
    """A complete samples file: ``path``, how many ``samples`` and new ``tokens`` (prompts and the
    end-of-sequence tokens not counted) it holds, and the ``tokens_asked`` it was made for."""

    path: Path
    samples: int
    tokens: int
    tokens_asked: int

    def to_dict(self) -> dict:
        """The record of ``stages/conversion.json``."""
        return {"file": str(self.path), "samples": self.samples, "tokens": self.tokens,
                "tokens_asked": self.tokens_asked}


def sample_budget(budgets: dict[str, int]) -> int:
    """The default number of tokens to sample: a quarter of the stage 1 + stage 2 budgets, at most
    ``MAX_DEFAULT_TOKENS``, rounded down to whole samples (0 when that is less than one)."""
    quarter = min((budgets.get("stage1", 0) + budgets.get("stage2", 0)) // 4, MAX_DEFAULT_TOKENS)
    return quarter // SAMPLE_LEN * SAMPLE_LEN


def sample_count(tokens: int) -> int:
    """How many samples ``tokens`` asks for (whole samples of ``SAMPLE_LEN``); a positive number
    below one sample is refused."""
    if 0 < tokens < SAMPLE_LEN:
        raise TeacherError(f"--teacher-samples {tokens} is less than one sample ({SAMPLE_LEN} tokens): ask for at "
                           f"least {SAMPLE_LEN}, or 0 for none")
    return tokens // SAMPLE_LEN


def openings_hash() -> str:
    """A short hash of ``OPENINGS`` (a samples file made from other openings is refused)."""
    return hashlib.sha256(json.dumps(OPENINGS).encode()).hexdigest()[:16]


def batch_seed(seed: int, first: int) -> int:
    """The sampling seed of the batch whose first sample is ``first``."""
    return int(np.random.SeedSequence([seed, first]).generate_state(1)[0])


@torch.no_grad()
def sample_teacher(teacher: HybridLM, tokenizer: Tokenizer, tokens: int, folder: Path, seed: int = 0,
                   progress: bool = True) -> TeacherSamples:
    """Make ``folder/SAMPLES_FILE`` hold ``sample_count(tokens)`` samples of the teacher's text (see the
    module docstring), sampling only those it does not hold yet, and return it. Refuses a file made with
    other settings or holding more samples, and a teacher that wrote no text at all."""
    from tqdm.auto import tqdm

    n = sample_count(tokens)
    path = Path(folder) / SAMPLES_FILE
    settings = {"seed": seed, "sample_len": SAMPLE_LEN, "batch_size": BATCH_SIZE, "temperature": TEMPERATURE,
                "top_p": TOP_P, "openings": openings_hash()}
    records = read_samples(path, settings, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**settings, "tokens_asked": tokens, "samples": n}
    write_text(path.with_name(SETTINGS_FILE), json.dumps(record, indent=1) + "\n")
    start = len(records) // BATCH_SIZE * BATCH_SIZE if len(records) < n else n  # the batch of the first missing
    with open(path, "a", encoding="utf-8") as out, tqdm(
            total=n, initial=len(records), unit="sample", desc="sampling the teacher", disable=not progress,
            file=sys.stderr) as bar:
        for first in range(start, n, BATCH_SIZE):
            batch = sample_batch(teacher, tokenizer, range(first, min(first + BATCH_SIZE, n)), seed)
            new = [r for r in batch if r["i"] >= len(records)]  # a resumed batch may hold some already
            out.write("".join(json.dumps(r) + "\n" for r in new))
            out.flush()
            os.fsync(out.fileno())
            records += new
            bar.update(len(new))
    total = sum(r["tokens"] for r in records)
    if n and total == 0:
        raise TeacherError(f"the teacher wrote no text in {n} samples (each ended at once with its end-of-sequence "
                           f"token): check the teacher and its tokenizer, or pass --teacher-samples 0; delete {path} "
                           "before trying again")
    return TeacherSamples(path, n, total, tokens)


def sample_batch(teacher: HybridLM, tokenizer: Tokenizer, indices: range, seed: int) -> list[dict]:
    """The samples ``indices`` (one batch, seeded from ``seed`` and its first index) as file records."""
    stop = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    prompts = [tokenizer.encode(OPENINGS[i % len(OPENINGS)]) for i in indices]
    config = SamplingConfig(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=SAMPLE_LEN, stop_tokens=stop,
                            seed=batch_seed(seed, indices.start), vocab_limit=tokenizer.vocab_size)
    result = generate(teacher, prompts, config)
    records = []
    for i, prompt, new in zip(indices, prompts, result.tokens):
        new = [t for t in new if t not in stop]
        records.append({"i": i, "tokens": len(new), "text": tokenizer.decode(prompt + new)})
    return records


def read_samples(path: Path, settings: dict, n: int) -> list[dict]:
    """The samples ``path`` holds ([] when there is none), its settings checked against ``settings``
    (seed, sample length, openings...); a last line cut short is removed from the file."""
    if not path.is_file():
        return []
    fix = f"delete {path} (and {SETTINGS_FILE} beside it) to sample again, or convert into a new folder"
    recorded_path = path.with_name(SETTINGS_FILE)
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    changed = [f"{k} {recorded.get(k)!r} there, {v!r} now" for k, v in settings.items() if recorded.get(k) != v]
    if changed:
        raise TeacherError(f"{path} was sampled with other settings ({'; '.join(changed)}): {fix}")
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]  # without a last line that a kill cut short
    if len(complete) < len(data):
        os.truncate(path, len(complete))
    records = []
    for number, line in enumerate(complete.decode("utf-8").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TeacherError(f"{path} line {number + 1} is not a JSON object: {fix}") from None
        if record.get("i") != number:
            raise TeacherError(f"{path} line {number + 1} holds sample {record.get('i')!r}, not {number}: {fix}")
        records.append(record)
    if len(records) > n:
        raise TeacherError(f"{path} holds {len(records)} samples, more than the {n} asked for: ask for "
                           f"--teacher-samples {len(records) * SAMPLE_LEN} or more, or {fix}")
    return records

