"""convert/layer_scores.py, ``hybrid convert-scores`` and ``hybrid convert --keep-attention``: a
restored layer is exactly the conversion that keeps it, scores are KL differences beyond the window,
the chosen plan keeps the best layers, and sequences within the window are refused."""

import json

import pytest
import torch

from convert.errors import TeacherError
from convert.init import convert_teacher
from convert.layer_scores import LayerScores, choose_plan, layer_scores, restore_layers
from convert.losses import kl_divergence
from convert.teacher import load_teacher
from hybrid.cli.main import main
from hybrid.formats.checkpoint import load_checkpoint
from tests.test_convert import TINY, random_teacher_tensors, tokens, write_hf_folder

KVM = {"kvm": {"chunk_len": 8, "n_bswa_chunks": 2}}  # a 16-token window
WINDOW = 16
BYTES = {**TINY, "vocab_size": 256}  # a tiny random Llama whose vocabulary is the byte tokenizer's


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("teacher"), BYTES, random_teacher_tensors(BYTES))


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    return load_teacher(teacher_folder)


def beyond_window_kl(student, teacher, x) -> float:
    with torch.no_grad():
        return kl_divergence(student.eval()(x).logits[:, WINDOW:], teacher.model(x).logits[:, WINDOW:]).item()


def test_restored_layers_are_the_teachers_and_equal_a_conversion_that_keeps_them(teacher):
    x = tokens(40, 256)  # (2, 40)
    student, _, _ = convert_teacher(teacher, "K*3", KVM)
    student.eval()
    with torch.no_grad():
        expected = teacher.model(x).logits
        with restore_layers(student, teacher.model, range(3)):
            every = student(x).logits
        after = student(x).logits
    assert torch.equal(every, expected)  # every layer restored: the teacher, bitwise
    assert kl_divergence(every[:, WINDOW:], expected[:, WINDOW:]).item() < 1e-7
    assert kl_divergence(after[:, WINDOW:], expected[:, WINDOW:]).item() > 1e-2  # the KVM layers are back

    scores = layer_scores(teacher, "K*3", KVM, x, progress=False)
    assert scores.kl_all == pytest.approx(beyond_window_kl(student, teacher, x), rel=1e-6)
    for i in range(3):
        kept, _, plan = convert_teacher(teacher, "".join("A" if j == i else "K" for j in range(3)), KVM)
        assert plan.converted == tuple(j for j in range(3) if j != i)
        assert scores.restored[i] == pytest.approx(beyond_window_kl(kept, teacher, x), rel=1e-6)
    assert len(set(scores.restored.values())) == 3  # restoring a layer may also raise the KL: scores can be < 0


def test_scores_are_kl_differences_and_the_plan_keeps_the_best(teacher):
    x = tokens(48, 256, seed=3)
    scores = layer_scores(teacher, "AKK", KVM, x[0], progress=False)  # 1-D tokens: one sequence
    assert set(scores.restored) == {1, 2} and (scores.sequences, scores.seq_len) == (1, 48)
    assert scores.positions == 48 - WINDOW
    for row in scores.table():
        assert row["score"] == scores.kl_all - row["kl_restored"]
    best = max((1, 2), key=scores.score)
    plan, rows = choose_plan(scores, 1)
    assert plan == "".join("A" if i in (0, best) else "K" for i in range(3))
    assert [r["kept"] for r in rows] == [r["layer"] == best for r in rows]
    assert scores.to_dict(1)["kept"] == [best] and scores.to_dict(1)["plan"] == plan

    made = LayerScores("t", "AKGK", ("attention", "kvm", "gla", "kvm"), 1.0, {1: 0.9, 2: 0.4, 3: 0.7}, 16, 2, 40)
    assert made.ranking() == [2, 3, 1] and [r["rank"] for r in made.table()] == [3, 1, 2]
    assert choose_plan(made, 0)[0] == "AKGK" and choose_plan(made, 1)[0] == "AKAK"
    assert choose_plan(made, 2)[0] == "AKAA" and choose_plan(made, 3)[0] == "AAAA"
    with pytest.raises(TeacherError, match="cannot keep 4 layers as attention"):
        choose_plan(made, 4)


