"""The long-context recall task and experiment (hybrid/evaluation/recall.py, recipes/recall/): sequences are a
seeded pure function, the layout and the targets are as designed (one pair per segment, repeats of
earlier pairs, final queries of distinct pairs, targets only at answers), the pairs grow with the
length until they overflow a fixed memory, the needle sits at its depth, the recipes are of equal
size, and the script trains, evaluates and aggregates over seeds (a few steps)."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blocks.config import ConfigError
from blocks.kvm import slots_after
from hybrid.evaluation.recall import (
    IGNORE,
    MODELS,
    RECALL_RECIPES,
    Evaluation,
    RecallBatches,
    RecallTask,
    RunResult,
    evaluate_length,
    main,
    recall_table,
    run_all,
    run_model,
    state_bytes,
    summarize,
)
from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe
from hybrid.training.config import TrainError, config_from_recipe
from hybrid.training.loop import accumulate_gradients, train

TASK = RecallTask(tokens_per_pair=6, repeat_share=0.5, n_queries=3, n_keys=40, n_values=12, n_filler=5)


def regions(task: RecallTask):
    keys = range(task.first_key, task.first_value)
    values = range(task.first_value, task.first_filler)
    filler = range(task.first_filler, task.vocab_size)
    return keys, values, filler


def test_sequences_are_a_pure_function_of_seed_stream_and_index():
    a = TASK.sample(6, 80, seed=3, stream=0, index=5)
    b = TASK.sample(6, 80, seed=3, stream=0, index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (TASK.sample(6, 80, 4, 0, 5), TASK.sample(6, 80, 3, 1, 5), TASK.sample(6, 80, 3, 0, 6)):
        assert not torch.equal(a[0], other[0])
    batches = RecallBatches(TASK, seq_len=80, batch_size=6, seed=3)
    assert torch.equal(batches.batch(5)[0], a[0]) and torch.equal(batches.batch(5)[1], a[1])
    assert a[0].shape == a[1].shape == (6, 80) and a[0].dtype == a[1].dtype == torch.int64
    needle = TASK.needle(2, 80, 0.5, seed=3, stream=-80, index=0)
    assert torch.equal(needle[0], TASK.needle(2, 80, 0.5, 3, -80, 0)[0])
    assert not torch.equal(needle[0], TASK.needle(2, 80, 0.5, 3, -80, 1)[0])


@pytest.mark.parametrize("length", [80, 81, 200])
def test_layout_pairs_repeats_queries_and_targets(length):
    inputs, targets = TASK.sample(16, length, seed=0, stream=0, index=0)
    unscored = TASK.sample(16, length, seed=0, stream=0, index=0, repeats_scored=False)[1]
    keys, values, filler = regions(TASK)
    segments, span, queries = TASK.n_segments(length), TASK.tokens_per_pair, TASK.query_positions(length)
    assert list(queries) == list(range(length - 6, length, 2))
    for seq, tgt, final in zip(inputs.tolist(), targets.tolist(), unscored.tolist()):
        assert seq[0] == TASK.BOS and seq[queries[0] - 1] == TASK.QUERY
        pairs, answers = {}, {}
        for s in range(segments):  # each segment: filler around exactly one key, its value right after
            part = seq[1 + s * span:1 + (s + 1) * span]
            at = [i for i, token in enumerate(part) if token in keys]
            assert len(at) == 1 and at[0] < span - 1 and part[at[0] + 1] in values, part
            assert all(token in filler for i, token in enumerate(part) if i not in (at[0], at[0] + 1))
            key, value, position = part[at[0]], part[at[0] + 1], 1 + s * span + at[0]
            if key in pairs:  # a repeat: the same value as the first time, the one scored answer
                assert pairs[key] == value
                answers[position] = value
            else:
                pairs[key] = value
        assert all(token in filler for token in seq[1 + segments * span:queries[0] - 1])  # the ragged tail
        assert len(pairs) == TASK.n_pairs(length) and len(answers) == TASK.n_repeats(length)
        asked = [seq[p] for p in queries]
        assert len(set(asked)) == len(asked) and all(seq[p + 1] == pairs[seq[p]] for p in queries)
        answers.update({p: seq[p + 1] for p in queries})
        assert {t: v for t, v in enumerate(tgt) if v != IGNORE} == answers  # targets only at answers
        assert {t: v for t, v in enumerate(final) if v != IGNORE} == {p: seq[p + 1] for p in queries}


def test_pairs_grow_with_the_length_and_overflow_the_fixed_memory():
    task = RecallTask()
    config = config_from_recipe(load_recipe(RECALL_RECIPES / "kvm_fixed.yaml"))
    kvm = load_recipe(RECALL_RECIPES / "kvm_fixed.yaml").model.layers[0].options
    lengths = [config.seq_len * m for m in (1, 2, 4, 8, 16)]
    pairs = [task.n_pairs(n) for n in lengths]
    assert all(b >= 2 * a - 1 for a, b in zip(pairs, pairs[1:]))  # twice the length, (nearly) twice the pairs
    slots = slots_after(lengths[0], kvm)
    assert pairs[0] <= slots // 2  # at the training length the fixed memory has room
    assert pairs[-1] >= 2 * slots  # at 16 times it, the pairs outnumber its slots
    assert task.max_length >= lengths[-1] and task.min_length <= lengths[0]
    with pytest.raises(ConfigError, match="length"):
        task.sample(1, task.min_length - 1, seed=0, stream=0, index=0)
    with pytest.raises(ConfigError, match="length"):
        task.sample(1, task.max_length + 1, seed=0, stream=0, index=0)
    with pytest.raises(ConfigError, match="repeat_share"):
        RecallTask(repeat_share=1.0)


@pytest.mark.parametrize("depth, position", [(0.0, 1), (0.5, 1 + 37), (1.0, 75)])
def test_the_needle_sits_at_its_depth_in_filler(depth, position):
    length = 80
    inputs, targets = TASK.needle(4, length, depth, seed=0, stream=-length, index=0)
    keys, values, filler = regions(TASK)
    for seq, tgt in zip(inputs.tolist(), targets.tolist()):
        assert seq[position] in keys and seq[position + 1] in values
        assert seq[-3:] == [TASK.QUERY, seq[position], seq[position + 1]]
        body = seq[1:position] + seq[position + 2:length - 3]
        assert seq[0] == TASK.BOS and all(token in filler for token in body)
        assert {t: v for t, v in enumerate(tgt) if v != IGNORE} == {length - 2: seq[position + 1]}


def test_training_loss_is_the_mean_over_the_answers_only():
    torch.manual_seed(0)
    model = HybridLM(load_recipe(RECALL_RECIPES / "kvm_sqrt.yaml").model)
    inputs, targets = TASK.sample(4, 64, seed=0, stream=0, index=0)
    loss = accumulate_gradients(model, inputs, targets, grad_accum=2)
    with torch.no_grad():
        logits = model(inputs).logits
    scored = targets != IGNORE
    expected = F.cross_entropy(logits[scored], targets[scored])
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_recipes_are_equal_in_size_and_their_windows_shorter_than_training():
    counts = {}
    for name in MODELS:
        recipe = load_recipe(RECALL_RECIPES / f"{name}.yaml")
        config = config_from_recipe(recipe)
        assert recipe.model.vocab_size >= RecallTask().vocab_size
        assert config.val_every == 0 and config.threads == 1
        for layer in recipe.model.layers:
            if layer.mixer in ("kvm", "bswa"):
                assert layer.options.chunk_len * layer.options.n_bswa_chunks == 32 < config.seq_len
        counts[name] = HybridLM(recipe.model).num_parameters()
    assert max(counts.values()) / min(counts.values()) < 1.01, counts


def test_synthetic_batches_refuse_text_validation(tmp_path):
    recipe = load_recipe(RECALL_RECIPES / "gla.yaml")
    config = config_from_recipe(recipe, {"val_every": 10, "max_steps": 1, "out_dir": str(tmp_path)})
    with pytest.raises(TrainError, match="val_every"):
        train(recipe, config, progress=False, batches=RecallBatches(RecallTask(), 256, 16, 0))


SMALL = {"seq_len": 64, "batch_size": 4, "threads": 1}


def test_run_model_trains_evaluates_and_reuses_a_finished_run(tmp_path):
    evaluation = Evaluation([64, 256], sequences=4, needle_lengths=[128], depths=[0.0, 1.0], needles_per_depth=2)
    result = run_model("kvm_sqrt", TASK, evaluation, tmp_path, seed=1, steps=3, overrides=SMALL)
    assert result.steps == 3 and result.seed == 1 and result.name == "kvm_sqrt"
    assert (tmp_path / "kvm_sqrt" / "seed_1" / "step_000003" / "model.safetensors").is_file()
    assert set(result.recall) == {64, 256} and all(0.0 <= a <= 1.0 for a in result.recall.values())
    assert set(result.needle) == {128} and set(result.needle[128]) == {0.0, 1.0}
    assert result.final_loss is not None and np.isfinite(result.final_loss)
    assert set(result.state_bytes) == {64, 128, 256}
    assert result.state_bytes[256] > result.state_bytes[64]  # the memory grows with the context
    again = run_model("kvm_sqrt", TASK, evaluation, tmp_path, seed=1, steps=3, overrides=SMALL)
    assert again.train_s == 0.0 and again.recall == result.recall and again.needle == result.needle


def test_fixed_state_models_hold_the_same_state_at_every_length():
    torch.manual_seed(0)
    model = HybridLM(load_recipe(RECALL_RECIPES / "gla.yaml").model)
    evaluation = Evaluation([64, 512], sequences=2, batch_size=2)
    accuracy = evaluate_length(model, TASK, 64, n_sequences=3, batch_size=2, seed=0)
    assert 0.0 <= accuracy <= 1.0
    assert state_bytes(model, evaluation.lengths[0]) == state_bytes(model, evaluation.lengths[1]) > 0


def result(name: str, seed: int, recall: dict, needle: dict, loss: float | None = 1.0) -> RunResult:
    return RunResult(name, seed, 100, 10, 1.0, loss, recall, needle, {n: 1024 * n for n in (*recall, *needle)})


def test_summaries_average_each_model_over_its_seeds():
    results = [result("kvm_fixed", 0, {256: 0.5, 512: 0.2}, {1024: {0.0: 1.0, 1.0: 0.5}}),
               result("kvm_fixed", 1, {256: 0.7, 512: 0.4}, {1024: {0.0: 0.5, 1.0: 0.5}}, loss=3.0),
               result("gla", 0, {256: 0.1, 512: 0.1}, {1024: {0.0: 0.0, 1.0: 0.0}}, loss=None)]
    fixed, gla = summarize(results)
    assert fixed.name == "kvm_fixed" and fixed.seeds == [0, 1] and gla.seeds == [0]
    assert fixed.recall[256].mean == pytest.approx(0.6) and fixed.recall[256].sd == pytest.approx(math.sqrt(0.02))
    assert fixed.needle[1024].mean == pytest.approx(0.625)  # seed 0: 0.75 over depths, seed 1: 0.5
    assert fixed.final_loss.mean == pytest.approx(2.0) and gla.final_loss is None
    assert gla.recall[512].sd == 0.0  # one seed: no spread
    table = recall_table([fixed, gla], train_len=256)
    assert "| KVM fixed 32 (`kvm_fixed`) | 100 | 2 | 10 | 2.000 | 60.0 ± 14.1 | 30.0 ± 14.1 |" in table
    assert "256 (train)" in table


def test_script_runs_seeds_in_parallel_and_writes_tables_csv_and_plot(tmp_path, capsys):
    args = ["--models", "bswa", "--seeds", "0", "1", "--steps", "2", "--lengths", "200", "300",
            "--needle-lengths", "128", "--needles", "1", "--eval-sequences", "2", "--jobs", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| BSWA (window 17-32) (`bswa`) | 151,424 | 2 | 2 |" in text and "| 200 | 300 |" in text
    assert "Needle accuracy" in text and "KiB" in text
    assert text in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert len(rows) == 2 * (2 + 5)  # seeds x (recall lengths + needle depths)
    assert {(r["seed"], r["test"], r["length"]) for r in rows} == {
        (s, t, n) for s in ("0", "1") for t, n in (("recall", "200"), ("recall", "300"), ("needle", "128"))}
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"


def test_run_all_in_one_process_keeps_the_grid_order(tmp_path):
    evaluation = Evaluation([64], sequences=2)
    lines = []
    results = run_all(["kvm_fixed", "bswa"], [1, 0], TASK, evaluation, tmp_path, steps=1, jobs=1, log=lines.append,
                      overrides=SMALL)
    assert [(r.name, r.seed) for r in results] == [("kvm_fixed", 1), ("kvm_fixed", 0), ("bswa", 1), ("bswa", 0)]
    assert len(lines) == 4 and lines[0].startswith("kvm_fixed seed 1: 1 steps")


def test_script_refuses_an_out_folder_of_another_task(tmp_path):
    (tmp_path / "task.json").write_text('{"task": {"n_queries": 3}}\n')
    with pytest.raises(SystemExit, match="another task"):
        main(["--models", "bswa", "--out", str(tmp_path)])
