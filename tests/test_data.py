"""Training data (hybrid/training/data.py): sources of each kind and their errors, the token cache (reuse
without re-tokenizing, rebuild on change, dtype), the train/val split, packed batches (shapes, the
target shift, determinism, ranks that split the single-process batch, epoch reshuffles), eval
batches, where documents start (recorded in the cache, carried by the batches, their first tokens not
predicted), and the built-in corpus. Every input is written to a temporary folder here."""

import json
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from hybrid.formats.tokenizer import ByteTokenizer, HFTokenizer
from hybrid.training.data import (
    DataError,
    Document,
    PackedBatches,
    TokenFile,
    build_token_cache,
    builtin_corpus,
    find_documents,
    IGNORE,
    iterate_eval_batches,
    num_eval_batches,
    split_document_starts,
    split_train_val,
    token_dtype,
)


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, counting ``encode`` calls: proves whether a build tokenized anything."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


def word_tokenizer(tmp_path, vocab_size: int) -> HFTokenizer:
    """A whitespace word-level tokenizer.json: ``w0``..``w{n}`` are ids 0..n, then ``</s>`` (the eos)."""
    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, "</s>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    path = tmp_path / f"words{vocab_size}.json"
    tok.save(str(path))
    return HFTokenizer(path)


@pytest.fixture
def corpus(tmp_path):
    """A folder with a text file, a Markdown file in a subfolder, a JSONL file and a file to ignore."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Second file.\n", encoding="utf-8")
    (root / "sub" / "a.md").write_text("# Héading\n", encoding="utf-8")
    (root / "c.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    (root / "notes.csv").write_text("ignored,file\n")
    return root


# ----------------------------------------------------------------------------- sources

def test_find_documents_reads_each_kind_in_sorted_order(corpus):
    docs = find_documents([corpus])
    assert docs == [
        Document(str(corpus / "b.txt"), "Second file.\n"),
        Document(f"{corpus / 'c.jsonl'}:1", "one"),
        Document(f"{corpus / 'c.jsonl'}:3", "two"),  # the blank line 2 is skipped
        Document(str(corpus / "sub" / "a.md"), "# Héading\n"),
    ]
    # Files named directly come in the order given; a JSONL file's text can sit under another key.
    (corpus / "d.jsonl").write_text('{"body": "x"}\n')
    docs = find_documents([corpus / "sub" / "a.md", str(corpus / "d.jsonl")], text_field="body")
    assert [d.text for d in docs] == ["# Héading\n", "x"]


def test_find_documents_errors(tmp_path, corpus):
    with pytest.raises(DataError, match="no data sources"):
        find_documents([])
    with pytest.raises(DataError, match="does not exist"):
        find_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no .txt, .md, .jsonl, .parquet files"):
        find_documents([tmp_path / "empty"])
    with pytest.raises(DataError, match="unsupported type '.csv'"):
        find_documents([corpus / "notes.csv"])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        find_documents([tmp_path / "latin1.txt"])
    bad = tmp_path / "bad.jsonl"
    for content, message in [('{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not a JSON object"),
                             ('["text"]\n', "bad.jsonl:1: expected a JSON object, got list"),
                             ('{"body": "x"}\n', "bad.jsonl:1: no 'text' field \\(fields: body\\)"),
                             ('{"text": 3}\n', "bad.jsonl:1: field 'text' is int, not a string")]:
        bad.write_text(content)
        with pytest.raises(DataError, match=message):
            find_documents([bad])


TABLE = ["first row", "sécond row 日本", "third"]


def test_parquet_and_saved_datasets_read_like_jsonl_through_the_same_cache(tmp_path):
    """One document per row of the text column, in order; tokens equal those of the same texts as JSONL,
    cached by content (a second build tokenizes nothing)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    pq.write_table(pa.table({"body": TABLE, "n": [1, 2, 3]}), tmp_path / "rows.parquet")
    datasets.Dataset.from_dict({"body": TABLE, "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TABLE))
    for source in ("rows.parquet", "saved"):
        docs = find_documents([tmp_path / source], text_field="body")
        assert [d.text for d in docs] == TABLE and docs[1].source == f"{tmp_path / source}[1]"
        tokenizer = CountingTokenizer()
        tokens = build_token_cache([tmp_path / source], tokenizer, tmp_path / "cache", text_field="body",
                                   progress=False)
        jsonl = build_token_cache([tmp_path / "rows.jsonl"], ByteTokenizer(), tmp_path / "cache", text_field="body",
                                  progress=False)
        assert np.array_equal(np.asarray(tokens), np.asarray(jsonl)) and tokens.key != jsonl.key
        calls = tokenizer.calls
        assert build_token_cache([tmp_path / source], tokenizer, tmp_path / "cache", text_field="body",
                                 progress=False).key == tokens.key and tokenizer.calls == calls
    assert [d.text for d in find_documents([tmp_path], text_field="body")][-3:] == TABLE  # a folder's Parquet files


def test_parquet_and_saved_dataset_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    pq.write_table(pa.table({"body": ["a", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\)"):
        find_documents([tmp_path / "nulls.parquet"])
    with pytest.raises(DataError, match=r"nulls.parquet\[1\]: column 'body' holds NoneType"):
        find_documents([tmp_path / "nulls.parquet"], text_field="body")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        find_documents([tmp_path / "bad.parquet"])
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["y"]})})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match="DatasetDict with the splits test, train: name the folder of the split"):
        find_documents([tmp_path / "splits"])
    assert [d.text for d in find_documents([tmp_path / "splits" / "train"])] == ["x"]
    with pytest.raises(DataError, match="no column 'body'"):
        find_documents([tmp_path / "splits" / "test"], text_field="body")


