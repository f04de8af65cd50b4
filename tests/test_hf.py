"""hybrid.hf: checkpoints in Hugging Face transformers. ``import hybrid.hf`` loads checkpoint folders with
``AutoModelForCausalLM``; ``hybrid export-hf`` folders load in another process, from another directory,
with ``trust_remote_code=True``: logits equal the toolkit's, ``generate`` (greedy, batched prompts
left-padded) equals ``hybrid generate --temperature 0`` token for token, the tokenizer encodes as
ours. Converted models and imported published checkpoints export the same way. Bad exports are
refused with one error each and leave nothing behind."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as TokenizersTokenizer

from hybrid.cli.main import main
from hybrid.formats.atomic import process_umask
from hybrid.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hybrid.formats.tokenizer import ByteTokenizer
from hybrid.generation.generate import SamplingConfig, generate

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "To be", "What light through yonder", "To be"]  # lengths 16, 5, 24, 5
NEW_TOKENS = 12
EVERY_KIND = """extends: tiny/gdn_kvm_swa
model:
  layers: "DSAK"
  mixers:
    attention: {num_heads: 2, rope_partial_dim: 16}
"""  # recurrent (D), window (S), kv (A) and kvm (K) states in one model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoint folders: tiny/gla_kvm, a model with every state kind, a model converted from a tiny
    Llama teacher with a BPE tokenizer that has an end-of-text token, and the published-code fixture."""
    from test_convert import TINY, random_teacher_tensors, write_hf_folder

    from convert.init import convert_teacher
    from convert.teacher import load_teacher

    root = tmp_path_factory.mktemp("checkpoints")
    assert main(["init", "tiny/gla_kvm", str(root / "gla_kvm"), "--seed", "1"]) == 0
    (root / "every_kind.yaml").write_text(EVERY_KIND)
    assert main(["init", str(root / "every_kind.yaml"), str(root / "every_kind"), "--seed", "2"]) == 0
    teacher_dir = write_hf_folder(root / "teacher", TINY, random_teacher_tensors(TINY))
    _bpe_with_eos(teacher_dir / "tokenizer.json", TINY["vocab_size"])
    student, teacher, plan = convert_teacher(load_teacher(teacher_dir), "KGA", {"kvm": {"chunk_len": 8}})
    assert teacher.tokenizer is not None and teacher.tokenizer.eos_id is not None
    save_checkpoint(root / "converted", plan.student, student.eval(), teacher.tokenizer)
    assert main(["import-published", str(ROOT / "tests/fixtures/kvm_published_tiny"), str(root / "published")]) == 0
    return {name: root / name for name in ("gla_kvm", "every_kind", "converted", "published")}


def _bpe_with_eos(path: Path, vocab_size: int) -> None:
    tok = TokenizersTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time", "To be or not to be", "What light"] * 20, trainer)
    tok.save(str(path))


def _ours(folder: Path):
    _, model, tokenizer = load_checkpoint(folder)
    return model, tokenizer


def _ids(tokenizer, n: int = 40) -> list[list[int]]:
    text = "What light through yonder window breaks? It is the east. " * 2
    return [tokenizer.encode(text)[:n], tokenizer.encode(text[7:])[:n]]


# ----------------------------------------------------------------------------- in this process

def test_checkpoint_folders_load_with_auto_classes_after_import(checkpoints):
    import hybrid.hf
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("gla_kvm", "every_kind"):
        assert isinstance(AutoConfig.from_pretrained(checkpoints[name]), hybrid.hf.KVMHybridConfig)
        hf = AutoModelForCausalLM.from_pretrained(checkpoints[name])
        model, tokenizer = _ours(checkpoints[name])
        ids = torch.tensor(_ids(tokenizer))
        with torch.no_grad():
            assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-5
            loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            assert hf(ids, labels=ids).loss.item() == pytest.approx(loss.item(), rel=1e-5)
        rope = [m for m in hf.modules() if type(m).__name__ == "RotaryEmbedding"]
        assert rope and all(torch.isfinite(m.inv_freq).all() and m.inv_freq.max() == 1 for m in rope)


def test_the_cache_carries_every_layers_state_in_pieces_and_rows(checkpoints):
    import hybrid.hf

    hf = hybrid.hf.KVMHybridForCausalLM.from_pretrained(checkpoints["every_kind"])
    model, tokenizer = _ours(checkpoints["every_kind"])
    ids = torch.tensor(_ids(tokenizer, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = hybrid.hf.HybridCache()
        pieces = [hf(ids[:, a:b], cache=cache).logits for a, b in ((0, 11), (11, 12), (12, 30))]
        assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5
        assert cache.get_seq_length() == 30 and cache.tokens_by_row() == [30, 30]
        (group,) = cache.groups
        assert [layer.kind for layer in group.state.layers] == ["recurrent", "window", "kv", "kvm"]
        cache.reorder_cache(torch.tensor([1, 1, 0]))  # as beam search reorders rows
        step = torch.tensor([[5], [6], [7]])
        expected = model(step, model(ids).state.select([1, 1, 0])).logits
        assert (hf(step, cache=cache).logits - expected).abs().max() <= 1e-5


def test_padding_that_a_state_cannot_skip_is_refused(checkpoints):
    import hybrid.hf
    from transformers import DynamicCache

    hf = hybrid.hf.KVMHybridForCausalLM.from_pretrained(checkpoints["gla_kvm"])
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="left padding"):
        hf(ids, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))  # right padding
    cache = hybrid.hf.HybridCache()
    hf(ids, cache=cache)
    with pytest.raises(ValueError, match="only the first forward"):
        hf(ids[:, :1], attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), cache=cache)
    with pytest.raises(TypeError, match="HybridCache"):
        hf(ids, cache=DynamicCache())
    with pytest.raises(NotImplementedError, match="cannot go back"):
        cache.crop(2)