def test_sequences_within_the_window_and_linked_plans_are_refused(teacher):
    with pytest.raises(TeacherError, match="16 tokens, within the student's 16-token window"):
        layer_scores(teacher, "K*3", KVM, tokens(16, 256), progress=False)
    with pytest.raises(TeacherError, match="16 tokens, within the student's 16-token window"):
        layer_scores(teacher, "K*3", KVM, tokens(16, 256)[0], progress=False)
    with pytest.raises(TeacherError, match="starts the RWKV-7 v_first stream"):
        layer_scores(teacher, "KRR", KVM, tokens(40, 256), progress=False)
    with pytest.raises(TeacherError, match="value_residual"):
        layer_scores(teacher, "K*3", {"kvm": {**KVM["kvm"], "value_residual": True}}, tokens(40, 256), progress=False)


def test_convert_scores_command_prints_the_table_and_writes_json(teacher_folder, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["convert-scores", str(teacher_folder), "--plan", "K*3", "--set", "kvm.chunk_len=8",
            "--eval-tokens", "100", "--seq-len", "48", "--keep-attention", "1", "--out", str(out),
            "--threads", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0  # default text: the held-out play, byte tokens
    printed = capsys.readouterr().out
    assert "layer  mixer" in printed and "plan keeping the 1 best as attention" in printed
    record = json.loads(out.read_text())
    assert (record["window"], record["sequences"], record["seq_len"]) == (16, 2, 48)  # 100 tokens: 2 x 48
    assert [row["layer"] for row in record["layers"]] == [0, 1, 2] and record["mixer_options"] == {"kvm": {"chunk_len": 8}}
    assert record["plan"].count("A") == 1 and record["plan"][record["kept"][0]] == "A"
    assert sorted(row["rank"] for row in record["layers"]) == [1, 2, 3]
    text = tmp_path / "other.txt"
    text.write_text("a different text, long enough for one sequence of 48 bytes and more")
    assert main([*args, "--text", str(text)]) == 0
    assert json.loads(out.read_text())["sequences"] == 1

    for extra, message in ((["--seq-len", "16"], "within the student's 16-token window"),
                           (["--set", "stage2.lr=1e-4"], "convert-scores takes student mixer options only"),
                           (["--keep-attention", "4"], "cannot keep 4 layers as attention")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hybrid convert-scores: error:") and message in err, err


def test_convert_keep_attention_records_the_choice(teacher_folder, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the king and queen walk to a castle while the fool sings of gold"] * 40))
    out = tmp_path / "out"

    def convert(keep: str) -> int:
        return main(["convert", str(teacher_folder), str(out), "--plan", "K*3", "--keep-attention", keep,
                     "--set", "kvm.chunk_len=8", "--set", "stage1.seq_len=48", "--set", "stage1.batch_size=4",
                     "--set", "stage2.seq_len=48", "--stage1-tokens", "192", "--stage2-tokens", "0",
                     "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
                     "--device", "cpu", "--no-progress"])

    assert convert("1") == 0
    record = json.loads((out / "stages" / "conversion.json").read_text())
    selection = record["layer_selection"]
    assert selection["seq_len"] == 48 and selection["sequences"] == 4  # stage 2's length, of the data
    assert record["identity"]["plan"] == "K*3" and record["identity"]["keep_attention"] == 1
    assert record["converted"] == [i for i in range(3) if i not in selection["kept"]]
    assert record["plan_summary"] == f"2/3 layers converted: {selection['plan']}"
    assert [layer.mixer for layer in load_checkpoint(out)[0].model.layers] == [
        "attention" if x == "A" else "kvm" for x in selection["plan"]]
    capsys.readouterr()
    assert main(["convert-report", str(out), "--eval-tokens", "512", "--segment-len", "128", "--no-progress"]) == 0
    assert f"Kept as attention: layers {selection['kept']}, the 1 of the target plan KKK" in capsys.readouterr().out
    models = json.loads((out / "report.json").read_text())["models"]
    assert [r["model"] for r in models if r["kind"] == "target"] == ["target plan KKK at init"]
    assert len({tuple(r["perplexity"].values()) for r in models if r["kind"] in ("target", "student")}) >= 2
    assert convert("2") == 2  # another choice is another conversion
    assert "keep_attention: 1 there, 2 now" in capsys.readouterr().err