# ----------------------------------------------------------------------------- the token cache

def test_cache_is_reused_without_tokenizing_and_rebuilt_on_change(tmp_path, corpus):
    tok = CountingTokenizer()
    first = build_token_cache([corpus], tok, tmp_path / "cache", progress=False)
    assert tok.calls == 4  # one encode per document
    expected = b"".join(d.text.encode() for d in find_documents([corpus]))  # no eos: bytes just follow
    assert first.tokens.tobytes() == np.frombuffer(expected, np.uint8).astype(np.uint16).tobytes()
    assert first.dtype == np.uint16 and len(first) == len(expected) == first.meta["num_tokens"]
    assert isinstance(first.tokens, np.memmap) and np.asarray(first).shape == (len(expected),)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{first.key}.{suffix}"
                                                                      for suffix in ("docs", "json", "tokens")]

    meta = json.loads((tmp_path / "cache" / f"{first.key}.json").read_text())
    source = meta["sources"][0]
    assert source["path"] == str((corpus / "b.txt").resolve()) and source["size"] == 13
    assert source["mtime"] == os.stat(corpus / "b.txt").st_mtime and len(source["sha256"]) == 64
    assert meta["tokenizer"] == {"type": "CountingTokenizer", "hash": "bytes", "vocab_size": 256, "eos_id": None}
    assert meta["dtype"] == "uint16" and meta["num_documents"] == 4

    # Same inputs: the cached file, nothing tokenized, even after the files were touched.
    os.utime(corpus / "b.txt", (1, 1))
    again = build_token_cache([corpus], tok, tmp_path / "cache", progress=False)
    assert tok.calls == 4 and again.path == first.path

    # A changed file is a new key, tokenized afresh; the old cache stays valid for the old contents.
    (corpus / "b.txt").write_text("Changed.\n")
    changed = build_token_cache([corpus], tok, tmp_path / "cache", progress=False)
    assert tok.calls == 8 and changed.key != first.key and len(changed) == len(first) - 4

    # Another tokenizer, or other options, is another key too.
    words = build_token_cache([corpus], word_tokenizer(tmp_path, 100), tmp_path / "cache", progress=False)
    no_eos = build_token_cache([corpus], word_tokenizer(tmp_path, 100), tmp_path / "cache", progress=False,
                               append_eos=False)
    assert len({changed.key, words.key, no_eos.key}) == 3


