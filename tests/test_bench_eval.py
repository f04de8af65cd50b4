"""``hybrid bench`` and ``hybrid eval`` on tiny checkpoints made with ``hybrid init``: the CSV rows and
plots, the derived full-attention baseline, perplexity and loss by position against the model's own
logits, the NIAH generator and scorer, and the lm-eval adapter on a local task."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybrid.cli.main import main
from hybrid.evaluation.bench import full_attention_config, subjects_for
from hybrid.evaluation.niah import (
    NEEDLE,
    NIAH_STYLES,
    essay_sentences,
    extract_answer,
    make_niah_sample,
    niah_correct,
    value_kind,
)
from hybrid.evaluation.perplexity import heldout_text, score_documents, token_losses
from hybrid.formats.checkpoint import load_checkpoint
from hybrid.formats.tokenizer import ByteTokenizer
from hybrid.model.model import HybridLM
from hybrid.model.recipe import load_recipe, recipe_from_dict
from hybrid.model.state_shapes import state_at

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = ("When shall we three meet again\nIn thunder, lightning, or in rain?\n"
        "When the hurlyburly's done,\nWhen the battle's lost and won.\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "gla_kvm"
    assert main(["init", "tiny/gla_kvm", str(folder), "--seed", "1"]) == 0
    return folder


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- bench

def test_bench_rows_for_every_context_and_both_models(checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", str(checkpoint), "--contexts", "16", "40", "--repeats", "2", "--steps", "3",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    rows = _read_csv(out / "bench.csv")
    _, model, _ = load_checkpoint(checkpoint)
    baseline = HybridLM(full_attention_config(model.config))
    expected = {("baseline", 16), ("baseline", 40), ("model", 16), ("model", 40)}
    assert {(r["role"], int(r["context"])) for r in rows} == expected and len(rows) == 4
    base_name = f"full attention ({checkpoint})"
    for row in rows:
        context = int(row["context"])
        assert float(row["prefill_s_median"]) > 0 and float(row["decode_ms_median"]) > 0
        assert float(row["prefill_s_min"]) <= float(row["prefill_s_median"]) <= float(row["prefill_s_max"])
        assert float(row["decode_ms_min"]) <= float(row["decode_ms_median"]) <= float(row["decode_ms_max"])
        assert row["baseline"] == base_name
        measured = model if row["role"] == "model" else baseline
        assert row["model"] == (str(checkpoint) if row["role"] == "model" else base_name)
        want = state_at(measured, context).bytes_by_kind()
        assert int(row["state_bytes"]) == sum(want.values())
        for kind in ("recurrent", "kvm", "window", "kv"):
            assert int(row[f"state_bytes_{kind}"]) == want.get(kind, 0)
    by = {(r["role"], int(r["context"])): r for r in rows}
    for context in (16, 40):
        mine, base = by["model", context], by["baseline", context]
        assert float(mine["decode_speedup"]) == pytest.approx(
            float(base["decode_ms_median"]) / float(mine["decode_ms_median"]), rel=1e-4)
        assert float(mine["prefill_speedup"]) == pytest.approx(
            float(base["prefill_s_median"]) / float(mine["prefill_s_median"]), rel=1e-4)
        assert float(mine["state_fraction"]) == pytest.approx(int(mine["state_bytes"]) / int(base["state_bytes"]))
        assert int(base["state_bytes_kv"]) > 0 and int(mine["state_bytes_kv"]) == 0
    assert int(by["baseline", 40]["state_bytes_kv"]) > int(by["baseline", 16]["state_bytes_kv"])  # grows with T
    _assert_png(out / "bench.png")


def test_bench_max_prefill_skips_long_prefills_and_single_mixer(tmp_path, capsys):
    out = tmp_path / "mixer"
    assert main(["bench", "--mixer", "kvm", "--set", "num_heads=2", "--set", "chunk_len=8", "--set", "budget=power_law",
                 "--set", "growth_factor=2", "--d-model", "32", "--contexts", "24", "64", "--max-prefill", "24",
                 "--repeats", "1", "--steps", "2", "--out", str(out)]) == 0
    assert "kvm num_heads=2" in capsys.readouterr().out
    rows = _read_csv(out / "bench.csv")
    assert [(r["layers"], int(r["context"])) for r in rows] == [("A", 24), ("A", 64), ("K", 24), ("K", 64)]
    for row in rows:
        assert (row["prefill_s_median"] == "") == (int(row["context"]) == 64)
        assert float(row["decode_ms_median"]) > 0
    kvm = {int(r["context"]): r for r in rows if r["layers"] == "K"}
    assert int(kvm[64]["state_bytes_kvm"]) > 0 and int(kvm[64]["state_bytes_kv"]) == 0
    assert kvm[64]["prefill_speedup"] == "" and float(kvm[64]["decode_speedup"]) > 0


def test_full_attention_baseline_keeps_heads_and_replaces_every_mixer():
    gptalpha = load_recipe("paper/120m/gptalpha").model
    for name in ("paper/120m/kvm_fixed256", "paper/120m/kvm_sqrt16", "hybrids/gla_kvm"):
        assert full_attention_config(load_recipe(name).model).fingerprint() == gptalpha.fingerprint(), name
    lrnn_only = recipe_from_dict({"model": {"vocab_size": 64, "d_model": 48, "n_layers": 2, "layers": "GG",
                                            "mixers": {"gla": {"num_heads": 3}}}}).model
    derived = full_attention_config(lrnn_only)
    assert [layer.mixer for layer in derived.layers] == ["attention", "attention"]
    assert derived.layers[0].options.num_heads == 3 and derived.layers[0].options.head_dim == 16
    assert (derived.d_model, derived.n_layers, derived.block) == (lrnn_only.d_model, lrnn_only.n_layers,
                                                                 lrnn_only.block)


def test_models_sharing_a_baseline_measure_it_once():
    torch.manual_seed(0)
    kvm = HybridLM(load_recipe("tiny/kvm_fixed").model)
    kvm_sqrt = HybridLM(load_recipe("tiny/kvm_sqrt").model)
    attention = HybridLM(load_recipe("tiny/gptalpha").model)
    subjects = subjects_for([("fixed", kvm), ("sqrt", kvm_sqrt)])
    assert [(s.name, s.role, s.baseline) for s in subjects] == [
        ("full attention (fixed)", "baseline", "full attention (fixed)"),
        ("fixed", "model", "full attention (fixed)"), ("sqrt", "model", "full attention (fixed)")]
    assert subjects[0].model.config.fingerprint() == attention.config.fingerprint()
    # a given model that is the baseline's architecture serves as it, under its own name
    subjects = subjects_for([("fixed", kvm), ("sqrt", kvm_sqrt), ("gptalpha", attention)])
    assert [(s.name, s.role, s.baseline) for s in subjects] == [
        ("gptalpha", "baseline", "gptalpha"), ("fixed", "model", "gptalpha"), ("sqrt", "model", "gptalpha")]
    assert subjects[0].model is attention


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: hybrid" in capsys.readouterr().out


def test_bench_usage_errors(capsys):
    assert main(["bench"]) == 2
    assert main(["bench", "tiny/gla_kvm", "--set", "budget=fixed"]) == 2
    assert main(["bench", "--mixer", "kvmm"]) == 2
    err = capsys.readouterr().err
    assert "--mixer" in err and "Did you mean 'kvm'" in err


# ----------------------------------------------------------------------------- perplexity

def _direct_losses(model, ids):
    """NLL of ids[1:] from one full forward of ids[:-1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    return F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")


def test_perplexity_is_exp_mean_nll_of_the_model_logits(checkpoint, tmp_path, capsys):
    _, model, tokenizer = load_checkpoint(checkpoint)
    texts = [TEXT, TEXT.upper()[:70]]
    direct = torch.cat([_direct_losses(model, tokenizer.encode(t)) for t in texts])
    result = score_documents(model, tokenizer, texts, max_len=10_000, chunk=13, bucket=32)
    assert result.count == len(direct) == sum(len(t.encode()) - 1 for t in texts)
    assert result.loss == pytest.approx(float(direct.mean()), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(direct.mean())), rel=1e-5)

    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    out = tmp_path / "eval"
    assert main(["eval", str(checkpoint), "--text", str(path), "--bucket", "32", "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    summary = json.loads((out / "perplexity.json").read_text())
    assert summary["perplexity"] == pytest.approx(math.exp(float(_direct_losses(model, tokenizer.encode(TEXT)).mean())),
                                                  rel=1e-5)
    rows = _read_csv(out / "loss_by_position.csv")
    assert [int(r["position_start"]) for r in rows] == [0, 32, 64, 96]
    _assert_png(out / "loss_by_position.png")


def test_chunked_scoring_matches_one_forward(checkpoint):
    _, model, tokenizer = load_checkpoint(checkpoint)
    ids = tokenizer.encode(TEXT)
    torch.testing.assert_close(token_losses(model, ids, chunk=5), _direct_losses(model, ids), rtol=1e-4, atol=1e-5)


def test_loss_by_position_buckets_average_to_the_overall_loss(checkpoint):
    _, model, tokenizer = load_checkpoint(checkpoint)
    result = score_documents(model, tokenizer, [TEXT * 3], max_len=50, chunk=16, bucket=16)
    n_tokens = len((TEXT * 3).encode())
    assert result.count == n_tokens - 1  # windows overlap by one token: every token after the first once
    assert result.windows == math.ceil((n_tokens - 1) / 50)
    buckets = result.by_position()
    assert [(start, end) for start, end, _, _ in buckets] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert sum(n for _, _, n, _ in buckets) == result.count
    weighted = sum(n * loss for _, _, n, loss in buckets) / result.count
    assert weighted == pytest.approx(result.loss, rel=1e-9)
    ids = tokenizer.encode(TEXT * 3)
    direct = [_direct_losses(model, ids[s:s + 51]) for s in range(0, len(ids) - 1, 50)]
    for b, (_, _, n, loss) in enumerate(buckets):
        part = torch.cat([window[16 * b:16 * (b + 1)] for window in direct])
        assert n == len(part) and loss == pytest.approx(float(part.mean()), rel=1e-5)


def test_default_text_is_the_held_out_tail_of_the_builtin_corpus():
    text = heldout_text()
    assert 20_000 < len(text.encode()) < 27_000
    assert text.rstrip().endswith("_Exeunt_")  # the end of Timon of Athens, the last play read
    assert "Timon" in text


# ----------------------------------------------------------------------------- needle in a haystack

@pytest.mark.parametrize("style", NIAH_STYLES)
def test_niah_samples_are_seeded_and_put_the_needle_at_the_depth(style):
    tokenizer = ByteTokenizer()
    sample = make_niah_sample(style, 3000, 0.5, 2, tokenizer, seed=7)
    assert sample == make_niah_sample(style, 3000, 0.5, 2, tokenizer, seed=7)
    assert sample.answer != make_niah_sample(style, 3000, 0.5, 2, tokenizer, seed=8).answer
    assert sample.answer != make_niah_sample(style, 3000, 0.5, 3, tokenizer, seed=7).answer
    n_tokens = len(tokenizer.encode(sample.prompt))
    assert 2700 <= n_tokens <= 3000
    needle = NEEDLE.format(kind=value_kind(style), key=sample.key, value=sample.answer)
    assert sample.prompt.count(needle) == 1 and sample.prompt.index(needle) == sample.needle_start
    assert sample.prompt.endswith(f"The special magic {value_kind(style)} for {sample.key} mentioned in the "
                                  "provided text is")
    longest = max(len(s) for s in essay_sentences()) if style != "passkey" else 40
    haystack = sample.haystack_end - sample.haystack_start
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        placed = make_niah_sample(style, 3000, depth, 0, tokenizer, seed=7)
        assert abs(placed.relative_depth - depth) <= min(0.5, longest / haystack), (depth, placed.relative_depth)
    assert make_niah_sample(style, 3000, 0.0, 0, tokenizer).needle_start == sample.haystack_start
    last = make_niah_sample(style, 3000, 1.0, 0, tokenizer)
    assert last.prompt[last.needle_start:last.haystack_end] == NEEDLE.format(
        kind=value_kind(style), key=last.key, value=last.answer)
    if style == "uuid":
        assert extract_answer("uuid", sample.answer) == sample.answer
    else:
        assert sample.answer.isdigit() and len(sample.answer) == 7


def test_niah_scorer_is_exact_match_of_the_first_value():
    assert niah_correct("passkey", " 1234567.", "1234567")
    assert niah_correct("word", " is: 1234567\nWhat", "1234567")
    assert not niah_correct("word", " 12345678", "1234567")  # a longer number is not the value
    assert not niah_correct("word", " 7654321 or 1234567", "1234567")  # only the first value counts
    assert not niah_correct("word", " I do not know", "1234567")
    uuid = "0f8c2a1e-93b4-4c1d-8e2f-aa01bb02cc03"
    assert niah_correct("uuid", f" {uuid.upper()}.", uuid)
    assert not niah_correct("uuid", " 0f8c2a1e-93b4-4c1d-8e2f", uuid)


def test_eval_niah_writes_a_row_per_prompt_and_a_heatmap(checkpoint, tmp_path, capsys):
    out = tmp_path / "niah"
    assert main(["eval", str(checkpoint), "--niah", "--styles", "passkey", "uuid", "--contexts", "400", "500",
                 "--depths", "0", "1", "--out", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    rows = _read_csv(out / "niah.csv")
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert int(row["prompt_tokens"]) <= int(row["context"])
        assert row["correct"] == str(int(niah_correct(row["style"], row["generated"], row["answer"])))
    _assert_png(out / "niah.png")
    assert main(["eval", str(checkpoint), "--niah", "--styles", "uuid", "--contexts", "200", "--out", str(out)]) == 2
    assert "needs more than 200 tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lm-eval

TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{text}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "label", "target_delimiter": "", "metric_list": [{"metric": "acc"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "bits_per_byte"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{text}}", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6}, "metric_list": [{"metric": "exact_match"}]},
}
DOCS = [{"text": "The cat sat on the", "choices": [" mat", " moon"], "label": 0, "answer": "mat"},
        {"text": "One, two, three,", "choices": [" four", " banana"], "label": 0, "answer": "four"}]


def local_tasks(folder: Path) -> Path:
    """A folder of tiny lm-eval task YAMLs over one local JSONL file (nothing is downloaded)."""
    import yaml

    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.mark.slow  # importing lm_eval and datasets takes most of its ~9 s
def test_lm_eval_adapter_matches_the_model_on_a_local_task(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # set before datasets is imported: it reads them then
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from hybrid.evaluation.lm_eval_adapter import HybridEvalLM, run_lm_eval

    _, model, tokenizer = load_checkpoint(checkpoint)
    lm = HybridEvalLM(model=model, tokenizer=tokenizer, prefill_chunk=4)

    def request(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    context, continuation = "The cat sat on the", " mat"
    ids = tokenizer.encode(context + continuation)
    direct = -_direct_losses(model, ids)[-len(continuation):]
    ((logprob, greedy),) = lm.loglikelihood([request("loglikelihood", (context, continuation))])
    assert logprob == pytest.approx(float(direct.sum()), rel=1e-5)
    with torch.no_grad():
        argmax = model(torch.tensor([ids[:-1]])).logits[0, -len(continuation):].argmax(-1)
    assert greedy == bool((argmax == torch.tensor(ids[-len(continuation):])).all())

    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (TEXT,))])
    prefixed = [lm.prefix_token_id] + tokenizer.encode(TEXT)
    assert rolling == pytest.approx(-float(_direct_losses(model, prefixed).sum()), rel=1e-5)

    (generated,) = lm.generate_until([request("generate_until", ("One, two", {"until": ["e"], "max_gen_toks": 5}))])
    with torch.no_grad():
        out, greedy_text = tokenizer.encode("One, two"), ""
        for _ in range(5):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
            greedy_text = tokenizer.decode(out[len(tokenizer.encode("One, two")):])
            if "e" in greedy_text:
                break
    assert generated == greedy_text.split("e")[0]

    results = run_lm_eval(lm, list(TASKS), include_path=local_tasks(tmp_path))["results"]
    assert set(results) == set(TASKS)
    texts = [d["text"] for d in DOCS]
    nll = sum(float(_direct_losses(model, [lm.prefix_token_id] + tokenizer.encode(t)).sum()) for t in texts)
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        nll / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1 and 0 <= results["tiny_gen"]["exact_match,none"] <= 1


def test_library_plots_draw_on_their_own_figures():
    """No module switches matplotlib's backend or draws through pyplot's global state (a program that
    imports the toolkit keeps its own backend): plots are ``Figure`` objects on the Agg canvas."""
    root = Path(__file__).resolve().parents[1]
    modules = [p for package in ("blocks", "hybrid", "convert") for p in (root / package).rglob("*.py")]
    offending = [str(p.relative_to(root)) for p in modules
                 if "matplotlib.use(" in p.read_text() or "matplotlib.pyplot" in p.read_text()]
    assert len(modules) > 50 and not offending, offending
