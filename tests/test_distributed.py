"""Data-parallel training (hybrid/training/distributed.py): real ``torchrun`` launches of ``hybrid train`` with
two CPU processes (gloo) give the losses of one process with the same global batch, under DDP and
FSDP, and their checkpoints resume across process counts (two -> one, and one -> two)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hybrid.model.recipe import RecipeError, load_recipe
from hybrid.training import distributed
from hybrid.training.config import TrainError, config_from_recipe
from hybrid.training.loop import train
from hybrid.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # measured: at most 2e-7 relative (the gradient all-reduce adds in another order)


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    """tiny/gla_kvm cut to two layers of 32 ("GK"): its KVM layer is the first of a value-residual
    group, the block FSDP must leave to the root. 6 steps of 8 x 32 bytes, 2 micro-batches per
    process, checkpoints at steps 2, 4 and 6, validation (3 batches: uneven over 2 processes) at 3 and 6."""
    folder = tmp_path_factory.mktemp("distributed")
    lines = ["the quick brown fox jumps over the lazy dog.", "a stitch in time saves nine.",
             "all that glitters is not gold."]
    (folder / "corpus.txt").write_text("\n".join(lines[i % 3] for i in range(300)) + "\n")
    model = load_recipe("tiny/gla_kvm").to_dict()["model"]
    model.update(d_model=32, n_layers=2, layers="GK")
    settings = {"data": [str(folder / "corpus.txt")], "cache_dir": str(folder / "cache"), "seq_len": 32,
                "batch_size": 8, "grad_accum": 2, "max_steps": 6, "lr": 1e-2, "warmup_steps": 2,
                "val_fraction": 0.05, "val_every": 3, "val_batches": 3, "ckpt_every": 2, "keep_last": 3,
                "log_every": 1, "threads": 1}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": model, "train": settings}))
    return path


def one_process(recipe_path: Path, out: Path):
    recipe = load_recipe(recipe_path)
    return train(recipe, config_from_recipe(recipe, {"out_dir": str(out)}), progress=False)


@pytest.fixture(scope="module")
def reference(recipe_path) -> Path:
    """The uninterrupted one-process run's output folder."""
    out = recipe_path.parent / "one_process"
    assert one_process(recipe_path, out).step == 6
    return out


def torchrun(recipe_path: Path, out: Path, *settings: str) -> str:
    """``hybrid train`` in two CPU processes (a free port from torchrun's --standalone); its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "hybrid", "train", str(recipe_path), "--no-progress", "--out", str(out)]
    command += [arg for item in settings for arg in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, cwd=recipe_path.parent, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def assert_same_losses(out: Path, reference: Path, steps: list[int]) -> None:
    """The metrics lines of ``out`` are those of ``steps``, with the reference's losses, gradient
    norms and validation losses within float tolerance."""
    got = read_metrics(out / "metrics.jsonl")
    want = {r["step"]: r for r in read_metrics(reference / "metrics.jsonl")}
    assert [r["step"] for r in got] == steps
    for record in got:
        expected = want[record["step"]]
        assert record["loss"] == pytest.approx(expected["loss"], rel=RTOL), record["step"]
        assert record["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), record["step"]
        assert ("val_loss" in record) == ("val_loss" in expected)
        if "val_loss" in record:
            assert record["val_loss"] == pytest.approx(expected["val_loss"], rel=RTOL), record["step"]


def assert_same_checkpoint(folder: Path, expected: Path) -> None:
    """The same files and tensor names as a one-process checkpoint, the values within float tolerance
    (of each tensor's scale: measured up to 2e-4 of it, for Adam's first moment after 6 steps)."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in expected.iterdir())
    for name in ("model.safetensors", "trainer.safetensors"):
        got, want = load_file(folder / name), load_file(expected / name)
        assert got.keys() == want.keys()
        for key in want:
            if not key.startswith("rng."):
                scale = want[key].abs().max().item()
                assert (got[key] - want[key]).abs().max().item() <= 2e-3 * scale, key


def resume_in_one_process(checkpoint: Path, recipe_path: Path, out: Path):
    out.mkdir()
    shutil.copytree(checkpoint, out / checkpoint.name)
    return one_process(recipe_path, out)


def test_ddp_two_processes_equal_one_and_their_checkpoint_resumes_in_one(recipe_path, reference):
    """Two DDP processes (each 4 of the 8 sequences, in 2 micro-batches: no_sync on the first) log the
    one-process losses; only rank 0 prints and writes. Their step-4 checkpoint, resumed in one
    process, continues with the uninterrupted run's losses."""
    out = recipe_path.parent / "ddp"
    stdout = torchrun(recipe_path, out, "train.parallel=ddp")
    assert stdout.count("step 6/6; done") == 1, stdout
    assert_same_losses(out, reference, [1, 2, 3, 4, 5, 6])
    assert_same_checkpoint(out / "step_000006", reference / "step_000006")

    summary = resume_in_one_process(out / "step_000004", recipe_path, recipe_path.parent / "ddp_then_one")
    assert (summary.start_step, summary.step) == (4, 6)
    assert_same_losses(summary.out_dir, reference, [5, 6])


def test_fsdp_resumes_a_one_process_checkpoint_and_its_checkpoint_resumes_in_one(recipe_path, reference):
    """FSDP (FSDP2's fully_shard on CPU/gloo) continues the one-process run from its step-2 checkpoint
    (each process keeping its shard of the saved moments) with the same losses; the checkpoints it
    gathers to rank 0 are one-process checkpoints, and its step-4 one resumes in one process."""
    out = recipe_path.parent / "fsdp"
    out.mkdir()
    shutil.copytree(reference / "step_000002", out / "step_000002")
    stdout = torchrun(recipe_path, out, "train.parallel=fsdp")
    assert "step 6/6; done; resumed from step 2" in stdout
    assert_same_losses(out, reference, [3, 4, 5, 6])
    assert_same_checkpoint(out / "step_000006", reference / "step_000006")

    summary = resume_in_one_process(out / "step_000004", recipe_path, recipe_path.parent / "fsdp_then_one")
    assert (summary.start_step, summary.step) == (4, 6)
    assert_same_losses(summary.out_dir, reference, [5, 6])


def test_settings_and_the_one_process_path(recipe_path, tmp_path, monkeypatch):
    """``parallel`` is checked like any setting; in one process the helpers pass values through and
    ``wrap`` returns the model itself; a global batch that does not split evenly is refused."""
    recipe = load_recipe(recipe_path)
    with pytest.raises(RecipeError, match=r"train\.parallel: must be one of"):
        config_from_recipe(recipe, {"parallel": "zero3"})
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, "fsdp", torch.device("cpu")) is model and distributed.unwrap(model) is model
    assert distributed.mean([1.5, 2.0]) == [1.5, 2.0] and distributed.total([3.0]) == [3.0]
    assert distributed.from_main("x") == "x" and distributed.any_process(False) is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(TrainError, match=r"batch_size 8 \(the global batch\) must split evenly into 3 processes "
                                         r"x train.grad_accum 2"):
        train(recipe, config_from_recipe(recipe, {"out_dir": str(tmp_path / "run")}), progress=False)
