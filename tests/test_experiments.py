"""convert/experiments.py runs end to end on a tiny teacher and prints its tables."""

from __future__ import annotations

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
