"""Tokenizers: text <-> token ids, plus streaming decoders that never print half a character.

Two kinds, chosen by a recipe's ``tokenizer:`` section (see ``load_tokenizer``):

* ``{type: bytes}``: ``ByteTokenizer``, the 256 UTF-8 bytes. Built in, needs no file, fits any
  model with ``vocab_size >= 256``.
* ``{type: file, path: tokenizer.json}``: ``HFTokenizer``, a Hugging Face ``tokenizers`` file (BPE,
  WordPiece, Unigram, byte-level or byte-fallback). A relative path is read from the folder of the
  recipe or checkpoint. Optional ``eos: "<token>"`` names the end-of-sequence token when the file's
  special tokens do not make it obvious.

Streaming: a model emits one token at a time, but a character can span several tokens (a 3-byte
UTF-8 character is 3 byte tokens; byte-fallback and byte-level BPE split characters too). A
``StreamDecoder`` (``tokenizer.stream_decoder()``) takes ids one by one with ``push(id)`` and returns
only text that is final; ``flush()`` returns what is left at the end. The pieces join to
``decode(all ids)`` (for ids that are not valid text, the U+FFFD replacements may differ where
``decode`` itself is not local, as with byte-fallback runs: see ``HFStreamDecoder``).
"""

from __future__ import annotations

import codecs
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from blocks.errors import InputError

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
"""Special tokens taken as end-of-sequence, in this order, when the recipe names none."""


class TokenizerError(InputError):
    """A tokenizer that cannot be loaded or does not fit the model; the message says why and the fix."""


@runtime_checkable
class StreamDecoder(Protocol):
    """Incremental decoding: ``push`` ids one at a time, get only text that later ids cannot change."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """What the toolkit needs from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int | None  # end-of-sequence id (a natural stop token), None when there is none
    special_tokens: dict[str, int]  # special token text -> id

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...

    def save(self, folder: Path) -> dict:
        """Write the files this tokenizer needs into ``folder``; return its recipe ``tokenizer:`` spec."""
        ...


# ----------------------------------------------------------------------------- bytes

