"""lm-evaluation-harness from its own command line: ``hybrid lm-eval --model hybrid`` (lm-eval's command line
with our model registered) on a checkpoint, and lm-eval's ``lm_eval --model hf`` on the folder
``hybrid export-hf`` wrote, score a tiny local task as ``hybrid eval --tasks`` does. The two command
lines run in their own interpreters, as from a shell."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_eval import local_tasks

from hybrid.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cwd / "datasets"),
           "HF_MODULES_CACHE": str(cwd / "modules")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def _lm_eval_results(output: Path) -> dict:
    """The ``results`` of the one results_*.json file lm-eval wrote under ``output``."""
    (path,) = output.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


@pytest.mark.slow  # two interpreters importing lm-eval, datasets, torch and transformers
def test_lm_eval_command_lines_score_as_hybrid_eval(tmp_path, monkeypatch):
    for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(tmp_path))):
        monkeypatch.setenv(name, value)  # before lm_eval imports datasets, which reads them then
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's --model hf needs accelerate (the 'eval' extra)")
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert main(["init", "tiny/gla_kvm", str(ckpt), "--seed", "1"]) == 0
    assert main(["export-hf", str(ckpt), str(exported)]) == 0
    (tmp_path / "tasks").mkdir()
    tasks = local_tasks(tmp_path / "tasks")
    hybrid = [sys.executable, "-m", "hybrid"]
    lm_eval = Path(sys.executable).with_name("lm_eval")
    lm_eval_command = [str(lm_eval)] if lm_eval.is_file() else [sys.executable, "-m", "lm_eval"]

    assert main(["eval", str(ckpt), "--tasks", "tiny_mc", "tiny_gen", "tiny_ppl", "--include-path", str(tasks),
                 "--out", str(tmp_path / "ours"), "--device", "cpu"]) == 0
    ours = json.loads((tmp_path / "ours" / "lm_eval.json").read_text())
    _run([*hybrid, "lm-eval", "--model", "hybrid", "--model_args", f"pretrained={ckpt}", "--tasks", "tiny_mc",
          "tiny_gen", "tiny_ppl", "--include_path", str(tasks), "--output_path", str(tmp_path / "registered")],
         tmp_path)
    registered = _lm_eval_results(tmp_path / "registered")
    # not tiny_gen: lm-eval's hf model stops generate_until tasks at the end-of-text token, which the byte
    # tokenizer does not have
    _run([*lm_eval_command, "--model", "hf", "--model_args", f"pretrained={exported},trust_remote_code=True",
          "--tasks", "tiny_mc", "tiny_ppl", "--include_path", str(tasks), "--output_path", str(tmp_path / "hf")],
         tmp_path)
    hf = _lm_eval_results(tmp_path / "hf")

    assert registered["tiny_gen"]["exact_match,none"] == ours["tiny_gen"]["exact_match,none"]
    for results in (registered, hf):
        assert results["tiny_mc"]["acc,none"] == ours["tiny_mc"]["acc,none"]
        assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(ours["tiny_ppl"]["bits_per_byte,none"],
                                                                           rel=1e-5)
