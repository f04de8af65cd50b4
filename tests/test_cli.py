"""The ``hybrid`` command: every subcommand's help, info, init -> generate, state save/continue,
published import, and user errors as one line with exit code 2 (no traceback)."""

import argparse
from pathlib import Path

import pytest

from hybrid.cli.main import build_parser, main

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
