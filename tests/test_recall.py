"""The long-context recall task and experiment (hybrid/evaluation/recall.py, recipes/recall/): sequences are a
seeded pure function, the layout and masking are right and every answer is its pair's value, lengths
only stretch the filler, the six recipes are of equal size with windows shorter than the training
length, and the script's code path trains, evaluates and reports (a few steps)."""

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blocks.config import ConfigError
from hybrid.evaluation.recall import (
    IGNORE,
    MODELS,
    RECALL_RECIPES,
    RecallBatches,
    RecallTask,
    evaluate_length,
    main,
    run_model,
)
from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe
from hybrid.training.config import TrainError, config_from_recipe
from hybrid.training.loop import accumulate_gradients, train

TASK = RecallTask(n_pairs=4, n_queries=3, n_keys=10, n_values=12, n_filler=5)


def regions(task: RecallTask):
    keys = range(task.first_key, task.first_value)
    values = range(task.first_value, task.first_filler)
    filler = range(task.first_filler, task.vocab_size)
    return keys, values, filler


def test_sequences_are_a_pure_function_of_seed_stream_and_index():
    a = TASK.sample(6, 40, seed=3, stream=0, index=5)
    b = TASK.sample(6, 40, seed=3, stream=0, index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (TASK.sample(6, 40, 4, 0, 5), TASK.sample(6, 40, 3, 1, 5), TASK.sample(6, 40, 3, 0, 6)):
        assert not torch.equal(a[0], other[0])
    batches = RecallBatches(TASK, seq_len=40, batch_size=6, seed=3)
    assert torch.equal(batches.batch(5)[0], a[0])
    assert batches.batch(5)[0].shape == (6, 40) and batches.batch(5)[0].dtype == torch.int64


def test_layout_masking_and_every_answer_is_its_pairs_value():
    length = 50
    inputs, targets = TASK.sample(32, length, seed=0, stream=0, index=0)
    keys, values, filler = regions(TASK)
    positions = TASK.query_positions(length)
    assert list(positions) == [44, 46, 48]
    scored = (targets != IGNORE).nonzero()[:, 1].reshape(32, -1)
    assert (scored == torch.tensor(positions)).all()  # loss only on the answers
    for seq, tgt in zip(inputs.tolist(), targets.tolist()):
        assert seq[0] == TASK.BOS and seq[positions[0] - 1] == TASK.QUERY
        pair_keys, pair_values = seq[1:9:2], seq[2:9:2]
        assert all(k in keys for k in pair_keys) and len(set(pair_keys)) == 4
        assert all(v in values for v in pair_values)
        assert all(f in filler for f in seq[9:positions[0] - 1])
        paired = dict(zip(pair_keys, pair_values))
        asked = [seq[p] for p in positions]
        assert len(set(asked)) == 3 and set(asked) <= set(pair_keys)  # distinct queries of real pairs
        for p in positions:
            assert tgt[p] == paired[seq[p]] == seq[p + 1]


def test_longer_sequences_only_stretch_the_filler():
    task = RecallTask()
    assert task.vocab_size == 2 + 64 * 3 and task.min_length == 34
    for length in (64, 256, 2048):
        inputs, _ = task.sample(2, length, seed=1, stream=length, index=0)
        assert inputs.shape == (2, length)
        assert task.filler_length(length) == length - 34
        filler = inputs[:, 17:length - 17]
        assert ((filler >= task.first_filler) & (filler < task.vocab_size)).all()
    with pytest.raises(ConfigError, match="length"):
        task.sample(1, 33, seed=0, stream=0, index=0)
    with pytest.raises(ConfigError, match="n_queries"):
        RecallTask(n_pairs=2, n_queries=3)


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


def test_run_model_trains_evaluates_and_reuses_a_finished_run(tmp_path):
    task = RecallTask(n_pairs=2, n_queries=2)
    small = {"seq_len": 64, "batch_size": 4, "threads": 1}
    result = run_model("kvm_sqrt", task, [64, 256], tmp_path, steps=3, eval_sequences=4, overrides=small)
    assert result.steps == 3 and result.params == 135_176
    assert (tmp_path / "kvm_sqrt" / "step_000003" / "model.safetensors").is_file()
    assert all(0.0 <= a <= 1.0 for a in result.accuracy.values())
    assert result.final_loss is not None and np.isfinite(result.final_loss)
    assert result.state_kib[256] > result.state_kib[64]  # the memory grows with the context
    again = run_model("kvm_sqrt", task, [64, 256], tmp_path, steps=3, eval_sequences=4, overrides=small)
    assert again.train_s == 0.0 and again.accuracy == result.accuracy


def test_fixed_state_models_hold_the_same_state_at_every_length():
    torch.manual_seed(0)
    model = HybridLM(load_recipe(RECALL_RECIPES / "gla.yaml").model)
    short = evaluate_length(model, RecallTask(), 64, n_sequences=2, batch_size=2, seed=0)
    long = evaluate_length(model, RecallTask(), 512, n_sequences=2, batch_size=2, seed=0)
    assert short[1] == long[1] > 0


def test_script_writes_the_table_csv_and_plot(tmp_path, capsys):
    assert main(["--models", "bswa", "kvm_fixed", "--steps", "2", "--lengths", "256", "512",
                 "--eval-sequences", "2", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| BSWA (window 17-32) (`bswa`) | 134,784 | 2 |" in table and "acc@256 (train)" in table
    assert table in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["model"], r["length"]) for r in rows] == [("bswa", "256"), ("bswa", "512"),
                                                         ("kvm_fixed", "256"), ("kvm_fixed", "512")]
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"


def test_script_refuses_an_out_folder_of_another_task(tmp_path):
    (tmp_path / "task.json").write_text('{"task": {"n_pairs": 3}, "seed": 0}\n')
    with pytest.raises(SystemExit, match="another task"):
        main(["--models", "bswa", "--pairs", "4", "--out", str(tmp_path)])
