"""The README's Quickstart block runs as written, in bash, line by line, from a fresh folder, with two
stand-ins: ``make setup`` is what ``make test`` runs before this suite (so it is not run again here),
and ``.venv/bin/activate`` is a script that puts this interpreter's ``hybrid`` on the PATH. The
``hybrid train`` line gets ``--set`` options appended that cut it to a few short steps; every other
line runs exactly as the README prints it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP, ACTIVATE = "make setup", "source .venv/bin/activate"
SHORT_TRAINING = ("--set train.max_steps=4 --set train.seq_len=32 --set train.batch_size=2 --set train.val_every=2 "
                  "--set train.ckpt_every=4 --set train.log_every=2 --no-progress")


def quickstart_lines() -> list[str]:
    """The commands of the first bash block under '## Quickstart', comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Quickstart\n.*?```bash\n(.*?)```", text, re.S | re.M).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow  # seven commands, each a fresh interpreter
def test_the_quickstart_runs_as_written(tmp_path):
    lines = quickstart_lines()
    assert lines[:2] == [SETUP, ACTIVATE] and any(line.startswith("hybrid train ") for line in lines)
    hybrid = Path(sys.executable).with_name("hybrid")
    assert hybrid.is_file(), "the hybrid console script of this environment"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{hybrid.parent}:$PATH"\n')
    script = ["set -euo pipefail"] + [
        f"{line} {SHORT_TRAINING}" if line.startswith("hybrid train ") else line
        for line in lines if line != SETUP]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "tiny/gla_kvm" in done.stdout and "parameters:" in done.stdout
    assert (tmp_path / "runs" / "demo" / "step_000004").is_dir()
    assert (tmp_path / "runs" / "demo-hf" / "config.json").is_file()