def test_cache_records_where_documents_start_and_an_older_cache_gains_it(tmp_path, corpus):
    """Documents without tokens (an empty JSONL text, no eos) start nowhere; a cache written before the
    offsets were recorded is tokenized again, into the same key, with the same tokens."""
    with open(corpus / "c.jsonl", "a") as f:
        f.write('{"text": ""}\n')
    tok = CountingTokenizer()
    first = build_token_cache([corpus], tok, tmp_path / "cache", progress=False)
    lengths = [len(d.text.encode()) for d in find_documents([corpus])]
    assert lengths[-2] == 0 and tok.calls == len(lengths) == 5
    ends = np.cumsum(lengths)
    assert first.document_starts.tolist() == [int(e - n) for e, n in zip(ends, lengths) if n]
    assert first.meta["num_document_starts"] == 4 and isinstance(first.document_starts, np.memmap)

    meta_path = first.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["num_document_starts"]
    meta_path.write_text(json.dumps(meta))
    first.path.with_suffix(".docs").unlink()
    assert TokenFile(first.path).document_starts is None  # an older cache still reads
    again = build_token_cache([corpus], tok, tmp_path / "cache", progress=False)
    assert tok.calls == 10 and again.path == first.path and again.tokens.tobytes() == first.tokens.tobytes()
    assert again.document_starts.tolist() == first.document_starts.tolist()
    assert build_token_cache([corpus], tok, tmp_path / "cache", progress=False).document_starts is not None
    assert tok.calls == 10

    first.path.with_suffix(".docs").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match=r"document offsets .*\.docs are missing or not the 4"):
        TokenFile(first.path)


def test_documents_end_with_eos_and_large_vocabularies_use_uint32(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w70000 w2")
    (tmp_path / "b.txt").write_text("w3")
    tok = word_tokenizer(tmp_path, 70_002)
    assert tok.eos_id == 70_001
    tokens = build_token_cache([tmp_path / "a.txt", tmp_path / "b.txt"], tok, tmp_path / "cache", progress=False)
    assert tokens.dtype == np.uint32 and tokens.tokens.tolist() == [1, 70_000, 2, 70_001, 3, 70_001]
    plain = build_token_cache([tmp_path / "a.txt", tmp_path / "b.txt"], tok, tmp_path / "cache",
                              progress=False, append_eos=False)
    assert plain.tokens.tolist() == [1, 70_000, 2, 3]
    assert token_dtype(256) == token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_cache_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="hold no text"):
        build_token_cache([tmp_path / "empty.txt"], ByteTokenizer(), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial files left behind
    (tmp_path / "a.txt").write_text("abc")
    tokens = build_token_cache([tmp_path / "a.txt"], ByteTokenizer(), tmp_path / "cache", progress=False)
    with open(tokens.path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"delete \w+\.\* in .* to rebuild"):
        TokenFile(tokens.path)


# ----------------------------------------------------------------------------- split and batches

def test_split_train_val_keeps_the_last_whole_windows():
    tokens = np.arange(105)
    train, val = split_train_val(tokens, 0.25, seq_len=9)  # 10 windows of 10 tokens, 5 tokens over
    assert val.tolist() == list(range(85, 105)) and train.tolist() == list(range(85))
    assert split_train_val(tokens, 0.01, 9)[1].tolist() == list(range(95, 105))  # at least one window
    train, val = split_train_val(tokens, 0.0, 9)
    assert len(val) == 0 and len(train) == 105
    with pytest.raises(DataError, match="too few to keep"):
        split_train_val(np.arange(15), 0.5, 9)
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\)"):
        split_train_val(tokens, 1.0, 9)


