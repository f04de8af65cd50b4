"""Bad input never crashes the command line. Recipes, files and argument lists are mutated at random
from valid ones (a seeded RNG: type swaps, out-of-range and non-finite numbers, deletions,
duplications, unknown keys, byte flips, truncations), and every mutant must give exit code 2, one
line on stderr naming the problem, no traceback, within a time bound (a hang fails the case).

Each mutation is one the toolkit must refuse (a negative integer, a NaN, a type no option takes, a
byte that is not UTF-8, a flipped bit under a content hash...), so a mutant that is accepted is a
failure too. Cases run in this process through ``hybrid.cli.main.main``; a few run as real
processes to show the exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from hybrid.cli.main import main
from hybrid.formats.integrity import tensors_sha256

ROOT = Path(__file__).resolve().parents[1]
SEED = 20250522
CASE_SECONDS = 30  # the hang guard: no case may take longer
RECIPE_CASES, FILE_CASES, ARGUMENT_CASES = 72, 26, 40

BASE = {
    "model": {"vocab_size": 256, "d_model": 32, "n_layers": 3, "layers": "GKS", "tie_embeddings": False,
              "logit_softcap": 30.0, "init_std": 0.02,
              "mixers": {"gla": {"num_heads": 2, "expand_k": 0.5},
                         "kvm": {"num_heads": 2, "chunk_len": 8, "state_min_len": 8, "rope_partial_dim": 8,
                                 "budget": "power_law", "growth_factor": 2.0},
                         "swa": {"num_heads": 2, "window": 16, "qk_norm": "rmsnorm"}},
              "block": {"norm": "rmsnorm", "mlp": "swiglu", "mlp_expansion": 2.0, "residual_scale": 1.0,
                        "mlp_token_shift": True}},
    "tokenizer": {"type": "bytes"},
    "train": {"seq_len": 32, "batch_size": 2, "max_steps": 10, "lr": 0.001, "warmup_steps": 2,
              "betas": [0.9, 0.95], "seed": 1, "schedule": "cosine", "grad_clip": 1.0},
}
SIZES = ("vocab_size", "d_model", "n_layers", "chunk_len", "window", "num_heads")
"""Integer keys where a huge value is always refused (memory, a window beyond any context, heads
that do not divide d_model, too many layers)."""


# ----------------------------------------------------------------------------- running a case

class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def stop(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``hybrid ARGV`` in this process, within the hang guard. An exception
    that escapes ``main`` is a traceback: it fails the test with that traceback."""
    capsys.readouterr()
    with time_limit(CASE_SECONDS):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, capsys.readouterr().err


def problems(code: int, err: str, expected: str | None = None) -> str | None:
    """What is wrong with a refusal (None: exit code 2, no traceback, and one error line 'hybrid ...:
    error: ...' last on stderr, after at most the bracketed status lines a command prints as it works)."""
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 2:
        return f"exit code {code}"
    if "Traceback" in err:
        return "a traceback"
    others = [line for line in lines[:-1] if not (line.startswith("[") and line.endswith("]"))]
    if not lines or others or not lines[-1].startswith("hybrid") or ": error: " not in lines[-1]:
        return f"not one error line: {err!r}"
    if expected is not None and expected not in lines[-1]:
        return f"does not name {expected!r}: {lines[-1]}"
    return None


def check_all(cases, capsys) -> list[str]:
    """Run (description, argv, expected text) cases; the failures, each with its description."""
    failures = []
    for description, argv, expected in cases:
        code, err = run_cli(argv, capsys)
        problem = problems(code, err, expected)
        if problem is not None:
            failures.append(f"{description}: {problem}")
    return failures


# ----------------------------------------------------------------------------- recipes

