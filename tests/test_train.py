"""Training (hybrid/training/, ``hybrid train``): parameter groups, the schedule, gradient accumulation,
a loss that falls, checkpoints that resume bitwise after a real SIGKILL (documents isolated or not),
the loss of isolated documents, NaN stops that keep the last good checkpoint, clear errors for corrupt
or mismatched checkpoints and bad settings."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
import torch.nn.functional as F
from torch import nn

from hybrid.cli.main import main
from hybrid.cli.train import parse_overrides
from hybrid.formats.checkpoint import load_checkpoint
from hybrid.formats.run_folder import step_folders
from hybrid.model.model import HybridLM
from hybrid.model.recipe import RecipeError, load_recipe, recipe_from_dict
from hybrid.training.config import TrainConfig, TrainError, config_from_recipe
from hybrid.training.loop import TrainingDiverged, accumulate_gradients, enable_activation_checkpointing, train
from hybrid.training.metrics import read_metrics
from hybrid.training.optimizer import build_optimizer, lr_at, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "layers": "GK",
               "mixers": {"gla": {"num_heads": 2}, "kvm": {"num_heads": 2, "chunk_len": 8, "state_min_len": 8}}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A repetitive English text (about 12 kB) that a small model learns quickly."""
    path = tmp_path_factory.mktemp("train_corpus") / "corpus.txt"
    lines = ["the quick brown fox jumps over the lazy dog.", "a stitch in time saves nine.",
             "all that glitters is not gold."]
    path.write_text("\n".join(lines[i % 3] for i in range(300)) + "\n")
    return path


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """A JSONL file of 400 short documents (16 to 60 bytes): a 64-token row packs several."""
    path = tmp_path_factory.mktemp("train_documents") / "documents.jsonl"
    words = ["fox", "dog", "stitch", "time", "gold", "glitters", "the", "a", "lazy", "quick", "nine", "saves"]
    lines = [json.dumps({"text": " ".join(words[(i * 7 + j * 5) % len(words)] for j in range(3 + i % 9)) + "."})
             for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return path


def settings(corpus: Path, out: Path, **changes) -> dict:
    """A train: section for short CPU runs on ``corpus``, written to ``out``."""
    base = {"data": [str(corpus)], "cache_dir": str(out.parent / "token_cache"), "seq_len": 32, "batch_size": 4,
            "max_steps": 24, "lr": 1e-2, "warmup_steps": 2, "val_fraction": 0.05, "val_every": 12, "val_batches": 2,
            "ckpt_every": 8, "keep_last": 2, "log_every": 1, "out_dir": str(out), "threads": 1}
    return {**base, **changes}


def small_recipe(corpus: Path, out: Path, model: dict | None = None, **changes):
    return recipe_from_dict({"model": model or SMALL_MODEL, "train": settings(corpus, out, **changes)})


def run(recipe, resume=True):
    return train(recipe, config_from_recipe(recipe), resume=resume, progress=False)


# ----------------------------------------------------------------------------- optimisation pieces

def test_parameter_groups_decay_only_linear_and_embedding_weights():
    """RWKV-7's 2-D r_k, Mamba-2's conv filters and A_log, norms, biases, token-shift mixes and KVM
    temperatures are not decayed; projection matrices and the (tied) embedding are."""
    for name in ("tiny/rwkv7_kvm", "tiny/mamba2_kvm"):
        model = HybridLM(load_recipe(name).model)
        decay, no_decay = parameter_groups(model)
        names = [n for n, _ in model.named_parameters()]
        assert sorted(decay + no_decay) == sorted(names) and not set(decay) & set(no_decay)
        modules = dict(model.named_modules())
        for n in decay:
            assert n.endswith(".weight") and isinstance(modules[n.rsplit(".", 1)[0]], (nn.Linear, nn.Embedding))
        assert "embed.weight" in decay
        assert any(n.endswith("mlp.up_proj.weight") for n in decay)
        expected_free = ["final_norm.weight", "blocks.3.mixer.window_temp", "blocks.3.mixer.state_temp"]
        expected_free += (["blocks.0.mixer.r_k", "blocks.0.mixer.x_r", "blocks.0.mlp.shift"] if "rwkv7" in name else
                          ["blocks.0.mixer.A_log", "blocks.0.mixer.conv1d.weight", "blocks.0.mixer.conv1d.bias"])
        assert set(expected_free) <= set(no_decay)
    optimizer, order = build_optimizer(model, TrainConfig(max_steps=1, weight_decay=0.05))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert order == decay + no_decay and optimizer.defaults["fused"] is False


def test_schedule_values_at_key_steps():
    cosine = TrainConfig(max_steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cosine) == pytest.approx(1e-4) and lr_at(9, cosine) == pytest.approx(1e-3)
    assert lr_at(10, cosine) == pytest.approx(1e-3)
    assert lr_at(10 + 99 / 2, cosine) == pytest.approx(0.55e-3)  # half-way through the decay: the mean
    assert lr_at(109, cosine) == pytest.approx(1e-4)  # the last step reaches lr * min_lr_ratio
    linear = TrainConfig(max_steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(10 + 99 / 4, linear) == pytest.approx(0.75e-3) and lr_at(109, linear) == 0.0
    constant = TrainConfig(max_tokens=5000, seq_len=10, batch_size=5, lr=2e-3, warmup_steps=0, schedule="constant")
    assert constant.total_steps == 100 and {lr_at(s, constant) for s in (0, 50, 99)} == {2e-3}


def test_grad_accumulation_equals_one_big_batch_and_checkpointing_changes_nothing():
    torch.manual_seed(0)
    recipe = recipe_from_dict({"model": SMALL_MODEL})
    tokens = torch.randint(0, 256, (8, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = []
    for accum, checkpointing in ((1, False), (4, False), (2, True)):
        torch.manual_seed(1)
        model = HybridLM(recipe.model).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        loss = accumulate_gradients(model, inputs, targets, accum)
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), *others = results
    assert loss == pytest.approx(math.log(256), rel=0.05)
    for other_loss, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- settings

def test_settings_are_strict_with_yaml_paths_and_overrides(corpus, tmp_path):
    recipe = small_recipe(corpus, tmp_path / "run")
    config = config_from_recipe(recipe, parse_overrides(["train.lr=3e-4", "train.betas=[0.8, 0.9]",
                                                         "train.max_steps=null", "train.max_tokens=4096"]))
    assert config.lr == 3e-4 and config.betas == (0.8, 0.9) and config.total_steps == 32
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown key\. Did you mean 'lr'\?"):
        config_from_recipe(recipe, parse_overrides(["train.lrr=1"]))
    with pytest.raises(RecipeError, match=r"train\.grad_accum: must divide batch_size \(4\), got 3"):
        config_from_recipe(recipe, {"grad_accum": 3})
    with pytest.raises(RecipeError, match="set exactly one of max_steps and max_tokens"):
        config_from_recipe(recipe, {"max_tokens": 100})
    with pytest.raises(RecipeError, match=r"train\.schedule: must be one of"):
        config_from_recipe(recipe, {"schedule": "cosin"})
    with pytest.raises(RecipeError, match=r"train\.seq_len: must be int, got 'long'"):
        config_from_recipe(recipe, {"seq_len": "long"})
    with pytest.raises(ValueError, match="only the train: section"):
        parse_overrides(["lr=1e-3"])


def test_document_isolation_is_a_strict_switch_for_text_data(corpus, tmp_path):
    recipe = small_recipe(corpus, tmp_path / "run")
    assert config_from_recipe(recipe, parse_overrides(["train.document_isolation=true"])).document_isolation
    with pytest.raises(RecipeError, match=r"train\.document_isolation: must be bool, got 'yes'"):
        config_from_recipe(recipe, {"document_isolation": "yes"})

    class Synthetic:
        def batch(self, step):
            return torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.long)

    isolated = small_recipe(corpus, tmp_path / "run", document_isolation=True, val_every=0)
    with pytest.raises(TrainError, match="train.document_isolation needs text data"):
        train(isolated, config_from_recipe(isolated), progress=False, batches=Synthetic())


def test_an_isolated_loss_is_the_mean_over_documents_alone_and_accumulates_like_one_batch():
    """Targets that begin a document take no loss (the data marks them -100); the rest are predicted
    from their own document only. Gradient accumulation splits the document starts with the rows and
    weighs each micro-batch by the targets it scores: the loss and gradients of one batch."""
    torch.manual_seed(0)
    recipe = recipe_from_dict({"model": SMALL_MODEL})
    tokens = torch.randint(0, 256, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    starts = torch.zeros(4, 16, dtype=torch.bool)
    starts[:, 0] = starts[0, 5] = starts[1, 9] = starts[1, 10] = starts[3, 15] = True
    targets[0, 4] = targets[1, 8] = targets[1, 9] = targets[3, 14] = -100  # before each later start
    losses, grads = [], []
    for accum in (1, 2, 4):
        torch.manual_seed(1)
        model = HybridLM(recipe.model).train()
        losses.append(accumulate_gradients(model, inputs, targets, accum, document_starts=starts))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)
    for name, grad in grads[0].items():
        for other in grads[1:]:
            torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.manual_seed(1)
    model = HybridLM(recipe.model)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(4):
            bounds = [*starts[row].nonzero().flatten().tolist(), 16]
            for begin, end in zip(bounds[:-1], bounds[1:]):
                logits = model(inputs[row:row + 1, begin:end]).logits[0]
                scored = targets[row, begin:end] != -100
                total += F.cross_entropy(logits[scored], targets[row, begin:end][scored], reduction="sum").item()
                count += int(scored.sum())
    assert count == 60 and losses[0] == pytest.approx(total / count, rel=1e-5)


def test_cli_user_errors_are_one_line_exit_2(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0 and "--set train.KEY=VALUE" in capsys.readouterr().out
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": settings(corpus, tmp_path / "run")}))
    assert main(["train", str(path), "--set", "train.warmup=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.warmup: unknown key. Did you mean 'warmup_steps'?" in err
    assert main(["train", str(path), "--set", "train.data=[missing.txt]"]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A completed 24-step run: (recipe, out_dir, summary)."""
    out = tmp_path_factory.mktemp("train_run") / "run"
    recipe = small_recipe(corpus, out)
    return recipe, out, run(recipe)


def test_loss_falls_and_outputs_are_written(finished):
    recipe, out, summary = finished
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 25))
    # a repetitive corpus: from ~ln(256) = 5.5 nats per byte to under 3.5
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 2, losses
    vals = [(r["step"], r["val_loss"], r["val_ppl"]) for r in records if "val_loss" in r]
    assert [s for s, _, _ in vals] == [12, 24] and vals[1][1] < vals[0][1]
    assert all(v[2] == pytest.approx(math.exp(v[1])) for v in vals)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["tokens"] == r["step"] * 128 for r in records)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary.step == 24 and summary.stopped == "completed" and summary.val_loss == vals[1][1]
    # keep_last 2 of the checkpoints at steps 8, 16, 24; latest names the newest; no temporary leftovers
    assert [p.name for p in step_folders(out)] == ["step_000016", "step_000024"]
    assert (out / "latest").read_text().strip() == "step_000024"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # the folder is an ordinary checkpoint: generate loads it; its recipe records the settings used
    saved_recipe, model, _ = load_checkpoint(out / "step_000024")
    assert saved_recipe.train["max_steps"] == 24 and saved_recipe.model == recipe.model
    info = json.loads((out / "step_000024" / "trainer.json").read_text())
    assert info["step"] == 24 and info["data_position"]["next_batch"] == 24
    tensors = load_file(out / "step_000024" / "trainer.safetensors")
    assert tensors["rng.torch"].dtype == torch.uint8
    assert tensors["optimizer.embed.weight.exp_avg"].shape == model.embed.weight.shape


def test_finished_run_is_not_trained_again_and_no_resume_refuses(finished):
    recipe, _, _ = finished
    assert run(recipe).stopped == "already_done"
    with pytest.raises(TrainError, match=r"already holds checkpoints \(up to step_000024\)"):
        run(recipe, resume=False)


def _kill_resume_recipe(corpus: Path, folder: Path, isolated: bool) -> Path:
    path = folder / "recipe.yaml"
    model = {**load_recipe("tiny/gla_kvm").to_dict()["model"]}
    path.write_text(yaml.safe_dump({"model": model, "train": settings(
        corpus, folder / "killed", seq_len=64, batch_size=8, max_steps=30, val_every=10, ckpt_every=4,
        keep_last=3, document_isolation=isolated)}))
    return path


@pytest.mark.parametrize("isolated", [False, True], ids=["packed", "documents isolated"])
def test_resume_after_sigkill_equals_an_uninterrupted_run_bitwise(corpus, documents, tmp_path, isolated):
    """A real `hybrid train` process is SIGKILLed after its step-4 checkpoint, once it has logged step 6;
    a second process resumes from the newest checkpoint (dropping the killed run's metrics lines past
    it); every loss, gradient norm and validation loss, and the final weights, equal those of an
    uninterrupted run of the same settings bit for bit. With document isolation too, on a corpus of
    short documents."""
    recipe_path = _kill_resume_recipe(documents if isolated else corpus, tmp_path, isolated)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "hybrid", "train", str(recipe_path), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ((killed / "step_000004").is_dir() and
               max((r["step"] for r in read_metrics(killed / "metrics.jsonl")), default=0) >= 6):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    reached = max(int(p.name[5:]) for p in step_folders(killed))
    assert 4 <= reached < 30, reached
    assert max(r["step"] for r in read_metrics(killed / "metrics.jsonl")) > reached  # lines the resume must drop

    resumed = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step 30/30; done; resumed from step {reached}" in resumed.stdout

    straight = tmp_path / "straight"
    recipe = load_recipe(recipe_path)
    summary = train(recipe, config_from_recipe(recipe, {"out_dir": str(straight)}), progress=False)
    assert summary.start_step == 0 and summary.step == 30

    def fields(out):
        records = read_metrics(out / "metrics.jsonl")
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("val_loss")) for r in records]

    assert fields(killed) == fields(straight)  # steps 1..30 once each; the killed run's extra lines are gone
    assert [r[0] for r in fields(killed)] == list(range(1, 31))
    final = [load_file(out / "step_000030" / "model.safetensors") for out in (killed, straight)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    """An absurd learning rate blows the weights up after one step: the run stops at step 2 with
    exit code 3, before step 2 is applied, and the step-1 checkpoint stays."""
    path = tmp_path / "r.yaml"
    out = tmp_path / "run"
    path.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": settings(
        corpus, out, lr=1e30, warmup_steps=0, grad_clip=None, ckpt_every=1, val_every=0)}))
    assert main(["train", str(path), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "step 2: the training loss is nan" in err and "step_000001" in err and "is kept" in err
    assert [p.name for p in step_folders(out)] == ["step_000001"]
    assert (out / "latest").read_text().strip() == "step_000001"
    assert (out / "loss.png").is_file()
    recipe = load_recipe(path)
    with pytest.raises(TrainingDiverged, match="step 2"):  # resuming with the same lr diverges the same way
        run(recipe)


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(finished, corpus, tmp_path):
    recipe, source, _ = finished
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copytree(source / "step_000024", out / "step_000024")
    longer = dict(recipe.train, out_dir=str(out), max_steps=28)

    other = recipe_from_dict({"model": {**SMALL_MODEL, "d_model": 48}, "train": longer})
    with pytest.raises(TrainError, match=r"holds another model.*model\.d_model 32 in the checkpoint, 48 now"):
        run(other)
    stream = recipe_from_dict({"model": SMALL_MODEL, "train": {**longer, "seq_len": 16}})
    with pytest.raises(TrainError, match=r"train\.seq_len: 32 in the checkpoint, 16 now"):
        run(stream)

    trainer = out / "step_000024" / "trainer.safetensors"
    trainer.write_bytes(trainer.read_bytes()[:1000])
    same = recipe_from_dict({"model": SMALL_MODEL, "train": longer})
    with pytest.raises(TrainError, match=r"trainer\.safetensors is not a readable safetensors trainer state file "
                                         r"\(corrupt or truncated\?\).*Delete .*step_000024"):
        run(same)
    (out / "step_000024" / "trainer.json").write_text("{not json")
    with pytest.raises(TrainError, match=r"trainer\.json is not readable \(corrupt\?\)"):
        run(same)


def test_time_limit_stops_with_a_checkpoint_and_the_next_run_continues(corpus, tmp_path):
    out = tmp_path / "run"
    limited = small_recipe(corpus, out, max_steps=6, ckpt_every=100, val_every=0, time_limit_s=1e-3)
    summary = run(limited)
    assert summary.stopped == "time_limit" and summary.step == 1
    assert [p.name for p in step_folders(out)] == ["step_000001"] and "time limit" in summary.describe()
    rest = run(small_recipe(corpus, out, max_steps=6, ckpt_every=100, val_every=0))
    assert (rest.start_step, rest.step, rest.stopped) == (1, 6, "completed")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("damage, message", [
    ("another step's weights", r"its model\.safetensors \(weights \w+\) is not the one its trainer state was saved "
                               r"with .*replaced by another step's"),
    ("an edited trainer.json", r"trainer\.json: its contents do not match the hash recorded in it"),
    ("a flipped byte in trainer.safetensors", r"trainer\.safetensors: its contents do not match the hash recorded"),
])
def test_a_step_folder_whose_files_were_swapped_or_edited_does_not_resume(finished, tmp_path, damage, message):
    """Each file of a step folder proves its bytes: trainer.json records the weights' content hash and
    its own, trainer.safetensors the hash of its tensors."""
    recipe, source, _ = finished
    out = tmp_path / "copy"
    for name in ("step_000016", "step_000024"):
        shutil.copytree(source / name, out / name)
    newest = out / "step_000024"
    if damage == "another step's weights":
        shutil.copyfile(out / "step_000016" / "model.safetensors", newest / "model.safetensors")
    elif damage == "an edited trainer.json":
        info = json.loads((newest / "trainer.json").read_text())
        info["scheduler"]["next_lr"] *= 2  # valid JSON, a changed number
        (newest / "trainer.json").write_text(json.dumps(info, indent=1))
    else:
        data = bytearray((newest / "trainer.safetensors").read_bytes())
        data[-5] ^= 0x20
        (newest / "trainer.safetensors").write_bytes(bytes(data))
    resumed = recipe_from_dict({"model": SMALL_MODEL, "train": dict(recipe.train, out_dir=str(out), max_steps=28)})
    with pytest.raises(TrainError, match=message):
        run(resumed)


# ----------------------------------------------------------------------------- TensorBoard

def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_the_metrics_once_across_a_resume(corpus, tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra")
    out = tmp_path / "run"
    run(small_recipe(corpus, out, max_steps=8, ckpt_every=4, val_every=4, tensorboard=True))
    run(small_recipe(corpus, out, max_steps=12, ckpt_every=4, val_every=4, tensorboard=True))  # resumed at 8
    scalars = _tensorboard_scalars(out / "tensorboard")
    records = read_metrics(out / "metrics.jsonl")
    assert [step for step, _ in scalars["loss"]] == list(range(1, 13))
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [step for step, _ in scalars["val_loss"]] == [4, 8, 12]
    assert {"lr", "grad_norm", "tokens_per_s", "val_ppl"} <= set(scalars)


def test_the_tensorboard_switch_without_tensorboard_is_one_clear_error(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": settings(corpus, tmp_path / "run")}))
    assert main(["train", str(path), "--tensorboard", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "needs the tensorboard package: pip install 'kvm-hybrid[tensorboard]'" in err
    assert not step_folders(tmp_path / "run")
    assert main(["train", str(path), "--no-progress"]) == 0  # off by default: no tensorboard needed
    assert not (tmp_path / "run" / "tensorboard").exists()