def window_ids(inputs: torch.Tensor, seq_len: int) -> list[int]:
    """Which window each row is, for token stream ``arange``: window i starts at i * (seq_len + 1)."""
    return (inputs[:, 0] // (seq_len + 1)).tolist()


def windows_seen(data: PackedBatches, steps: range) -> list[int]:
    """The windows of batches ``steps``, in order (token stream ``arange``)."""
    return [w for step in steps for w in window_ids(data.batch(step)[0], data.seq_len)]


def test_batches_are_shifted_windows_and_a_pure_function_of_the_step():
    seq_len, tokens = 7, np.arange(8 * 50 + 3)  # 50 windows, 3 tokens left over
    data = PackedBatches(tokens, seq_len, batch_size=4, seed=1)
    assert data.num_windows == 50 and data.steps_per_epoch == 12
    inputs, targets = data.batch(5)
    assert inputs.shape == targets.shape == (4, 7) and inputs.dtype == targets.dtype == torch.long
    starts = inputs[:, :1]
    assert torch.equal(inputs, starts + torch.arange(7)) and torch.equal(targets, inputs + 1)
    assert all(s % 8 == 0 for s in starts.flatten().tolist())  # whole, non-overlapping windows

    other = PackedBatches(tokens, seq_len, batch_size=4, seed=1)
    for step in (7, 0, 5, 30):  # any order: no hidden iterator state
        assert torch.equal(other.batch(step)[0], data.batch(step)[0])
    reseeded = PackedBatches(tokens, seq_len, batch_size=4, seed=2)
    assert not all(torch.equal(reseeded.batch(s)[0], data.batch(s)[0]) for s in range(3))


def test_ranks_split_the_single_process_batch():
    seq_len, tokens = 5, np.arange(6 * 37)
    single = PackedBatches(tokens, seq_len, batch_size=6, seed=3)
    ranks = [PackedBatches(tokens, seq_len, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    for step in range(20):  # 37 windows, 6 a step: batches straddle epochs
        for part in (0, 1):
            joined = torch.cat([rank.batch(step)[part] for rank in ranks])
            assert torch.equal(joined, single.batch(step)[part])


def test_every_epoch_visits_every_window_once_in_a_new_order():
    seq_len, tokens = 3, np.arange(4 * 12)
    data = PackedBatches(tokens, seq_len, batch_size=4, seed=0)
    epochs = [windows_seen(data, range(e * 3, e * 3 + 3)) for e in range(3)]
    assert all(sorted(order) == list(range(12)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert [data.epoch(s) for s in (0, 2, 3, 8, 9)] == [0, 0, 1, 2, 3]
    # With 10 windows and 4 a step, step 2 holds the last two windows of epoch 0 and two of epoch 1.
    data = PackedBatches(np.arange(40), seq_len, batch_size=4, seed=0)
    stream = windows_seen(data, range(5))
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10)) and data.epoch(2) == 0


def test_batch_errors():
    with pytest.raises(DataError, match=r"fewer than one global batch of 8 .* needs at least 64 tokens"):
        PackedBatches(np.arange(60), seq_len=7, batch_size=4, seed=0, world_size=2)
    with pytest.raises(DataError, match="rank must be in"):
        PackedBatches(np.arange(100), seq_len=7, batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        PackedBatches(np.arange(100), seq_len=7, batch_size=1, seed=-1)
    with pytest.raises(DataError, match="step must be a non-negative integer"):
        PackedBatches(np.arange(100), seq_len=7, batch_size=1, seed=0).batch(-1)


def check_document_batch(batch, document_starts, seq_len: int) -> None:
    """A batch of the token stream ``arange`` with ``document_starts``: its starts mark exactly the
    documents' first tokens (and column 0), and exactly the targets that begin a document take no loss."""
    inputs, targets, starts = batch
    offsets = set(document_starts.tolist())
    assert starts.dtype == torch.bool and starts.shape == inputs.shape == targets.shape
    for row in range(inputs.shape[0]):
        first = int(inputs[row, 0])
        assert first % (seq_len + 1) == 0  # a whole window: its tokens are first, first + 1, ...
        assert starts[row].tolist() == [j == 0 or first + j in offsets for j in range(seq_len)]
        expected = [IGNORE if first + j + 1 in offsets else first + j + 1 for j in range(seq_len)]
        assert targets[row].tolist() == expected and torch.equal(inputs[row], first + torch.arange(seq_len))


def test_batches_say_where_documents_start_and_skip_predicting_their_first_token():
    seq_len, tokens = 7, np.arange(8 * 50 + 3)
    document_starts = np.unique(np.r_[0, np.random.default_rng(0).integers(1, len(tokens), 90), 8, 9, 16])
    data = PackedBatches(tokens, seq_len, batch_size=4, seed=1, document_starts=document_starts)
    plain = PackedBatches(tokens, seq_len, batch_size=4, seed=1)
    for step in (0, 5, 30):
        batch = data.batch(step)
        check_document_batch(batch, document_starts, seq_len)
        assert torch.equal(batch[0], plain.batch(step)[0])  # the same windows as without documents
    again = PackedBatches(tokens, seq_len, batch_size=4, seed=1, document_starts=document_starts)
    assert all(torch.equal(a, b) for a, b in zip(again.batch(5), data.batch(5)))  # a pure function of the step
    ranks = [PackedBatches(tokens, seq_len, batch_size=2, seed=1, rank=r, world_size=2,
                           document_starts=document_starts) for r in range(2)]
    for part in range(3):
        assert torch.equal(torch.cat([rank.batch(9)[part] for rank in ranks]), data.batch(9)[part])
    with pytest.raises(DataError, match="document starts must be increasing token offsets"):
        PackedBatches(tokens, seq_len, batch_size=4, seed=1, document_starts=np.array([0, 5, 5]))

    evaluation = list(iterate_eval_batches(tokens, seq_len, 16, document_starts))
    assert [len(b) for b in evaluation] == [3] * 4
    check_document_batch([torch.cat(parts) for parts in zip(*evaluation)], document_starts, seq_len)

    train, val = split_train_val(tokens, 0.2, seq_len)
    train_starts, val_starts = split_document_starts(document_starts, len(train))
    assert train_starts.tolist() == [s for s in document_starts.tolist() if s < len(train)]
    assert (val_starts + len(train)).tolist() == [s for s in document_starts.tolist() if s >= len(train)]


def test_eval_batches_cover_every_window_in_order():
    seq_len, tokens = 4, np.arange(5 * 7 + 2)
    batches = list(iterate_eval_batches(tokens, seq_len, batch_size=3))
    assert [tuple(b[0].shape) for b in batches] == [(3, 4), (3, 4), (1, 4)]
    assert num_eval_batches(tokens, seq_len, 3) == 3
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert window_ids(inputs, seq_len) == list(range(7)) and torch.equal(targets, inputs + 1)
    assert list(iterate_eval_batches(np.arange(4), seq_len, 3)) == [] and num_eval_batches(np.arange(4), 4, 3) == 0


# ----------------------------------------------------------------------------- the built-in corpus

def test_builtin_corpus_is_english_prose(tmp_path):
    try:
        folder = builtin_corpus()
    except DataError as err:
        pytest.skip(f"built-in corpus not installed: {err}")
    docs = find_documents([folder])
    assert len(docs) == 38 and any(d.source.endswith("hamlet.md") for d in docs)
    text = "\n".join(d.text for d in docs)
    assert len(text.encode()) > 5_000_000
    words = text.lower().split()
    for word in ("the", "and", "of", "to", "love", "king"):
        assert words.count(word) > 500, word
    assert "To be, or not to be" in text
    tokens = build_token_cache([folder], ByteTokenizer(), tmp_path, progress=False)
    assert len(tokens) == len(text.encode()) - len(docs) + 1  # the joining newlines are not in the stream