def leaves(data, path=()):
    """(path, value) of every scalar in a nested dict/list."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaves(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from leaves(value, (*path, i))
    else:
        yield path, data


def set_at(data, path, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def wrong_type(rng, value):
    if isinstance(value, bool):
        return rng.choice(["maybe", 2, [True], {"a": 1}])
    if isinstance(value, int):
        return rng.choice(["twelve", [1, 2], {"a": 1}, True, 1.5])
    if isinstance(value, float):
        return rng.choice(["half", [0.5], {"a": 1.0}, False])
    return rng.choice([7, [1, 2], {"a": 1}, True, 2.5])


def mutate_data(rng: random.Random, kind: str) -> tuple[dict | str, str]:
    """A mutated copy of BASE (as data, or as YAML text for the kinds that break the text) and the
    YAML path or phrase the error must name."""
    data = copy.deepcopy(BASE)
    scalars = [(p, v) for p, v in leaves(data)]
    if kind == "wrong type":
        path, value = rng.choice(scalars)
        set_at(data, path, wrong_type(rng, value))
        return data, str(path[-1]) if isinstance(path[-1], str) else str(path[-2])
    if kind == "non-finite":
        path, _ = rng.choice([(p, v) for p, v in scalars if isinstance(v, float)])
        set_at(data, path, rng.choice([float("nan"), float("inf"), -float("inf")]))
        return data, "finite"
    if kind == "negative":
        path, _ = rng.choice([(p, v) for p, v in scalars if type(v) is int])
        set_at(data, path, -rng.randint(1, 10 ** rng.randint(1, 12)))
        return data, str(path[-1])
    if kind == "huge":  # a size beyond any machine, or any integer beyond 64 bits
        sizes = rng.random() < 0.5
        path, _ = rng.choice([(p, v) for p, v in scalars if type(v) is int and (p[-1] in SIZES or not sizes)])
        low = 12 if path[-1] in SIZES else 19
        set_at(data, path, rng.choice([10 ** rng.randint(low, 30)] * 2 + [2 ** 63, 2 ** 64 + rng.randint(0, 9)]))
        return data, str(path[-1])
    if kind == "unknown key":
        sections = [("model",), ("model", "block"), ("model", "mixers", "kvm"), ("model", "mixers", "gla"),
                    ("tokenizer",), ("train",), ()]
        section = rng.choice(sections)
        node = data
        for key in section:
            node = node[key]
        key = rng.choice(list(node)) + rng.choice(["_", "x", "s", "_old"])
        node[key] = rng.choice([1, "a", 0.5])
        return data, key
    if kind == "missing":
        path = rng.choice([("model", "vocab_size"), ("model", "d_model"), ("model", "n_layers"), ("model", "layers"),
                           ("model", "mixers"), ("model",), ("train", "max_steps"),
                           ("model", "mixers", "kvm")])
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return data, {"kvm": "'K'"}.get(path[-1], path[-1])
    if kind == "bad pattern":
        pattern = rng.choice(["G*" + "9" * rng.randint(5, 400), "G*0", "(GK", "GK)", "G**2", "G?K", "", "GKZ", "GK",
                              "GKS*2", "(GKS)*" + str(rng.randint(1400, 10 ** 9)), [], ["gla", "nope"], 3])
        data["model"]["layers"] = pattern
        return data, "layers"
    if kind == "bad extends":
        data["extends"] = rng.choice(["", "no/such/recipe_xyz", 5, ["tiny/gla_kvm"], "a\0b", "z" * 5000, {"a": 1}])
        return data, "extends"
    if kind == "mixer name":
        data["model"]["mixers"][rng.choice([1, 2.5, True, None])] = {"num_heads": 2}
        return data, "model.mixers"
    text = yaml.safe_dump(data, sort_keys=False)
    if kind == "duplicate key":
        lines = text.splitlines(keepends=True)
        i = rng.choice([i for i, line in enumerate(lines) if ":" in line and not line.strip().startswith("-")])
        return "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]), "appears twice"
    if kind == "not utf-8":
        at = rng.randrange(len(text))
        bad = rng.choice([*range(0x80, 0xC0), 0xC0, 0xC1, *range(0xF5, 0x100)])
        return text[:at].encode() + bytes([bad]) + text[at:].encode(), "not UTF-8"
    assert kind == "truncated", kind
    flow = yaml.safe_dump(data, default_flow_style=True, width=10 ** 6).strip()  # one {...}: any cut leaves it open
    return flow[:rng.randrange(1, len(flow) - 1)], "not valid YAML"


RECIPE_KINDS = ("wrong type", "non-finite", "negative", "huge", "unknown key", "missing", "bad pattern", "bad extends",
                "mixer name", "duplicate key", "not utf-8", "truncated")


def test_the_base_recipe_is_valid(tmp_path, capsys):
    """The mutants below start from a recipe that info and init accept, so what is refused is the mutation."""
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert run_cli(["info", str(path), "--context", "1k"], capsys)[0] == 0
    assert run_cli(["init", str(path), str(tmp_path / "ckpt")], capsys)[0] == 0


def test_malformed_recipes_are_refused_cleanly(tmp_path, capsys):
    rng = random.Random(SEED)
    cases, start = [], time.monotonic()
    for i in range(RECIPE_CASES):
        kind = RECIPE_KINDS[i % len(RECIPE_KINDS)]
        mutant, expected = mutate_data(rng, kind)
        path = tmp_path / f"recipe_{i:03d}.yaml"
        if isinstance(mutant, dict):
            path.write_text(yaml.safe_dump(mutant, sort_keys=False))
        else:
            path.write_bytes(mutant if isinstance(mutant, bytes) else mutant.encode())
        command = ["info", str(path), "--context", "1k"] if i % 3 else ["init", str(path), str(tmp_path / f"c{i}")]
        cases.append((f"{kind} #{i} ({path.name})", command, expected))
    failures = check_all(cases, capsys)
    assert not failures, f"{len(failures)} of {len(cases)} malformed recipes:\n" + "\n".join(failures)
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- corrupted files

@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A checkpoint with a tokenizer file, a state saved with it, and a two-checkpoint training run."""
    root = tmp_path_factory.mktemp("originals")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "words.json"))
    other = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "mat", "on", "sat", "cat", "the"])},
                                       unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other.save(str(root / "other.json"))
    recipe = copy.deepcopy(BASE)
    recipe["tokenizer"] = {"type": "file", "path": "words.json"}
    corpus = root / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    recipe["train"].update(data=[str(corpus)], cache_dir=str(root / "cache"), max_steps=2, ckpt_every=1,
                           keep_last=2, val_every=0, log_every=1, threads=1)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["init", str(root / "recipe.yaml"), str(root / "ckpt")]) == 0
    assert main(["generate", str(root / "ckpt"), "--prompt", "the cat", "--max-new-tokens", "3",
                 "--save-state", str(root / "s.state")]) == 0
    assert main(["train", str(root / "recipe.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root


def flip(path: Path, rng: random.Random, begin: int = 0, end: int | None = None, mask: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = rng.randrange(begin, len(data) if end is None else end)
    data[at] ^= mask if mask is not None else rng.randint(1, 255)
    path.write_bytes(bytes(data))


def header_length(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def resave(path: Path, change, with_metadata: bool = False) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied and its content hash recomputed
    (over its other metadata too: ``with_metadata``, as for a state), as the toolkit would have written
    those tensors: not corruption, the values themselves are bad."""
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    change(tensors)
    others = {k: v for k, v in metadata.items() if k != "content_sha256"}
    metadata["content_sha256"] = tensors_sha256(tensors, others if with_metadata else None)
    save_file(tensors, str(path), metadata=metadata)


def poison(tensors: dict) -> None:
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = tensors[name].clone().reshape(-1).index_fill(0, torch.tensor([0]), float("nan")).reshape(
        tensors[name].shape)


class Corruptions:
    """Generated file corruptions, each made on a fresh copy of an original in ``work``: every
    ``damage_*`` method returns (description, argv that reads the damaged file, expected text)."""

    def __init__(self, rng: random.Random, root: Path, work: Path):
        self.rng, self.root, self.work = rng, root, work

    def __iter__(self):
        makers = [getattr(self, name) for name in sorted(dir(self)) if name.startswith("damage_")]
        for i in range(FILE_CASES):
            yield makers[i % len(makers)]()

    def copy(self, name: str) -> Path:
        source, target = self.root / name, self.work / f"{self.rng.randrange(10 ** 9)}_{name}"
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        return target

    def generate(self, folder: Path, *more) -> list[str]:
        return ["generate", str(folder), "--prompt", "the cat", "--max-new-tokens", "2", *map(str, more)]

    def train(self, run: Path) -> list[str]:
        return ["train", str(self.root / "recipe.yaml"), "--out", str(run), "--no-progress"]

    def flip_data(self, path: Path) -> Path:
        flip(path, self.rng, begin=header_length(path))
        return path

    def flip_header(self, path: Path) -> Path:
        flip(path, self.rng, begin=8, end=header_length(path), mask=0x80)
        return path

    def truncate(self, path: Path) -> Path:
        path.write_bytes(path.read_bytes()[:self.rng.randrange(path.stat().st_size)])
        return path

    def damage_weights_data(self):
        folder = self.copy("ckpt")
        self.flip_data(folder / "model.safetensors")
        return "a flipped byte in the weights", self.generate(folder), "content hash"

    def damage_weights_header(self):
        folder = self.copy("ckpt")
        self.flip_header(folder / "model.safetensors")
        return "a flipped byte in the weights' header", self.generate(folder), "model.safetensors"

    def damage_weights_truncated(self):
        folder = self.copy("ckpt")
        self.truncate(folder / "model.safetensors")
        return "truncated weights", self.generate(folder), "model.safetensors"

    def damage_weights_nan(self):
        folder = self.copy("ckpt")
        resave(folder / "model.safetensors", poison)
        return "a NaN weight", self.generate(folder), "holds NaN or infinite values"

    def damage_recipe_byte(self):
        folder = self.copy("ckpt")
        flip(folder / "recipe.yaml", self.rng, mask=0x80)
        return "a flipped byte in recipe.yaml", self.generate(folder), "not UTF-8"

    def damage_recipe_truncated(self):
        folder = self.copy("ckpt")
        text = (folder / "recipe.yaml").read_text()
        end = text.index("  mixers:")  # a cut before the layer list ends always loses something the weights need
        (folder / "recipe.yaml").write_text(text[:self.rng.randrange(1, end)])
        return "a truncated recipe.yaml", self.generate(folder), "recipe.yaml"

    def damage_tokenizer_byte(self):
        folder = self.copy("ckpt")
        flip(folder / "tokenizer.json", self.rng)
        return "a flipped byte in tokenizer.json", self.generate(folder), "not the tokenizer this checkpoint was saved"

    def damage_tokenizer_swapped(self):
        folder = self.copy("ckpt")
        shutil.copyfile(self.root / "other.json", folder / "tokenizer.json")
        return "a swapped tokenizer.json", self.generate(folder), "not the tokenizer this checkpoint was saved with"

    def damage_state_data(self):
        path = self.flip_data(self.copy("s.state"))
        return "a flipped byte in a state", self.generate(self.root / "ckpt", "--state", path), "hash recorded"

    def damage_state_header(self):
        path = self.flip_header(self.copy("s.state"))
        return "a flipped byte in a state's header", self.generate(self.root / "ckpt", "--state", path), "s.state"

    def damage_state_truncated(self):
        path = self.truncate(self.copy("s.state"))
        return "a truncated state", self.generate(self.root / "ckpt", "--state", path), "s.state"

    def damage_state_nan(self):
        path = self.copy("s.state")
        resave(path, poison, with_metadata=True)
        return "a NaN in a state", self.generate(self.root / "ckpt", "--state", path), "holds NaN or infinite values"

    def damage_trainer_json_byte(self):
        run = self.copy("run")
        flip(run / "step_000002" / "trainer.json", self.rng, mask=0x80)
        return "a flipped byte in trainer.json", self.train(run), "trainer.json"

    def damage_trainer_json_number(self):
        run = self.copy("run")
        path = run / "step_000002" / "trainer.json"
        info = json.loads(path.read_text())
        info["tokens_seen"] += self.rng.randint(1, 1000)
        path.write_text(json.dumps(info))
        return "an edited number in trainer.json", self.train(run), "hash recorded in it"

    def damage_trainer_tensors(self):
        run = self.copy("run")
        self.flip_data(run / "step_000002" / "trainer.safetensors")
        return "a flipped byte in trainer.safetensors", self.train(run), "trainer.safetensors"

    def damage_trainer_weights_swapped(self):
        run = self.copy("run")
        shutil.copyfile(run / "step_000001" / "model.safetensors", run / "step_000002" / "model.safetensors")
        return "another step's weights", self.train(run), "not the one its trainer state was saved with"


def test_corrupted_files_are_refused_cleanly(originals, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    start = time.monotonic()
    cases = list(Corruptions(rng, originals, tmp_path))
    failures = check_all(cases, capsys)
    assert not failures, f"{len(failures)} of {len(cases)} corrupted files:\n" + "\n".join(failures)
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- arguments

def bad_arguments(rng: random.Random, work: Path):
    """Generated bad argument lists: (description, argv, expected text)."""
    (work / "folder").mkdir(exist_ok=True)
    (work / "latin1.txt").write_bytes(b"caf\xe9 " + bytes([rng.randint(0x80, 0xFF)]))
    (work / "plain.txt").write_text("hello")
    numbers = {
        "negative": lambda: str(-rng.randint(1, 10 ** 6)),
        "nan": lambda: rng.choice(["nan", "NaN", "-nan"]),
        "inf": lambda: rng.choice(["inf", "-inf", "1e999"]),
        "text": lambda: rng.choice(["abc", "", "1.2.3", "0x", "ten"]),
        "huge": lambda: str(10 ** rng.randint(20, 60)),
    }
    generate = ["generate", "tiny/gla_kvm", "--prompt", "a"]
    options = [  # (argv prefix, option, the kinds of bad value it must refuse, the text the error names)
        (generate, "--max-new-tokens", ["negative", "nan", "text", "huge", "inf"], "--max-new-tokens"),
        (generate, "--temperature", ["negative", "nan", "inf", "text"], "--temperature"),
        (generate, "--top-p", ["negative", "nan", "inf", "text", "huge"], "--top-p"),
        (generate, "--top-k", ["negative", "nan", "text", "huge"], "--top-k"),
        (generate, "--seed", ["negative", "nan", "text", "huge"], "--seed"),
        (generate, "--prefill-chunk", ["negative", "nan", "inf", "text", "huge"], "--prefill-chunk"),
        (["info", "tiny/gla_kvm", "--context"], None, ["negative", "nan", "inf", "text", "huge"], "--context"),
        (["info", "tiny/gla_kvm"], "--batch", ["negative", "nan", "text", "huge"], "--batch"),
        (["bench", "tiny/gla_kvm"], "--repeats", ["negative", "nan", "text", "huge"], "--repeats"),
        (["bench", "tiny/gla_kvm"], "--threads", ["negative", "nan", "text", "huge"], "--threads"),
        (["eval", "tiny/gla_kvm", "--niah"], "--samples", ["negative", "nan", "text", "huge"], "--samples"),
        (["eval", "tiny/gla_kvm", "--niah", "--depths"], None, ["negative", "nan", "inf", "text", "huge"], "--depths"),
        (["demo"], "--length", ["negative", "nan", "inf", "text", "huge"], "--length"),
    ]
    others = [
        lambda: ("a device torch cannot use", generate + ["--device", rng.choice(
            ["tpu", "cuda:x", "cpu:3", "gpu", "", "cuda:" + "9" * 8, "npu:0"])], "--device"),
        lambda: ("a state file written into a folder", generate + ["--save-state", str(work / "folder")], "--save-state"),
        lambda: ("a state file under a file", generate + ["--save-state", str(work / "plain.txt" / "s")], "--save-state"),
        lambda: ("a prompt that is not UTF-8", ["generate", "tiny/gla_kvm", "--prompt",
                                                "ab" + chr(0xDC80 + rng.randint(0, 127))], "--prompt"),
        lambda: ("a prompt file that is not UTF-8", ["generate", "tiny/gla_kvm", "--prompt-file",
                                                     str(work / "latin1.txt")], "not UTF-8"),
        lambda: ("a prompt file that is missing", ["generate", "tiny/gla_kvm", "--prompt-file",
                                                   str(work / "missing.txt")], "No such file"),
        lambda: ("a state that is not one", generate + ["--state", str(work / rng.choice(["plain.txt", "folder",
                                                                                          "missing.state"]))], "state"),
        lambda: ("no prompt", ["generate", "tiny/gla_kvm"], "--prompt"),
        lambda: ("a multi-token stop", generate + ["--stop", "abc"], "--stop"),
        lambda: ("an unknown option", generate + ["--" + rng.choice(["temprature", "top_p", "seeds"]), "1"],
                 "unrecognized arguments"),
        lambda: ("a model --set for train", ["train", "tiny/gla_kvm", "--set", "model.d_model=32"], "model:"),
        lambda: ("a bad --set value", ["train", "tiny/gla_kvm", "--set", rng.choice(
            ["train.lr=[1,", "train.lr=nan", "train.nosuch=1", "=3", "train.seed=-1", "train.seq_len={a: 1, a: 2}"])],
            "train"),
        lambda: ("an output folder that is a file", ["init", "tiny/gla_kvm", str(work / "plain.txt")], "is a file"),
        lambda: ("an unknown recipe", ["info", rng.choice(["no_such", "tiny/gla_kvmm", "", "x" * 300])], "recipe"),
        lambda: ("an unknown command", [rng.choice(["infoo", "gen", "Info"])], "invalid choice"),
        lambda: ("a bad dtype", generate + ["--dtype", rng.choice(["float8", "fp32", "int"])], "--dtype"),
    ]
    for i in range(ARGUMENT_CASES):
        if i % 2 == 0:
            prefix, option, kinds, expected = options[(i // 2) % len(options)]
            kind = rng.choice(kinds)
            value = numbers[kind]()
            argv = [*prefix, *([option] if option else []), value]
            yield f"{' '.join(prefix[:1])} {option or prefix[-1]} {kind} ({value[:20]!r})", argv, expected
        else:
            yield others[(i // 2) % len(others)]()


def test_bad_arguments_are_refused_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED + 2)
    start = time.monotonic()
    cases = list(bad_arguments(rng, tmp_path))
    failures = check_all(cases, capsys)
    assert not failures, f"{len(failures)} of {len(cases)} bad argument lists:\n" + "\n".join(failures)
    assert time.monotonic() - start < 60


def test_the_hang_guard_fires():
    with pytest.raises(Hang), time_limit(0.05):
        time.sleep(1)


# ----------------------------------------------------------------------------- real processes

def test_refusals_end_to_end_in_real_processes(originals, tmp_path):
    """A malformed recipe, a corrupted checkpoint and a bad argument, each through ``python -m hybrid``."""
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("model:\n  d_model: 32\nmodel:\n  d_model: 64\n")
    folder = tmp_path / "ckpt"
    shutil.copytree(originals / "ckpt", folder)
    flip(folder / "model.safetensors", random.Random(SEED), begin=header_length(folder / "model.safetensors"))
    cases = [(["info", str(recipe)], "appears twice"), (["generate", str(folder), "--prompt", "the"], "content hash"),
             (["generate", "tiny/gla_kvm", "--prompt", "a", "--top-p", "nan"], "--top-p")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, expected in cases:
        done = subprocess.run([sys.executable, "-m", "hybrid", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert problems(done.returncode, done.stderr, expected) is None, (argv, done.returncode, done.stderr)
        assert done.stdout == ""
