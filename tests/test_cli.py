"""The ``hybrid`` command: every subcommand's help, info, init -> generate, state save/continue,
published import, and user errors as one line with exit code 2 (no traceback)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hybrid.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = ["info", "init", "generate", "import-published", "export-hf", "train", "convert", "convert-report",
            "convert-scores", "recipes", "demo", "bench", "eval", "lm-eval"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: {'lm-eval' if command == 'lm-eval' else 'hybrid'}" in capsys.readouterr().out  # lm-eval's own


def test_parser_lists_every_command():
    parser = build_parser()
    help_text = parser.format_help()
    for command in COMMANDS:
        assert command in help_text
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subcommands.choices) == sorted(COMMANDS), "a command without a --help test above"


def test_info_reports_layers_parameters_and_state_by_kind(capsys):
    assert main(["info", "tiny/gla_kvm", "--context", "256", "4k"]) == 0
    out = capsys.readouterr().out
    assert "gla" in out and "kvm" in out and "recurrent" in out
    assert "parameters:" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("256", "4096"))]
    assert len(rows) == 2


def test_recipes_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "paper/120m/kvm_fixed256" in out and "tiny/gla_kvm" in out
    assert "_base" not in out


def _generate(folder, capsys, *extra):
    assert main(["generate", str(folder), "--temperature", "0", "--no-eos-stop", *extra]) == 0
    captured = capsys.readouterr()
    return captured.out.rstrip("\n"), captured.err


def test_init_generate_and_continue_a_saved_state(tmp_path, capsys):
    """The exactness of continuing a state is tested in test_generate.py; here: the command saves the
    state after prompt + output, and a later run continues from exactly that many tokens."""
    ckpt = tmp_path / "ckpt"
    assert main(["init", "tiny/gla_kvm", str(ckpt), "--seed", "3"]) == 0
    capsys.readouterr()
    state = tmp_path / "s.safetensors"
    _, err = _generate(ckpt, capsys, "--prompt", "Once upon a time", "--max-new-tokens", "15",
                       "--save-state", str(state))
    assert "tokens/s" in err and "state after 31 tokens" in err  # 16 prompt bytes + 15 new tokens
    assert state.is_file()
    _, err = _generate(ckpt, capsys, "--prompt", "!", "--state", str(state), "--max-new-tokens", "10")
    assert "continuing a saved state of 31 tokens" in err
    assert "state after 42 tokens" in err


def test_generate_from_a_recipe_says_weights_are_random(capsys):
    _, err = _generate("tiny/kvm_fixed", capsys, "--prompt", "hi", "--max-new-tokens", "3")
    assert "random weights" in err


def test_import_published_then_generate(published_tiny, tmp_path, capsys):
    out = tmp_path / "pub"
    assert main(["import-published", str(published_tiny), str(out), "--compat"]) == 0
    capsys.readouterr()
    _, err = _generate(out, capsys, "--prompt", "abc", "--max-new-tokens", "4")
    assert "kvm" in err


@pytest.mark.parametrize("argv, message", [
    (["info", "no_such_recipe"], "not found"),
    (["generate", "/no/such/folder", "--prompt", "x"], "neither a checkpoint folder nor a recipe"),
    (["generate", "tiny/gla_kvm"], "--prompt"),
    (["generate", "tiny/gla_kvm", "--prompt", ""], "prompt is empty"),
    (["generate", "tiny/gla_kvm", "--prompt", "a", "--stop", "two"], "exactly one token"),
    (["import-published", "/no/such/folder", "/tmp/never"], "no published checkpoint"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_state_from_another_model_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["init", "tiny/gla_kvm", str(a)])
    main(["init", "tiny/kvm_fixed", str(b)])
    state = tmp_path / "s.safetensors"
    _generate(a, capsys, "--prompt", "hello", "--max-new-tokens", "2", "--save-state", str(state))
    assert main(["generate", str(b), "--prompt", "x", "--state", str(state)]) == 2
    assert "different model" in capsys.readouterr().err


def test_generate_from_a_training_run_uses_its_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny/gla_kvm", "--out", str(run), "--no-progress", "--set", "train.max_steps=2",
                 "--set", "train.ckpt_every=1", "--set", "train.keep_last=2", "--set", "train.seq_len=32",
                 "--set", "train.batch_size=2", "--set", f"train.cache_dir={tmp_path / 'cache'}"]) == 0
    capsys.readouterr()
    _, err = _generate(run, capsys, "--prompt", "hi", "--max-new-tokens", "2")
    assert "newest checkpoint, step_000002" in err


# ----------------------------------------------------------------------------- input errors and bugs

def test_a_bug_keeps_its_traceback_and_is_not_taken_for_an_input_error(monkeypatch, capsys):
    """Only InputError (and OSError) become one line; anything else escapes main, so the traceback
    shows, even a plain ValueError."""
    from hybrid.cli import models

    for bug in (ZeroDivisionError("planted"), ValueError("planted"), KeyError("planted")):
        def broken(args, bug=bug):
            raise bug
        monkeypatch.setattr(models, "_info", broken)
        with pytest.raises(type(bug), match="planted"):
            main(["info", "tiny/gla_kvm"])
    assert capsys.readouterr().err == ""


def test_a_bug_shows_its_traceback_in_a_real_process(tmp_path):
    script = ("import sys\nfrom hybrid.cli import models\nfrom hybrid.cli.main import main\n"
              "def broken(args):\n    return {}['planted']\nmodels._info = broken\n"
              "sys.exit(main(['info', 'tiny/gla_kvm']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr and "planted" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["generate", "tiny/gla_kvm", "--prompt", "a", "--top-p", "1.5"], "argument --top-p: expected a probability mass "
                                                                      "in (0, 1], got '1.5'"),
    (["generate", "tiny/gla_kvm", "--prompt", "a", "--temperature", "nan"], "argument --temperature: expected a "
                                                                            "finite temperature >= 0"),
    (["generate", "tiny/gla_kvm", "--prompt", "a", "--seed", "1" * 20], "argument --seed: expected a seed in"),
    (["generate", "tiny/gla_kvm", "--prompt", "a", "--device", "tpu"], "device 'tpu' is not a device"),
    (["generate", "tiny/gla_kvm", "--prompt", "a\udcffb"], "argument --prompt: not UTF-8 text (byte 0xff at character 1)"),
    (["info", "tiny/gla_kvm", "--context", "inf"], "argument --context: expected a token count in [1, 16777216]"),
    (["info", "tiny/gla_kvm", "--context", "1e30"], "argument --context: expected a token count in [1, 16777216]"),
    (["info"], "the following arguments are required: recipe"),
    (["no-such-command"], "argument COMMAND: invalid choice: 'no-such-command'"),
])
def test_bad_arguments_are_one_line_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1 and "usage:" not in err


def test_cuda_is_refused_at_parse_time_where_torch_has_none(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["generate", "tiny/gla_kvm", "--prompt", "a", "--device", "cuda"])
    assert "argument --device: device is 'cuda' but" in capsys.readouterr().err


def test_the_state_file_is_checked_writable_before_generating(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main(["generate", "tiny/gla_kvm", "--prompt", "a", "--save-state", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert "argument --save-state: " in err and "is a folder: name the file to write" in err
    assert "random weights" not in err  # refused before the model was built
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["generate", "tiny/gla_kvm", "--prompt", "a", "--save-state", str(tmp_path / "file" / "s.state")])
    assert "file is a file, not a folder" in capsys.readouterr().err


def test_a_prompt_file_must_be_utf8(tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9")
    assert main(["generate", "tiny/gla_kvm", "--prompt-file", str(tmp_path / "p.txt")]) == 2
    assert "p.txt: not UTF-8 text (byte 0xe9 at offset 3, line 1)" in capsys.readouterr().err


@pytest.mark.parametrize("section, message", [
    ({"train": {"max_steps": 10, "lrr": 0.1}}, "train.lrr: unknown key. Did you mean 'lr'?"),
    ({"train": {"max_steps": 10, "lr": -1.0}}, "train.lr: must be > 0"),
    ({"tokenizer": {"type": "file", "path": "missing.json"}}, "tokenizer file"),
])
@pytest.mark.parametrize("command", ["info", "init"])
def test_info_and_init_check_every_section_train_would(command, section, message, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"extends": "tiny/gla_kvm", "train": None, **section}))
    argv = [command, str(path)] + ([str(tmp_path / "out")] if command == "init" else [])
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_key_in_train_set_points_to_a_recipe(tmp_path, capsys):
    assert main(["train", "tiny/gla_kvm", "--set", "model.d_model=32", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model: changes belong in a recipe that extends this one" in err and "train.model" not in err


def test_eval_refuses_text_without_a_token_to_predict(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("x")
    assert main(["eval", "tiny/gla_kvm", "--text", str(tmp_path / "one.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "the texts hold no token to predict" in capsys.readouterr().err


@pytest.mark.slow  # lm-eval indexes its task catalogue first (~12 s)
def test_eval_refuses_an_unknown_lm_eval_task(tmp_path):
    """In a process of its own: lm-eval's loggers keep the stderr of the test that first imported it."""
    pytest.importorskip("lm_eval")
    done = subprocess.run([sys.executable, "-m", "hybrid", "eval", "tiny/gla_kvm", "--tasks", "no_such_task_xyz",
                           "--limit", "1", "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--tasks: Spec 'no_such_task_xyz' is not a registered task" in done.stderr.strip().splitlines()[-1]
