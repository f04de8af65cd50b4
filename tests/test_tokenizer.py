"""Tokenizers (hybrid/formats/tokenizer.py): round trips, streaming decode that never splits a character,
and loading from a recipe's ``tokenizer:`` section. The Hugging Face tokenizers are built here and
saved to a temporary tokenizer.json (nothing is downloaded)."""

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from hybrid.formats.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    check_fits,
    load_tokenizer,
)

TEXT = "héllo wörld: 日本語 ok 🙂!"


def stream(tokenizer, ids: list[int]) -> list[str]:
    """The pieces a streaming decoder prints for ids, the final flush included."""
    decoder = tokenizer.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_bytes_round_trip_and_streaming():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode()) > len(TEXT) and tok.decode(ids) == TEXT
    pieces = stream(tok, ids)
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)  # no half character was ever printed
    assert pieces[:3] == ["h", "", "é"]  # é is two bytes: printed once, on its second
    assert tok.vocab_size == 256 and tok.eos_id is None and tok.special_tokens == {}


def test_bytes_invalid_utf8_is_replaced_the_same_way_streamed():
    tok = ByteTokenizer()
    broken = [0x61, 0xE6, 0x97, 0x62, 0xFF, 0xC3]  # 'a', a cut 3-byte char, 'b', an invalid byte, a dangling lead
    expected = bytes(broken).decode("utf-8", errors="replace")
    assert tok.decode(broken) == expected == "a\ufffdb\ufffd\ufffd"
    assert "".join(stream(tok, broken)) == expected
    with pytest.raises(ValueError, match="outside"):
        tok.decode([256])


def byte_level_bpe(folder):
    """A GPT-2 style byte-level BPE trained on a few lines: characters split over tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["héllo wörld", "hello world 日本", "ok"] * 5, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def byte_fallback_bpe(folder):
    """A Llama style BPE: '▁' for spaces, merges, unknown characters as <0xXX> byte tokens, and a
    decoder that strips the leading space of whatever it decodes first."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "k", ":", "!", "ll", "llo", "▁w"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("l", "l"), ("ll", "o"), ("▁", "w")], unk_token="<unk>",
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("build", [byte_level_bpe, byte_fallback_bpe])
def test_hf_round_trip_and_streaming(tmp_path, build):
    build(tmp_path)
    tok = load_tokenizer({"type": "file", "path": "tokenizer.json"}, tmp_path)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    one_by_one = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in one_by_one)  # characters really are split over tokens
    assert "".join(one_by_one) != TEXT  # so decoding token by token is wrong
    pieces = stream(tok, ids)
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)
    assert sum(1 for p in pieces if p) > len(TEXT) // 3  # it streams, rather than printing at the end


def test_hf_special_tokens_and_eos(tmp_path):
    byte_level_bpe(tmp_path)
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    eos = tok.special_tokens["<|endoftext|>"]
    assert tok.eos_id == eos
    assert tok.decode(tok.encode("ok") + [eos]) == "ok<|endoftext|>"  # special tokens stay visible
    assert "<|endoftext|>" not in tok.decode(tok.encode("ok"))  # and encode adds none
    assert load_tokenizer({"type": "file", "path": str(tmp_path / "tokenizer.json"), "eos": "ok"}).eos_id == \
        tok.encode("ok")[0]


def test_wordlevel(tmp_path):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer({"type": "file", "path": "tokenizer.json"}, tmp_path)
    assert loaded.encode("the cat sat") == [1, 2, 3]
    assert loaded.decode([1, 2, 3]) == "".join(stream(loaded, [1, 2, 3])) == "the cat sat"
    assert loaded.eos_id is None and loaded.vocab_size == 4


def test_load_errors(tmp_path):
    assert isinstance(load_tokenizer({"type": "bytes"}, vocab_size=256), ByteTokenizer)
    with pytest.raises(TokenizerError, match="256 tokens but the model's vocab_size is 100"):
        load_tokenizer({"type": "bytes"}, vocab_size=100)
    byte_level_bpe(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size is 256"):
        check_fits(HFTokenizer(tmp_path / "tokenizer.json"), 256)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer({"type": "file", "path": "nope.json"}, tmp_path)
    with pytest.raises(TokenizerError, match="not a tokenizer type"):
        load_tokenizer({"type": "sentencepiece"})
    with pytest.raises(TokenizerError, match="unknown key"):
        load_tokenizer({"type": "bytes", "path": "x"})
    with pytest.raises(TokenizerError, match="eos token 'nope' is not in the vocabulary"):
        load_tokenizer({"type": "file", "path": "tokenizer.json", "eos": "nope"}, tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer({"type": "file", "path": "bad.json"}, tmp_path)


@pytest.mark.parametrize("build", [byte_level_bpe, byte_fallback_bpe])
def test_the_stream_decoder_prints_what_tokenizers_decode_stream_prints_and_survives_broken_runs(tmp_path, build):
    """Why ``HFStreamDecoder`` is not tokenizers' ``DecodeStream``: on text with multi-byte characters
    both print the same pieces, token for token; but where a byte-fallback run turns invalid after part
    of it was printed, ``DecodeStream`` (tokenizers 0.23) raises 'Invalid prefix' and ours goes on."""
    from tokenizers.decoders import DecodeStream

    build(tmp_path)
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = tok.encode(TEXT)
    library = DecodeStream(skip_special_tokens=False)
    assert [library.step(raw, i) or "" for i in ids] == stream(tok, ids)[:-1]
    vocab = raw.get_vocab()
    if build is byte_fallback_bpe:  # é as two bytes, then an invalid byte in the same run, then 'h'
        broken = [vocab["<0xC3>"], vocab["<0xA9>"], vocab["<0xFF>"], vocab["h"]]
        library = DecodeStream(skip_special_tokens=False)
        with pytest.raises(Exception, match="Invalid prefix"):
            [library.step(raw, i) for i in broken]
        assert "".join(stream(tok, broken)) == "é\ufffd\ufffdh"  # é printed before the run broke
