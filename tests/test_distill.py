"""convert/distill.py and ``hybrid convert``: stage 1 aligns only the converted layers, stage 2 lowers the
KL, stage 3 fine-tunes with cross-entropy at its own length, stages resume exactly, the command writes a
checkpoint that generate and train load, and the report; clear errors for bad plans, missing teachers
and budgets below one batch."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convert.distill import (
    PARAMETER_LR,
    STAGE_DEFAULTS,
    ConversionSettings,
    run_conversion,
    run_stage,
    stage_config,
    trainable_parameters,
)
from convert.init import convert_teacher, new_parameter_names
from convert.losses import alignment_losses, mean_kl
from convert.samples import OPENINGS
from convert.teacher import load_teacher
from hybrid.cli.convert import parse_set_options
from hybrid.cli.main import main
from hybrid.cli.options import UsageError
from hybrid.formats.checkpoint import load_checkpoint, save_checkpoint
from hybrid.formats.run_folder import TRAINER_JSON
from hybrid.training import data as datalib
from hybrid.training.loop import train
from hybrid.training.metrics import read_metrics
from tests.test_convert import TINY, random_teacher_tensors, write_hf_folder

KVM = {"kvm": {"chunk_len": 8, "n_bswa_chunks": 2}}  # a 16-token window
BYTES = {**TINY, "vocab_size": 256}  # a tiny random Llama whose vocabulary is the byte tokenizer's


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 16 kB of varied English-like text (byte tokens) for the tiny teacher."""
    words = ["the", "king", "and", "queen", "walk", "to", "a", "castle", "while", "fool", "sings", "of", "gold",
             "rain", "time;", "every", "night", "sea", "keeps", "its", "silver", "secrets", "from", "sleeping"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path_factory.mktemp("distill_corpus") / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("teacher"), BYTES, random_teacher_tensors(BYTES))


def start(teacher_folder: Path, tmp_path: Path, plan: str):
    """(teacher, plan, converted-at-init checkpoint folder)."""
    student, teacher, layer_plan = convert_teacher(load_teacher(teacher_folder), plan, KVM)
    init = save_checkpoint(tmp_path / "init", layer_plan.student, student)
    return teacher, layer_plan, init


def config(stage: str, tokens: int, corpus: Path, tmp_path: Path, init: Path, out: str, **overrides):
    common = {"data": [str(corpus)], "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / out),
              "init_from": str(init), "threads": 1, "device": "cpu"}
    return stage_config(stage, tokens, common, {"seq_len": 48, "batch_size": 4, **overrides})


def batch(corpus: Path, n: int = 4, length: int = 48) -> torch.Tensor:
    """The corpus's last ``n * length`` bytes as token rows (its validation split)."""
    return torch.tensor(list(corpus.read_bytes()[-n * length:])).view(n, length)


@pytest.mark.parametrize("params, lr", [("mixers", 3e-3), ("memory", None)])
def test_stage1_lowers_each_layers_alignment_loss_and_changes_only_its_parameters(teacher_folder, corpus, tmp_path,
                                                                                   params, lr):
    teacher, plan, init = start(teacher_folder, tmp_path, "AKK")
    _, before, _ = load_checkpoint(init)
    new = new_parameter_names(before, plan)
    assert set(new) == {f"blocks.{i}.mixer.{n}" for i in (1, 2)
                        for n in ("merge_gate_proj.weight", "window_temp", "state_temp", "state_offset")}
    x = batch(corpus)
    loss_before = alignment_losses(teacher.model, before, x, plan.converted)
    assert set(loss_before) == {1, 2} and min(loss_before.values()) > 1e-3
    cfg = config("stage1", 30 * 4 * 48, corpus, tmp_path, init, "s1", **({} if lr is None else {"lr": lr}))
    assert cfg.lr == (lr or PARAMETER_LR["memory"])
    summary = run_stage("stage1", plan.student, teacher.model, plan.converted, cfg, progress=False,
                        trainable=trainable_parameters("stage1", params, plan.converted, new))
    assert summary.step == 30 and summary.stopped == "completed"
    _, after, _ = load_checkpoint(summary.checkpoint)
    loss_after = alignment_losses(teacher.model, after, x, plan.converted)
    # the objective, the layers' mean alignment loss, is lower on held-out rows (the later layer's own
    # loss may rise at first: its inputs come from the earlier converted layer, which changes too)
    assert sum(loss_after.values()) < sum(loss_before.values()), (loss_before, loss_after)
    assert loss_after[1] < loss_before[1], (loss_before, loss_after)
    old, new_state = before.state_dict(), after.state_dict()
    changed = {name for name in old if not torch.equal(old[name], new_state[name])}
    allowed = ("blocks.1.mixer.", "blocks.2.mixer.") if params == "mixers" else tuple(new)
    assert changed and all(name.startswith(allowed) for name in changed)
    assert any(name.startswith("blocks.1.mixer.") for name in changed)
    losses = [r["loss"] for r in read_metrics(tmp_path / "s1" / "metrics.jsonl")]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])


