"""The conversion report's parts: the sink + window baselines (convert/baselines.py), the mean-read
student at init against them, the held-out domains, the factual prompts and the verdict."""

from __future__ import annotations

import torch

from convert.baselines import SINK_LEN, equal_state_window, sink_window_model
from convert.evaluate import long_range_predictions, state_bytes
from convert.facts import FACT_PROMPTS, fact_rows, preamble_ids
from convert.heldout import default_domains
from convert.init import convert_teacher
from convert.report import verdict, verdict_line
from convert.samples import OPENINGS
from convert.teacher import load_teacher
from tests.test_convert import TINY, random_teacher_tensors, tokens, write_hf_folder

KVM = {"kvm": {"chunk_len": 8, "n_bswa_chunks": 2, "state_min_len": 16}}  # a 16-token window, 16 slots


def tiny_teacher(tmp_path):
    return load_teacher(write_hf_folder(tmp_path, TINY, random_teacher_tensors(TINY)))


def test_the_baseline_is_the_teacher_while_window_and_sinks_cover_the_text(tmp_path):
    teacher = tiny_teacher(tmp_path)
    x = tokens(40)
    with torch.no_grad():
        expected = teacher.model(x).logits
        assert (sink_window_model(teacher, 36)(x).logits - expected).abs().max() <= 1e-5
        short = sink_window_model(teacher, 16)(x).logits
    assert (short[:, :20] - expected[:, :20]).abs().max() <= 1e-5  # 16 + 4 sinks hold the first 20 queries' past
    assert (short[:, 20:] - expected[:, 20:]).abs().max() > 1e-3


def test_the_equal_state_window_takes_the_students_state_bytes(tmp_path):
    teacher = tiny_teacher(tmp_path)
    student, _, _ = convert_teacher(teacher, "K*3", KVM)
    context = 4096
    window = equal_state_window(student, teacher.model, context)
    student_bytes = sum(state_bytes(student, [context])[context].values())
    baseline = lambda w: sum(state_bytes(sink_window_model(teacher, w), [context])[context].values())  # noqa: E731
    assert baseline(window) <= student_bytes < baseline(window + 1)
    # 16 slots + a window of at most 16 raw tokens (+ gates) per layer: about 32 tokens' keys and values
    assert 24 <= window + SINK_LEN <= 40


def test_the_mean_read_student_at_init_equals_the_teacher_until_its_memory_merges(tmp_path):
    """Before the first merge every slot holds one token exactly, so the converted student is the
    teacher; the first chunk whose tokens merge is where it starts to differ."""
    teacher = tiny_teacher(tmp_path)
    x = tokens(64)
    never_merges, _, _ = convert_teacher(teacher, "K*3", {"kvm": {**KVM["kvm"], "state_min_len": 64}})
    student, _, _ = convert_teacher(teacher, "K*3", KVM)
    with torch.no_grad():
        expected = teacher.model(x).logits
        assert (never_merges(x).logits - expected).abs().max() <= 1e-4
        got = student(x).logits
    # the first chunk's 8 slots, then the second chunk appended at position 24: 16 slots, full; the
    # third chunk leaves the window at 32 and merges, so the queries from 32 on read merged slots
    assert (got[:, :32] - expected[:, :32]).abs().max() <= 1e-4
    assert (got[:, 32:] - expected[:, 32:]).abs().max() > 1e-3


def test_top1_agreement_and_nll_are_per_prediction_beyond_the_window(tmp_path):
    teacher = tiny_teacher(tmp_path)
    x = tokens(3 * 32 + 5)[0]
    nll, top1 = long_range_predictions(teacher.model, x, window=16, segment_len=32)
    assert nll.shape == top1.shape == (3 * 15,)
    with torch.no_grad():
        logits = teacher.model(x[32:64][None]).logits[0, 16:-1]
    assert torch.equal(top1[15:30], logits.argmax(-1))
    assert torch.allclose(nll[15:30], torch.nn.functional.cross_entropy(logits, x[32 + 17:64], reduction="none"))


def test_held_out_domains_are_other_kinds_of_text_than_the_samples_and_facts():
    domains = default_domains()
    assert [d.name for d in domains] == ["play", "licence", "release notes", "technical docs"]
    texts = [d.text() for d in domains]
    assert all(len(t) > 10_000 for t in texts) and len(set(texts)) == 4
    assert not any(opening in text for opening in OPENINGS for text in texts)
    assert len(FACT_PROMPTS) == 10 and not any(prompt in opening for prompt in FACT_PROMPTS for opening in OPENINGS)


def test_facts_agree_only_on_the_same_first_tokens(tmp_path):
    teacher = tiny_teacher(tmp_path)
    tokenizer = teacher.text_tokenizer()
    preamble = preamble_ids(tokenizer, "word " * 200, window=16)
    assert len(preamble) > 32
    rows = fact_rows(tokenizer, [[1, 2, 3]] * 10, [[1, 2, 3]] * 9 + [[1, 2, 4]])
    assert [r["agree"] for r in rows] == [True] * 9 + [False] and rows[0]["prompt"] == FACT_PROMPTS[0]


def test_the_verdict_needs_every_domain():
    rows = [{"model": "teacher", "kind": "teacher", "perplexity": {"a": 10.0, "b": 10.0}},
            {"model": "own", "kind": "baseline", "baseline": "own window", "window": 128,
             "perplexity": {"a": 14.0, "b": 13.0}},
            {"model": "equal", "kind": "baseline", "baseline": "equal state", "window": 380,
             "perplexity": {"a": 11.0, "b": 10.5}},
            {"model": "after stage2", "kind": "student", "perplexity": {"a": 10.9, "b": 10.6}}]
    result = verdict(rows)
    assert result["own window"] == {"window": 128, "beats_on": ["a", "b"], "every_domain": True}
    assert result["equal state"] == {"window": 380, "beats_on": ["a"], "every_domain": False}
    line = verdict_line({"verdict": result, "domains": [{}, {}], "sink_len": 4, "equal_state_context": 16384})
    assert "after stage2 beats 4 sinks + 128-token window (own window) on every domain (2/2)" in line
    assert "does not beat 4 sinks + 380-token window (equal state) on every domain (1/2)" in line


def test_the_student_with_its_memory_suppressed_is_the_sink_and_block_window_baseline(tmp_path):
    """The converted student's first SINK_LEN slots are sinks, and its memory's offset at -inf leaves
    them and the block window: the teacher's weights in ``bswa`` with the same sinks (in float64, where
    the two ways of summing the same softmax agree to far below 1e-5)."""
    teacher = tiny_teacher(tmp_path)
    student, _, _ = convert_teacher(teacher, "K*3", KVM)
    window = {key: KVM["kvm"][key] for key in ("chunk_len", "n_bswa_chunks")}
    baseline, _, _ = convert_teacher(teacher, "B*3", {"bswa": {**window, "sink_len": SINK_LEN}})
    student, baseline, x = student.double().eval(), baseline.double().eval(), tokens(72)
    with torch.no_grad():
        for block in student.blocks:
            assert block.mixer.config.sink_len == SINK_LEN and torch.equal(block.mixer.state_offset, torch.zeros(4))
            block.mixer.state_offset.fill_(-torch.inf)
        expected = baseline(x).logits
        assert (student(x).logits - expected).abs().max() <= 1e-5
        for block in student.blocks:
            block.mixer.state_offset.zero_()
        assert (student(x).logits[:, 32:] - expected[:, 32:]).abs().max() > 1e-3, "the memory is read at 0"
