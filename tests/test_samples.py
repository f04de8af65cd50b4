"""convert/samples.py: text sampled from the teacher, written once to a resumable cache (sample i the same
in a first and a resumed run), refused when made with other settings; the openings ask no facts; the
default budget; ``hybrid convert`` distils on the samples by default with the built-in data and not
with the user's, and refuses data without text before any work."""

import json
import shutil
import types
from pathlib import Path

import pytest

import convert.samples as samples_module
from convert.distill import ConversionSettings, default_sources, run_conversion
from convert.errors import TeacherError
from convert.samples import (
    OPENINGS,
    SAMPLE_LEN,
    SAMPLES_FILE,
    SETTINGS_FILE,
    sample_budget,
    sample_count,
    sample_teacher,
)
from convert.teacher import load_teacher
from hybrid.cli.main import main
from tests.test_convert import TINY, random_teacher_tensors, write_hf_folder

BYTES = {**TINY, "vocab_size": 256}  # the byte tokenizer: no end-of-sequence token, every sample is SAMPLE_LEN long
KVM = {"kvm": {"chunk_len": 8, "n_bswa_chunks": 2}}
SMALL = {"seq_len": 48, "batch_size": 4}  # 192 tokens a step


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("teacher"), BYTES, random_teacher_tensors(BYTES))


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    return load_teacher(teacher_folder)


@pytest.fixture()
def calls(monkeypatch) -> list:
    """The number of prompts of each ``generate`` call the sampling makes."""
    made = []
    real = samples_module.generate

    def counted(model, prompts, config):
        made.append(len(prompts))
        return real(model, prompts, config)

    monkeypatch.setattr(samples_module, "generate", counted)
    return made


def sample(teacher, folder: Path, n: int, seed: int = 0):
    return sample_teacher(teacher.model, teacher.text_tokenizer(), n * SAMPLE_LEN, folder, seed, progress=False)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / SAMPLES_FILE).read_text().splitlines()]


def test_openings_are_varied_and_ask_no_facts():
    assert 40 <= len(OPENINGS) <= 60 and len(set(OPENINGS)) == len(OPENINGS)
    facts = ("The capital", "The largest", "Who", "What", "When", "Where", "In what year")
    for opening in OPENINGS:
        assert not opening.startswith(facts) and " is the capital" not in opening, opening
        assert not opening.rstrip().endswith((".", "?", "!")) and 2 <= len(opening.split()) <= 20, opening


def test_sample_budget_is_a_quarter_of_stages_1_and_2_in_whole_samples_at_most_2m():
    assert sample_budget({"stage1": 5_000_000, "stage2": 20_000_000, "stage3": 0}) == 3906 * SAMPLE_LEN
    assert sample_budget({"stage1": 4 * SAMPLE_LEN, "stage2": 8 * SAMPLE_LEN, "stage3": 10**9}) == 3 * SAMPLE_LEN
    assert sample_budget({"stage1": 1000, "stage2": 1000}) == 0  # 500 tokens: less than one sample
    assert sample_budget({"stage2": 4 * SAMPLE_LEN + 3}) == SAMPLE_LEN
    assert (sample_count(0), sample_count(SAMPLE_LEN), sample_count(3 * SAMPLE_LEN - 1)) == (0, 1, 2)


def test_sampling_writes_the_cache_once(teacher, tmp_path, calls):
    made = sample(teacher, tmp_path, 10)
    assert (made.path, made.samples, made.tokens, made.tokens_asked) == (
        tmp_path / SAMPLES_FILE, 10, 10 * SAMPLE_LEN, 10 * SAMPLE_LEN)
    assert calls == [8, 2]  # batches of 8
    lines = records(tmp_path)
    assert [r["i"] for r in lines] == list(range(10)) and all(r["tokens"] == SAMPLE_LEN for r in lines)
    assert all(r["text"].startswith(OPENINGS[r["i"] % len(OPENINGS)]) for r in lines)
    assert len({r["text"] for r in lines}) == 10
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert (settings["seed"], settings["sample_len"], settings["tokens_asked"]) == (0, SAMPLE_LEN, 10 * SAMPLE_LEN)

    content = (tmp_path / SAMPLES_FILE).read_bytes()
    assert sample(teacher, tmp_path, 10) == made and calls == [8, 2]  # reused: the model is not called
    assert (tmp_path / SAMPLES_FILE).read_bytes() == content