def test_stage2_lowers_the_kl_to_the_teacher(teacher_folder, corpus, tmp_path):
    teacher, plan, init = start(teacher_folder, tmp_path, "KKK")
    _, before, _ = load_checkpoint(init)
    x = batch(corpus)
    kl_before = mean_kl(teacher.model, before, x)
    cfg = config("stage2", 25 * 4 * 48, corpus, tmp_path, init, "s2", lr=1e-3)
    summary = run_stage("stage2", plan.student, teacher.model, plan.converted, cfg, temperature=2.0, progress=False,
                        trainable=trainable_parameters("stage2", "all", plan.converted, ()))
    _, after, _ = load_checkpoint(summary.checkpoint)
    kl_after = mean_kl(teacher.model, after, x)
    assert kl_before > 0.05 and kl_after < 0.95 * kl_before, (kl_before, kl_after)


def test_an_interrupted_or_extended_stage_resumes_to_the_uninterrupted_result(teacher_folder, corpus, tmp_path):
    """Stage 1 stopped after one step (time limit) and re-run equals a straight run, bitwise; stage 2
    (constant lr) run to 4 steps and then given a budget of 8 equals a straight run to 8."""
    teacher, plan, init = start(teacher_folder, tmp_path, "AKK")

    def stage(name, out, steps, **extra):
        cfg = config(name, steps * 4 * 48, corpus, tmp_path, init, out, ckpt_every=2, warmup_steps=1, **extra)
        return run_stage(name, plan.student, teacher.model, plan.converted, cfg, progress=False)

    assert stage("stage1", "cut", 6, time_limit_s=1e-9).step == 1
    resumed = stage("stage1", "cut", 6)
    straight = stage("stage1", "straight", 6)
    assert (resumed.start_step, resumed.step, straight.step) == (1, 6, 6)
    weights = [load_checkpoint(s.checkpoint)[1].state_dict() for s in (resumed, straight)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == \
           [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]

    assert stage("stage2", "short", 4).step == 4
    extended, long = stage("stage2", "short", 8), stage("stage2", "long", 8)
    assert extended.start_step == 4
    weights = [load_checkpoint(s.checkpoint)[1].state_dict() for s in (extended, long)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_stage3_fine_tunes_with_cross_entropy_at_its_seq_len_and_resumes(teacher_folder, corpus, tmp_path):
    """Stage 3 starts from stage 2's final weights and minimises the next-token cross-entropy on
    sequences of its own length (96, twice stages 1-2's) with its own defaults (lr, cosine schedule);
    stopped after one step and run again it equals a straight run, and its final weights are the
    exported model."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    budgets = {"stage1": 192, "stage2": 192, "stage3": 4 * 2 * 96}  # one step each for stages 1-2, four for 3
    stages = {"stage1": {"seq_len": 48, "batch_size": 4}, "stage2": {"seq_len": 48, "batch_size": 4},
              "stage3": {"seq_len": 96, "batch_size": 2}}

    def convert(stage3_overrides: dict):
        settings = ConversionSettings(
            str(teacher_folder), str(out), "AKK", mixers=KVM, budgets=budgets,
            stage_overrides={**stages, "stage3": {**stages["stage3"], **stage3_overrides}}, data=(str(corpus),),
            threads=1, device="cpu", cache_dir=str(cache))
        return run_conversion(settings, progress=False)

    cut = convert({"time_limit_s": 1e-9})  # stage 3 stops after its first step: nothing exported yet
    assert not cut.finished and (cut.stages["stage3"].step, cut.stages["stage3"].stopped) == (1, "time_limit")
    assert not (out / "model.safetensors").exists()
    done = convert({})
    assert done.finished and [done.stages[s].stopped for s in ("stage1", "stage2")] == ["already_done"] * 2
    s3 = done.stages["stage3"]
    assert (s3.start_step, s3.step, s3.stopped) == (1, 4, "completed")

    stage2_final = done.stages["stage2"].checkpoint
    settings = json.loads((s3.checkpoint / TRAINER_JSON).read_text())["config"]
    assert (settings["seq_len"], settings["batch_size"], settings["init_from"]) == (96, 2, str(stage2_final))
    assert all(settings[key] == value for key, value in STAGE_DEFAULTS["stage3"].items() if key not in stages["stage3"])

    # the first logged loss is the cross-entropy of stage 2's final model on stage 3's first batch
    recipe, start, tokenizer = load_checkpoint(stage2_final)
    tokens = datalib.build_token_cache([str(corpus)], tokenizer, cache, progress=False)
    train_tokens, _ = datalib.split_train_val(tokens, settings["val_fraction"], 96)
    x, y = datalib.PackedBatches(train_tokens, 96, 2, settings["seed"]).batch(0)
    with torch.no_grad():
        first_loss = F.cross_entropy(start(x).logits.flatten(0, 1), y.flatten()).item()
    losses = [r["loss"] for r in read_metrics(out / "stages" / "stage3" / "metrics.jsonl")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - first_loss) < 1e-5, (losses[0], first_loss)

    straight = train(recipe, config("stage3", budgets["stage3"], corpus, tmp_path, stage2_final, "straight",
                                    **stages["stage3"]), progress=False)  # stage 3 is a plain next-token run
    exported_recipe, exported, _ = load_checkpoint(out)
    weights = [m.state_dict() for m in (exported, load_checkpoint(s3.checkpoint)[1],
                                        load_checkpoint(straight.checkpoint)[1])]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    assert not all(torch.equal(weights[0][k], v) for k, v in start.state_dict().items())
    assert exported_recipe.train["seq_len"] == 96  # the exported recipe fine-tunes at stage 3's settings


def test_hybrid_convert_end_to_end_then_generate_train_and_report(teacher_folder, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", str(teacher_folder), str(out), "--plan", "AKK", "--set", "kvm.chunk_len=8",
            "--set", "stage1.seq_len=48", "--set", "stage1.batch_size=4", "--set", "stage2.seq_len=48",
            "--set", "stage2.batch_size=4", "--set", "stage2.lr=1e-3", "--set", "stage2.ckpt_every=2",
            "--stage1-tokens", "768",
            "--stage2-tokens", "768", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--teacher-samples", "512", "--threads", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    recipe, model, _ = load_checkpoint(out)
    assert [layer.mixer for layer in recipe.model.layers] == ["attention", "kvm", "kvm"]
    assert recipe.model.layers[1].options.chunk_len == 8
    _, stage2, _ = load_checkpoint(out / "stages" / "stage2" / "step_000004")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), stage2.state_dict().values()))
    record = json.loads((out / "stages" / "conversion.json").read_text())
    assert record["converted"] == [1, 2] and record["window"] == 16
    samples = out / "stages" / "teacher_samples.jsonl"  # one sample of 512 tokens (no EOS in the byte tokenizer)
    assert record["data"] == [str(corpus), str(samples)]
    assert record["teacher_samples"] == {"file": str(samples), "samples": 1, "tokens": 512, "tokens_asked": 512}
    texts = [json.loads(line)["text"] for line in samples.read_text().splitlines()]
    assert len(texts) == 1 and texts[0].startswith(OPENINGS[0]) and len(texts[0]) > 300

    assert main(args) == 0  # a finished conversion is not trained again
    assert "already trained to the last step" in capsys.readouterr().out

    assert main(["generate", str(out), "--prompt", "the king", "--max-new-tokens", "8", "--seed", "1"]) == 0
    capsys.readouterr()

    ft = tmp_path / "ft"  # the recipe's train: section fine-tunes the converted weights (init_from)
    assert main(["train", str(out / "recipe.yaml"), "--out", str(ft), "--no-progress", "--set", "train.max_tokens=192",
                 "--set", "train.lr=1e-12", "--set", "train.warmup_steps=0", "--set", "train.threads=1",
                 "--set", f"train.cache_dir={tmp_path / 'cache'}", "--set", "train.seq_len=48",
                 "--set", "train.batch_size=4"]) == 0
    _, tuned, _ = load_checkpoint(ft / "step_000001")
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(model.state_dict().values(), tuned.state_dict().values()))

    assert main(["convert-report", str(out), "--eval-tokens", "2k", "--segment-len", "256", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| teacher |" in text and "| after stage2 |" in text and "| 4,096 |" in text
    report = json.loads((out / "report.json").read_text())
    equal = report["equal_state_window"]
    names = [row["model"] for row in report["models"]]
    assert names == ["teacher", "4 sinks + 16-token window (own window)", f"4 sinks + {equal}-token window (equal state)",
                     "converted at init", "after stage1", "stage2 at 384 tokens", "after stage2"]
    assert [(r["stage"], r["tokens_trained"], r["steps"]) for r in report["models"][-2:]] == [("stage2", 384, 2),
                                                                                             ("stage2", 768, 4)]
    assert [d["name"] for d in report["domains"]] == ["play", "licence", "release notes", "technical docs"]
    assert all(d["scored_predictions"] == 8 * (256 - 1 - 16) for d in report["domains"])
    teacher, own = report["models"][0], report["models"][1]
    assert set(teacher["top1_agreement"].values()) == {1.0} and own["window"] == 16
    final = report["models"][-1]
    beats = [d for d in own["perplexity"] if final["perplexity"][d] < own["perplexity"][d]]
    assert report["verdict"]["own window"] == {"window": 16, "beats_on": beats, "every_domain": len(beats) == 4}
    assert ("does not beat" if len(beats) < 4 else "beats") + " 4 sinks + 16-token window" in text
    assert len(report["facts"]) == 10 and report["facts_agree"] == sum(f["agree"] for f in report["facts"])
    assert f"{report['facts_agree']}/10 keep the teacher's first 8 greedy tokens" in text
    state = {row["context"]: row for row in report["state"]}
    assert set(state[4096]["teacher"]) == {"kv"} and state[4096]["ratio"] < state[1024]["ratio"] < 1


@pytest.mark.parametrize("extra, message", [
    (["--plan", "AAA"], "the plan AAA keeps every teacher layer: nothing to convert"),
    (["--plan", "SSS", "--set", "swa.window=8"], "stage1.params=memory: the plan's converted layers have no parameters"),
])
def test_a_plan_with_nothing_to_convert_or_train_is_refused(teacher_folder, corpus, tmp_path, capsys, extra, message):
    args = ["convert", str(teacher_folder), str(tmp_path / "out"), "--data", str(corpus), "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--set", "stage1.seq_len=48", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid convert: error:") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("extra, message", [
    (["--plan", "K*5"], "gives 5 layers, the teacher has 3"),
    (["--plan", "KKK", "--stage1-tokens", "100"], "budget of 100 tokens is less than one batch"),
    (["--plan", "KKK", "--stage2-tokens", "64"], "the stage2 budget of 64 tokens"),
    (["--plan", "KKK", "--set", "stage1.seq_len=16"], "within the student's window of 16 tokens"),
    (["--plan", "KKK", "--set", "gla.expand_k=1"], "options given for mixers the plan does not use"),
    (["--plan", "KKK", "--set", "stage1.lrr=1"], "stage1.lrr"),
    (["--plan", "KKK", "--keep-attention", "3"], "--keep-attention 3 keeps all 3 layers the plan converts"),
    (["--plan", "KKK", "--set", "stage1.params=weights"], "stage1.params='weights': choose one of memory, mixers, all"),
])
def test_convert_errors_are_one_line_exit_2(teacher_folder, corpus, tmp_path, capsys, extra, message):
    args = ["convert", str(teacher_folder), str(tmp_path / "out"), "--set", "kvm.chunk_len=8", "--data", str(corpus),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--stage2-tokens", "0", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid convert: error:") and message in err, err
    assert not (tmp_path / "out" / "stages" / "stage1").exists()  # every stage is checked before any training


def test_missing_teacher_and_foreign_output_folders_are_refused(teacher_folder, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.gguf"), str(tmp_path / "out"), "--plan", "K*3", "--no-progress"]) == 2
    assert "nope.gguf does not exist" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["convert", str(teacher_folder), str(tmp_path / "busy"), "--plan", "K*3", "--no-progress"]) == 2
    assert "is not a conversion folder" in capsys.readouterr().err


def test_convert_tensorboard_switch_reaches_the_stages(teacher_folder, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    args = ["convert", str(teacher_folder), str(tmp_path / "out"), "--plan", "KKK", "--set", "kvm.chunk_len=8",
            "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress",
            "--set", "stage1.seq_len=48", "--set", "stage1.batch_size=4", "--stage1-tokens", "768",
            "--stage2-tokens", "0", "--tensorboard"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid convert: error: train.tensorboard needs the tensorboard package"), err
    assert not list((tmp_path / "out" / "stages" / "stage1").glob("step_*"))


def test_set_options_split_into_mixers_and_stages():
    mixers, stages = parse_set_options(["kvm.chunk_len=64", "stage2.lr=3e-5", "stage1.data=[a.txt, b/]"])
    assert mixers == {"kvm": {"chunk_len": 64}}
    assert stages == {"stage2": {"lr": 3e-5}, "stage1": {"data": ["a.txt", "b/"]}}
    with pytest.raises(UsageError, match="expected MIXER.OPTION=VALUE"):
        parse_set_options(["chunk_len=64"])


def test_a_diverging_stage_stops_with_one_line_and_exit_3(teacher_folder, corpus, tmp_path, capsys):
    args = ["convert", str(teacher_folder), str(tmp_path / "out"), "--plan", "KKK", "--set", "kvm.chunk_len=8",
            "--set", "stage1.seq_len=48", "--set", "stage1.batch_size=4", "--set", "stage1.params=all",
            "--set", "stage1.lr=1e30", "--set", "stage1.warmup_steps=0", "--set", "stage1.grad_clip=null",
            "--stage1-tokens", "960", "--stage2-tokens", "0", "--data", str(corpus),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("hybrid convert: stopped: step ") and "--set STAGE.lr=" in err and err.count("\n") == 1
