"""Read a llama.cpp GGUF file as a Hugging Face-style teacher: config dict, HF-named tensors, tokenizer.json.

GGUF (the ``gguf`` package's ``GGUFReader``) holds the architecture as ``{arch}.*`` metadata, the
tensors under llama.cpp's names (``blk.{i}.attn_q.weight`` ...), possibly quantised, and the tokenizer
as ``tokenizer.ggml.*`` arrays. This module turns all three into what ``convert.teacher`` already
reads from a Hugging Face folder, so both formats share one mapping onto ``HybridLM``:

* ``gguf_config``: the metadata as a ``config.json``-style dict (``model_type``, ``hidden_size``, ...).
* ``gguf_tensors``: the tensors dequantised to fp32 torch tensors under their HF names, in HF layout.
  llama.cpp's converter *permutes* the rows of ``q_proj`` / ``k_proj`` of ``llama``-architecture
  models (its RoPE rotates adjacent pairs (2i, 2i+1), HF's ``rotate_half`` rotates (i, i + d/2)):
  within each head, HF row ``j*d/2 + i`` (j in {0, 1}) is stored at row ``2i + j``. We undo it
  (``unpermute_rope_rows``). ``qwen2`` / ``qwen3`` GGUFs use llama.cpp's NeoX RoPE, which is HF's
  layout, so they are stored unpermuted.
* ``gguf_tokenizer_json``: a ``tokenizers`` ``tokenizer.json`` built from the vocabulary, merges and
  token types, for byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with the
  pre-tokenizers listed in ``_PRE_TOKENIZERS``. SentencePiece-style vocabularies (``"llama"``) store
  scores instead of merges; ``tokenizers``' BPE needs merges, which would have to be re-derived from
  the scores, so those raise ``TeacherError`` (bring the original ``tokenizer.json`` instead).

Dequantisation is ``gguf.quants.dequantize`` (numpy): a 4-bit file becomes the fp32 model llama.cpp
would compute with, not the original bf16 one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from convert.errors import TeacherError

# GGUF architecture -> HF model_type, and whether llama.cpp permuted its q/k rows.
_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

# llama.cpp per-layer tensor names -> HF names (``{i}`` the layer).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}

# Byte-level BPE pre-tokenizers (``tokenizer.ggml.pre``) as ``tokenizers`` pre-tokenizer specs.
# llama.cpp's "smollm" splits every digit off (``\p{N}``) before the GPT-2 regex, as SmolLM's own
# tokenizer.json does with Digits(individual_digits) + ByteLevel.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "default": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are added tokens (special / not special)


def _reader(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise TeacherError("reading GGUF files needs the 'gguf' package: pip install gguf") from err
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"GGUF file {path} not found")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise TeacherError(f"{path} is not a readable GGUF file: {err}") from None


class GGUFTeacherFile:
    """One GGUF file opened (memory-mapped) once: its config, tensors and tokenizer on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _reader(path)
        self.fields = {name: field for name, field in self.reader.fields.items()}
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.value("general.architecture")
        if self.arch not in _ARCHS:
            raise TeacherError(f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                               f"(supported: {', '.join(_ARCHS)})")

    def value(self, key: str, default=None):
        """A metadata value (scalars and strings as Python values, arrays as lists)."""
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> dict:
        """The metadata as an HF ``config.json``-style dict (what ``convert.teacher`` reads)."""
        a = self.arch
        need = {"hidden_size": f"{a}.embedding_length", "num_hidden_layers": f"{a}.block_count",
                "intermediate_size": f"{a}.feed_forward_length", "num_attention_heads": f"{a}.attention.head_count"}
        missing = [key for key in need.values() if key not in self.fields]
        if missing:
            raise TeacherError(f"{self.path}: GGUF metadata lacks {', '.join(missing)}")
        config = {name: int(self.value(key)) for name, key in need.items()}
        config["model_type"] = _ARCHS[a][0]
        config["num_key_value_heads"] = int(self.value(f"{a}.attention.head_count_kv", config["num_attention_heads"]))
        head_dim = self.value(f"{a}.attention.key_length")
        if head_dim is not None:
            config["head_dim"] = int(head_dim)
        head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
        rope_dims = self.value(f"{a}.rope.dimension_count")
        if rope_dims is not None and int(rope_dims) != head_dim:
            raise TeacherError(f"{self.path}: partial RoPE ({a}.rope.dimension_count = {rope_dims} of head_dim "
                               f"{head_dim}) is not a {a} teacher this loader reproduces")
        config["rope_theta"] = float(self.value(f"{a}.rope.freq_base", 10000.0))
        scaling = self.value(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            config["rope_scaling"] = {"rope_type": scaling}
        if "rope_freqs.weight" in self.tensors:  # llama3-style frequency factors
            config["rope_scaling"] = {"rope_type": "llama3 (rope_freqs.weight)"}
        config["rms_norm_eps"] = float(self.value(f"{a}.attention.layer_norm_rms_epsilon", 1e-5))
        if "token_embd.weight" not in self.tensors:
            raise TeacherError(f"{self.path}: GGUF file has no token_embd.weight")
        config["vocab_size"] = int(self.tensors["token_embd.weight"].shape[-1])  # dims innermost first
        config["tie_word_embeddings"] = "output.weight" not in self.tensors
        window = self.value(f"{a}.attention.sliding_window")
        if window:
            config["sliding_window"] = int(window)
        if a == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        return config

    def hf_names(self) -> dict[str, str]:
        """HF name -> GGUF name of every tensor in the file; unknown GGUF tensors raise."""
        out, unknown = {}, []
        for name in self.tensors:
            if name in _GLOBAL_NAMES:
                out[_GLOBAL_NAMES[name]] = name
                continue
            parts = name.split(".", 2)
            if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
                out[f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"] = name
            elif name != "rope_freqs.weight":  # refused by config() as rope scaling
                unknown.append(name)
        if unknown:
            raise TeacherError(f"{self.path}: GGUF tensors this loader does not know: {', '.join(unknown[:10])}"
                               + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
        return out

    def load(self, hf_names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors (HF names), dequantised to fp32 and in HF layout."""
        from gguf.quants import dequantize

        config = self.config()
        permuted = _ARCHS[self.arch][1]
        by_hf = self.hf_names()
        out = {}
        for name in hf_names:
            t = self.tensors[by_hf[name]]
            try:
                array = dequantize(t.data, t.tensor_type)
            except NotImplementedError as err:
                raise TeacherError(f"{self.path}: tensor {t.name} is {t.tensor_type.name}: {err}") from None
            shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
            tensor = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy: the file is mmapped
            if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = unpermute_rope_rows(tensor, config["num_attention_heads"])
            elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = unpermute_rope_rows(tensor, config["num_key_value_heads"])
            out[name] = tensor
        return out

    def tokenizer_json(self) -> str | None:
        """A ``tokenizer.json`` text built from ``tokenizer.ggml.*``, or None when the file has no vocabulary."""
        if "tokenizer.ggml.tokens" not in self.fields:
            return None
        return build_tokenizer_json(
            model=self.value("tokenizer.ggml.model"), pre=self.value("tokenizer.ggml.pre", "default"),
            tokens=self.value("tokenizer.ggml.tokens"), merges=self.value("tokenizer.ggml.merges"),
            token_types=self.value("tokenizer.ggml.token_type"), where=str(self.path))


def permute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """HF layout -> llama.cpp layout of q/k rows (what llama.cpp's converter does); w: (n_heads*d, ...)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp layout -> HF layout (the inverse of ``permute_rope_rows``); w: (n_heads*d, ...)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_tokenizer_json(model: str | None, pre: str, tokens: list[str], merges: list[str] | None,
                         token_types: list[int] | None, where: str = "GGUF") -> str:
    """A byte-level BPE ``tokenizer.json`` (text) from GGUF tokenizer metadata.

    Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
    tokens, so ``encode`` never splits them and ``decode`` keeps their text."""
    from tokenizers import Tokenizer, decoders, models

    if model != "gpt2":
        raise TeacherError(f"{where}: tokenizer.ggml.model {model!r} is not byte-level BPE ('gpt2'); building a "
                           "tokenizer.json for it is not supported: pass the model's original tokenizer.json")
    if pre not in _PRE_TOKENIZERS:
        raise TeacherError(f"{where}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer this loader knows "
                           f"({', '.join(_PRE_TOKENIZERS)}); pass the model's original tokenizer.json")
    if not merges:
        raise TeacherError(f"{where}: a byte-level BPE vocabulary needs tokenizer.ggml.merges, which is missing")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception for inconsistent merges)
        raise TeacherError(f"{where}: the GGUF vocabulary and merges do not form a BPE model: {err}") from None
    tok.decoder = decoders.ByteLevel()
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = _PRE_TOKENIZERS[pre]
    types = token_types or [1] * len(tokens)
    spec["added_tokens"] = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind == _CONTROL}
        for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)]
    return json.dumps(spec, ensure_ascii=False)