class ByteTokenizer:
    """Token i is byte i of the UTF-8 encoding. Decoding replaces invalid UTF-8 with U+FFFD."""

    vocab_size = 256
    eos_id = None
    special_tokens: ClassVar[dict[str, int]] = {}  # none: every id is a byte

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(_check_ids(ids, self.vocab_size)).decode("utf-8", errors="replace")

    def stream_decoder(self) -> ByteStreamDecoder:
        return ByteStreamDecoder()

    def save(self, folder: Path) -> dict:
        return {"type": "bytes"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class ByteStreamDecoder:
    """UTF-8 bytes in, whole characters out: a multi-byte character is held until its last byte."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes(_check_ids([token_id], 256)))

    def flush(self) -> str:
        """The bytes still held (an unfinished character becomes U+FFFD); the decoder starts afresh."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# ----------------------------------------------------------------------------- tokenizer.json

class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a ``tokenizer.json`` file.

    ``encode`` adds no special tokens (no BOS/EOS from the file's post-processor): the caller
    decides where sequences start and end. ``decode`` keeps special tokens' text, so nothing the
    model emits silently disappears.
    """

    def __init__(self, path: str | Path, eos: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} not found")
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception for unreadable files)
            raise TokenizerError(f"{self.path} is not a readable tokenizer.json: {err}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._eos_name = eos
        if eos is not None:
            self.eos_id = self._tok.token_to_id(eos)
            if self.eos_id is None:
                raise TokenizerError(f"{self.path}: eos token {eos!r} is not in the vocabulary "
                                     f"(special tokens: {sorted(self.special_tokens) or 'none'})")
        else:
            self.eos_id = next((self.special_tokens[n] for n in EOS_NAMES if n in self.special_tokens), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def stream_decoder(self) -> HFStreamDecoder:
        return HFStreamDecoder(self.decode)

    def save(self, folder: Path) -> dict:
        shutil.copyfile(self.path, Path(folder) / "tokenizer.json")
        spec = {"type": "file", "path": "tokenizer.json"}
        if self._eos_name is not None:
            spec["eos"] = self._eos_name
        return spec

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class HFStreamDecoder:
    """Streaming decode for any tokenizer whose decode of a token depends on its neighbours.

    Decoding ids one by one is wrong for byte-level / byte-fallback vocabularies (a character split
    over tokens) and for decoders that treat the first token of a string specially (SentencePiece's
    leading space). So this keeps a short tail of ids: ``prefix`` ids already printed (context only)
    followed by ids not yet printed. After each new id it decodes the whole tail and emits the text
    beyond what the prefix decodes to, unless that text ends in U+FFFD (a character still
    incomplete): then it waits for more ids. Once text is emitted, the tail restarts from the ids
    that produced it, so the work per token stays bounded.

    For valid text the pieces join to ``decode(all ids)``. For invalid byte sequences they may show
    fewer U+FFFD: the ByteFallback decoder turns a whole run of byte tokens into U+FFFD when any byte
    of the run is invalid, and a stream that has already printed part of the run cannot take it back.

    tokenizers' own ``DecodeStream`` follows the same scheme and prints the same pieces for text, but
    raises ("Invalid prefix") on such a run (tokenizers 0.23), which a sampling model can emit at any
    step, so this class stays (tests/test_tokenizer.py shows both).
    """

    def __init__(self, decode):
        self._decode = decode
        self._ids: list[int] = []  # the tail: ids[:self._printed] are context, the rest unprinted
        self._printed = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[:self._printed])
        text = self._decode(self._ids)
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""
        self._ids = self._ids[self._printed:]  # the ids just printed become the next context
        self._printed = len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held (an unfinished character stays U+FFFD); the decoder starts afresh."""
        text = self._decode(self._ids)[len(self._decode(self._ids[:self._printed])):]
        self._ids, self._printed = [], 0
        return text


# ----------------------------------------------------------------------------- from a recipe

def load_tokenizer(spec: dict, folder: str | Path | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer a recipe's ``tokenizer:`` section describes.

    ``folder``: where a relative ``path`` is read from (the recipe's or the checkpoint's folder;
    None: the current directory). ``vocab_size``: the model's; a tokenizer with more ids than the
    model has embeddings is an error.
    """
    check_spec(spec)
    kind = spec["type"]
    if kind == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        path = Path(spec["path"])
        if not path.is_absolute() and folder is not None:
            path = Path(folder) / path
        tokenizer = HFTokenizer(path, eos=spec.get("eos"))
    if vocab_size is not None:
        check_fits(tokenizer, vocab_size)
    return tokenizer


def check_spec(spec: object) -> None:
    """Raise ``TokenizerError`` unless ``spec`` is a valid ``tokenizer:`` section (its keys and their
    types; whether a file exists is ``load_tokenizer``'s to find)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise TokenizerError(f"tokenizer: must be a mapping like {{type: bytes}} or "
                             f"{{type: file, path: tokenizer.json}}, got {str(spec)[:60]}")
    kind = spec["type"]
    keys = {"bytes": {"type"}, "file": {"type", "path", "eos"}}
    if not isinstance(kind, str) or kind not in keys:
        raise TokenizerError(f"tokenizer.type: {str(kind)[:60]!r} is not a tokenizer type (use 'bytes' or 'file')")
    unknown = sorted(map(str, set(spec) - keys[kind]))
    if unknown:
        raise TokenizerError(f"tokenizer.{unknown[0]}: unknown key for a {kind!r} tokenizer "
                             f"(valid keys: {', '.join(sorted(keys[kind]))})")
    path = spec.get("path")
    if kind == "file" and not (isinstance(path, str) and path.strip() and "\0" not in path):
        raise TokenizerError("tokenizer.path: a 'file' tokenizer needs the path of its tokenizer.json")
    if not isinstance(spec.get("eos", ""), str):
        raise TokenizerError(f"tokenizer.eos: must be the text of the end-of-sequence token, got {spec['eos']!r}")


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise ``TokenizerError`` when the tokenizer can produce ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{tokenizer!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{vocab_size}: ids >= {vocab_size} would have no embedding. Raise model.vocab_size "
                             f"to at least {tokenizer.vocab_size} or use the tokenizer the model was trained with")


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {vocab_size}) "
                         "(a model with a larger, padded vocabulary sampled an id no text maps to)")
    return ids