@pytest.mark.parametrize("kept", [8, 5])  # stopped after a whole batch, or killed in the middle of writing one
def test_an_interrupted_sampling_resumes_to_the_uninterrupted_file(teacher, tmp_path, calls, monkeypatch, kept):
    straight = tmp_path / "straight"
    sample(teacher, straight, 12)
    cut = tmp_path / "cut"
    real = samples_module.generate

    def stop_at_second_batch(model, prompts, config):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, prompts, config)

    monkeypatch.setattr(samples_module, "generate", stop_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sample(teacher, cut, 12)
    monkeypatch.undo()
    assert len(records(cut)) == 8
    lines = (straight / SAMPLES_FILE).read_text().splitlines(keepends=True)
    (cut / SAMPLES_FILE).write_text("".join(lines[:kept]) + lines[kept][:25])  # and a line cut short
    resumed = sample(teacher, cut, 12)
    assert (resumed.samples, resumed.tokens) == (12, 12 * SAMPLE_LEN)
    assert (cut / SAMPLES_FILE).read_bytes() == (straight / SAMPLES_FILE).read_bytes()


def test_more_samples_extend_the_cache_and_other_settings_are_refused(teacher, tmp_path):
    sample(teacher, tmp_path, 2)
    first = records(tmp_path)
    assert sample(teacher, tmp_path, 3).samples == 3 and records(tmp_path)[:2] == first
    with pytest.raises(TeacherError, match="holds 3 samples, more than the 2 asked for"):
        sample(teacher, tmp_path, 2)
    with pytest.raises(TeacherError, match=r"other settings \(seed 0 there, 1 now\): delete .*teacher_samples.jsonl"):
        sample(teacher, tmp_path, 3, seed=1)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**json.loads((tmp_path / SETTINGS_FILE).read_text()),
                                                      "openings": "0123456789abcdef"}))
    with pytest.raises(TeacherError, match="openings '0123456789abcdef' there"):
        sample(teacher, tmp_path, 3)


def test_a_budget_below_one_sample_and_a_silent_teacher_are_refused(teacher, tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match=f"--teacher-samples 100 is less than one sample \\({SAMPLE_LEN} tokens"):
        sample_teacher(teacher.model, teacher.text_tokenizer(), 100, tmp_path, progress=False)
    assert not (tmp_path / SAMPLES_FILE).exists()
    monkeypatch.setattr(samples_module, "generate",  # every sample ends at once
                        lambda model, prompts, config: types.SimpleNamespace(tokens=[[] for _ in prompts]))
    with pytest.raises(TeacherError, match="the teacher wrote no text in 9 samples"):
        sample(teacher, tmp_path, 9)


def convert(teacher_folder: Path, out: Path, cache: Path, budget: int, **extra):
    settings = ConversionSettings(str(teacher_folder), str(out), "AKK", mixers=KVM,
                                  budgets={"stage1": budget, "stage2": budget, "stage3": 0},
                                  stage_overrides={"stage1": SMALL, "stage2": SMALL}, threads=1, device="cpu",
                                  cache_dir=str(cache), **extra)
    return run_conversion(settings, progress=False)


def test_convert_distils_on_teacher_samples_by_default_and_not_on_the_users_data(teacher_folder, tmp_path, calls):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert convert(teacher_folder, out, cache, 6 * 192).finished  # a quarter of 2 * 1152 tokens: one sample
    record = json.loads((out / "stages" / "conversion.json").read_text())
    path = out / "stages" / SAMPLES_FILE
    assert record["data"] == [*default_sources(), str(path)]
    assert record["teacher_samples"] == {"file": str(path), "samples": 1, "tokens": SAMPLE_LEN,
                                         "tokens_asked": SAMPLE_LEN}
    assert calls == [1] and len(records(out / "stages")) == 1
    assert convert(teacher_folder, out, cache, 6 * 192).finished and calls == [1]  # resumed: not sampled again

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    mine = tmp_path / "mine"
    assert convert(teacher_folder, mine, cache, 6 * 192, data=(str(corpus),)).finished
    record = json.loads((mine / "stages" / "conversion.json").read_text())
    assert record["data"] == [str(corpus)] and record["teacher_samples"] is None and calls == [1]
    assert not (mine / "stages" / SAMPLES_FILE).exists()


@pytest.mark.parametrize("make, extra, message", [
    (lambda p: p.write_text(""), [], "holds no text (the file is empty)"),
    (lambda p: p.write_text("  \n\n"), [], "holds no text (the file is empty)"),
    (lambda p: (p.mkdir(), (p / "notes.csv").write_text("a,b")), [], "has no .txt, .md, .jsonl, .parquet files"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text(""), (p / "b.md").write_text("")), [], "holds only empty files"),
    (lambda p: p.write_text("some text"), ["--teacher-samples", "100"], "is less than one sample"),
])
def test_data_without_text_and_a_budget_below_one_sample_exit_2_before_any_work(teacher_folder, tmp_path, capsys,
                                                                                  make, extra, message):
    data = tmp_path / "data.txt"
    make(data)
    out = tmp_path / "out"
    args = ["convert", str(teacher_folder), str(out), "--plan", "AKK", "--set", "kvm.chunk_len=8", "--data", str(data),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid convert: error:") and message in err and err.count("\n") == 1, err
    assert not out.exists()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
