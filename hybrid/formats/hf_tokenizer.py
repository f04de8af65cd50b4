"""The tokenizer files transformers' ``AutoTokenizer`` reads: ``tokenizer.json`` and ``tokenizer_config.json``.

A ``tokenizer.json`` tokenizer is copied as it is. The byte tokenizer becomes a byte-level BPE with
no merges: GPT-2's byte-level alphabet (one printable character per byte, ``byte_level_alphabet``)
as its vocabulary, character i of the alphabet being id i, so text encodes to its UTF-8 bytes as ids
0..255 exactly as ``ByteTokenizer`` does, and decoding turns invalid UTF-8 into U+FFFD as it does.
It has no end-of-text token; byte 0 pads (``hybrid.formats.hf_config.pad_token_id``), and the newline
is its beginning-of-text token, which nothing adds to encoded text: tools that predict a text's first
token from one (lm-eval) start from a line break, as ``hybrid.evaluation.lm_eval_adapter`` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer as TokenizersTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hybrid.formats.hf_config import pad_token_id
from hybrid.formats.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def byte_level_alphabet() -> list[str]:
    """Character i stands for byte i (GPT-2's table, which the ByteLevel pre-tokenizer and decoder use):
    printable Latin-1 bytes stand for themselves, the others for U+0100 onwards, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def byte_tokenizer_json() -> TokenizersTokenizer:
    """``ByteTokenizer`` as a ``tokenizers`` tokenizer (see the module docstring)."""
    vocab = {char: byte for byte, char in enumerate(byte_level_alphabet())}
    tokenizer = TokenizersTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of ``tokenizer`` in ``folder``."""
    if isinstance(tokenizer, ByteTokenizer):
        files = byte_tokenizer_json()
        files.save(str(folder / TOKENIZER_FILE))
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, folder / TOKENIZER_FILE)
        files = TokenizersTokenizer.from_file(str(tokenizer.path))
    else:
        raise TokenizerError(f"{tokenizer!r} has no tokenizer.json form: only the byte tokenizer and tokenizer.json "
                             "tokenizers are exported")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                "pad_token": files.id_to_token(pad_token_id(tokenizer))}
    if tokenizer.eos_id is not None:
        settings["eos_token"] = files.id_to_token(tokenizer.eos_id)
    else:  # what texts start from, for tools that need one (lm-eval): the newline, as hybrid's own lm-eval model does
        settings["bos_token"] = files.id_to_token(tokenizer.encode("\n")[-1])
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=1) + "\n")
