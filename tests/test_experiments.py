"""convert/experiments.py runs end to end on a tiny teacher and prints its tables."""

from __future__ import annotations

import pytest

from convert import experiments
from convert.teacher import load_teacher
from tests.test_convert import random_teacher_tensors, write_hf_folder
from tests.test_distill import BYTES


def test_the_init_and_geometry_experiments_score_every_row(tmp_path, capsys):
    folder = write_hf_folder(tmp_path, BYTES, random_teacher_tensors(BYTES))
    teacher = load_teacher(folder)
    rows = experiments.init_rows(teacher, segments=1)
    assert [r["model"] for r in rows][:2] == ["teacher (full attention)", "4 sinks + 128-token window (own window)"]
    assert rows[-1]["model"] == "kvm, mean read (default)" and len(rows) == 7
    assert all(set(r["perplexity"]) == {"play", "licence", "release notes", "technical docs"} for r in rows)
    assert set(rows[0]["top1_agreement"].values()) == {1.0}
    text = experiments.table(rows)
    assert text.count("\n") == len(rows) + 1 and "| kvm, mean read (default) |" in text
    experiments.main(["geometry", "--teacher", str(folder), "--segments", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert all(f"| window {c * 64} + {s} slots |" in out for c, s in experiments.GEOMETRIES)
    assert "-token window (equal state) |" in out


def test_the_offset_and_keep_experiments_score_every_row(tmp_path):
    teacher = load_teacher(write_hf_folder(tmp_path, BYTES, random_teacher_tensors(BYTES)))
    default = experiments.init_rows(teacher, segments=1)[-1]
    rows = experiments.offset_rows(teacher, segments=1)
    assert [r["model"] for r in rows[2:]] == ["state offset -inf", "state offset -1", "state offset -0.5",
                                              "state offset 0 (default)", "state offset 0.25", "state offset 0.5",
                                              "state offset 1"]
    assert rows[5]["perplexity"] == default["perplexity"], "offset 0 is the default student"
    assert len({tuple(r["perplexity"].values()) for r in rows[2:]}) == 7
    n = teacher.recipe.model.n_layers
    rows = experiments.keep_rows(teacher, segments=1)
    kept = [k for k in experiments.KEPT if k < n]
    assert len(rows) == 2 + 2 * len(kept) and rows[2]["model"] == "0 kept (all KVM)"
    assert rows[2]["perplexity"] == default["perplexity"]
    assert all(r["model"].startswith(f"{k} kept") for k, r in zip(kept, rows[2::2]))
    assert all(r["model"].endswith(f"(equal to {k} kept)") for k, r in zip(kept, rows[3::2]))


def test_the_window_is_a_choice_of_init_offset_and_keep_only(tmp_path, capsys):
    folder = write_hf_folder(tmp_path, BYTES, random_teacher_tensors(BYTES))
    rows = experiments.init_rows(load_teacher(folder), segments=1, window_chunks=3)
    assert rows[1]["model"] == "4 sinks + 192-token window (own window)"
    for argv, message in ((["geometry", "--window-chunks", "3"], "geometry varies the window itself"),
                          (["init", "--window-chunks", "0"], "takes a count >= 1")):
        with pytest.raises(SystemExit):
            experiments.main([*argv, "--teacher", str(folder)])
        assert message in capsys.readouterr().err