# ----------------------------------------------------------------------------- exported, in another process

LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs, out = json.loads(sys.argv[1]), {}
for name, job in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(job["folder"])
    tok.padding_side = "left"
    with torch.no_grad():
        logits = model(torch.tensor(job["ids"])).logits
    batch = tok(job["prompts"], return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=job["new_tokens"], do_sample=False)
    width = batch["input_ids"].shape[1]
    out[name] = {"class": type(model).__module__, "logits": logits.tolist(),
                 "encoded": [tok(p)["input_ids"] for p in job["prompts"]],
                 "generated": [row[width:] for row in generated.tolist()]}
print(json.dumps(out))
"""


def _load_elsewhere(jobs: dict, tmp_path: Path) -> dict:
    """Run LOADER in a fresh interpreter in an empty directory (the toolkit on its path as if installed)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli_greedy(folder: Path, prompt: str, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", prompt, "--temperature", "0", "--no-eos-stop",
                 "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.slow  # a fresh interpreter importing torch and transformers, four models
def test_exported_folders_load_elsewhere_with_our_logits_and_greedy_tokens(checkpoints, tmp_path, capsys):
    jobs, expected = {}, {}
    for name, folder in checkpoints.items():
        out = tmp_path / "exported" / name
        assert main(["export-hf", str(folder), str(out)]) == 0
        model, tokenizer = _ours(folder)
        ids = _ids(tokenizer, 24)
        jobs[name] = {"folder": str(out), "ids": ids, "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
        stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
        with torch.no_grad():
            expected[name] = {"logits": model(torch.tensor(ids)).logits, "tokens": [
                generate(model, [tokenizer.encode(p)], SamplingConfig(temperature=0, max_new_tokens=NEW_TOKENS,
                                                                      stop_tokens=stop)).tokens[0] for p in PROMPTS]}
            expected[name]["encoded"] = [tokenizer.encode(p) for p in PROMPTS]
    loaded = _load_elsewhere(jobs, tmp_path)
    for name, got in loaded.items():
        assert got["class"].startswith("transformers_modules") or got["class"] == "hybrid.hf.modeling"
        assert (torch.tensor(got["logits"]) - expected[name]["logits"]).abs().max() <= 1e-5, name
        assert got["encoded"] == expected[name]["encoded"], name
        tokens = expected[name]["tokens"]  # a row that stopped at the end-of-text token is padded after it
        assert [row[:len(t)] for row, t in zip(got["generated"], tokens)] == tokens, name
    gla_kvm = _ours(checkpoints["gla_kvm"])[1]
    for prompt, tokens in zip(PROMPTS, loaded["gla_kvm"]["generated"]):  # the command line, token for token
        assert gla_kvm.decode(tokens) == _cli_greedy(checkpoints["gla_kvm"], prompt, capsys)


def test_the_exported_folder_holds_what_transformers_reads(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert main(["export-hf", str(checkpoints["gla_kvm"]), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "modeling_kvm_hybrid.py",
                                                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kvm_hybrid" and config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_kvm_hybrid.KVMHybridForCausalLM"
    mask = process_umask()  # readable as a plain mkdir and open would have made them
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in out.iterdir())
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "héllo wörld: 日本語 🙂\n\x00"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)
    broken = [0x61, 0xE6, 0x97, 0x62, 0xFF, 0xC3]
    assert tokenizer.decode(broken) == ByteTokenizer().decode(broken)


# ----------------------------------------------------------------------------- refusals

def test_bad_exports_are_refused_and_leave_nothing(checkpoints, tmp_path, capsys, monkeypatch):
    def refused(*args) -> str:
        capsys.readouterr()
        assert main(["export-hf", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err  # one line
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # nothing written, no temp folder
        return err

    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    before = [p.name for p in tmp_path.iterdir()]
    assert "is not a checkpoint" in refused(tmp_path / "not_a_checkpoint", tmp_path / "out")
    assert "already exists and is not empty" in refused(checkpoints["gla_kvm"], tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"

    from blocks.gla import GatedLinearAttention

    monkeypatch.setattr(GatedLinearAttention, "__module__", "my_plugin.mixers")  # a mixer from outside the toolkit
    assert "has no transformers equivalent" in refused(checkpoints["gla_kvm"], tmp_path / "out")
    monkeypatch.undo()

    import hybrid.hf.export

    def fail(*args):
        raise CheckpointError("the disk is full")

    monkeypatch.setattr(hybrid.hf.export, "write_hf_tokenizer", fail)  # a failure halfway through writing
    assert "the disk is full" in refused(checkpoints["gla_kvm"], tmp_path / "out")
