"""The decoding state of a whole model: one entry per layer, each of its own kind.

``ModelState.layers[i]`` is layer i's mixer state (a ``blocks.state.LayerState``: recurrent
matrices, KVM slots and window, KV caches); ``mlp_tails[i]`` is the last MLP input when the block
uses token shift. Everything batch-first, so ``select`` reorders or drops rows for all layers at
once. ``save``/``load`` go through safetensors with a format version, the model's architecture
fingerprint, the identity of the weights it was made with (their content hash, see
``hybrid.formats.integrity``) and the content hash of the state itself: loading refuses corrupted
bytes, non-finite values, another architecture and, when the caller names the weights it will
continue with, other weights (the same recipe trained further, or another seed). A state saved
without a record of its weights (by an older version) is refused where weights are named.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from blocks.state import LayerState, StateError
from hybrid.formats.atomic import save_safetensors
from hybrid.formats.integrity import first_nonfinite, short, tensors_sha256

FORMAT = "kvm-hybrid-state"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ModelState:
    """Per-layer states of a model after ``seq_len`` tokens (the same count for every layer)."""

    layers: list[LayerState]
    mlp_tails: list[Tensor | None]
    seq_len: int

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def nbytes(self) -> int:
        return sum(self.bytes_by_kind().values())

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes per state kind (``recurrent``, ``kvm``, ``window``, ``kv``); MLP token-shift tails count
        as ``recurrent`` (fixed size)."""
        out: dict[str, int] = {}
        for layer, tail in zip(self.layers, self.mlp_tails):
            out[layer.kind] = out.get(layer.kind, 0) + layer.nbytes()
            if tail is not None:
                out["recurrent"] = out.get("recurrent", 0) + tail.numel() * tail.element_size()
        return out

    def select(self, batch_indices: Tensor | list[int]) -> ModelState:
        """Keep / reorder / repeat batch rows in every layer."""
        index = torch.as_tensor(batch_indices, dtype=torch.long)
        return ModelState([layer.select(index) for layer in self.layers],
                          [None if t is None else t.index_select(0, index.to(t.device)) for t in self.mlp_tails],
                          self.seq_len)

    def to(self, *args, **kwargs) -> ModelState:
        return ModelState([layer.to(*args, **kwargs) for layer in self.layers],
                          [None if t is None else t.to(*args, **kwargs) for t in self.mlp_tails], self.seq_len)

    # ------------------------------------------------------------------------- files

    def save(self, path: str | Path, fingerprint: str, weights: str | None = None) -> None:
        """Write the state to a safetensors file, atomically (a crash never leaves half a file).
        ``weights``: the identity of the weights that made it (``HybridLM.weights_id``)."""
        tensors: dict[str, Tensor] = {}
        for i, (layer, tail) in enumerate(zip(self.layers, self.mlp_tails)):
            for name, value in layer.state_dict().items():
                tensors[f"layers.{i}.{name}"] = value.cpu()
            if tail is not None:
                tensors[f"mlp_tails.{i}"] = tail.detach().contiguous().cpu()
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model_fingerprint": fingerprint,
                    "seq_len": str(self.seq_len), "layer_states": json.dumps([type(s).__name__ for s in self.layers])}
        if weights is not None:
            metadata["weights_sha256"] = weights
        metadata["content_sha256"] = tensors_sha256(tensors, metadata)
        save_safetensors(tensors, Path(path), metadata)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str, state_classes: list[type[LayerState]],
             device: torch.device | str = "cpu", weights: str | None = None) -> ModelState:
        """Read a state saved by ``save`` for the model with ``fingerprint`` and these layer state
        classes. ``weights``: the identity of the weights it will continue with; a state made with
        other weights (or with no record of them) is refused. None: any weights of the architecture."""
        path = Path(path)
        metadata, tensors = read_safetensors(path, what="state")
        if metadata.get("format") != FORMAT:
            raise StateError(f"{path} is not a saved decoding state (format {metadata.get('format')!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise StateError(f"{path}: state format version {metadata.get('format_version')} is not supported "
                             f"(this toolkit reads version {FORMAT_VERSION})")
        _check_contents(path, metadata, tensors)
        if metadata.get("model_fingerprint") != fingerprint:
            raise StateError(f"{path} was saved by a different model (architecture fingerprint "
                             f"{metadata.get('model_fingerprint')}, this model's is {fingerprint}); "
                             "continue it with the checkpoint that produced it")
        saved = metadata.get("weights_sha256")
        if weights is not None and saved != weights:
            made = ("records no weights (saved by an older version, or without them)" if saved is None else
                    f"was made with other weights ({short(saved)}) than this model's ({short(weights)}), of the "
                    "same architecture")
            raise StateError(f"{path} {made}: continue it with the checkpoint that made it, or pass "
                             "--allow-other-weights to continue it with these weights on purpose (e.g. a fine-tuned "
                             "model)")
        layers, tails = [], []
        for i, state_cls in enumerate(state_classes):
            prefix = f"layers.{i}."
            entries = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
            layers.append(state_cls.from_state_dict(entries))
            tail = tensors.get(f"mlp_tails.{i}")
            tails.append(None if tail is None else tail.to(device))
        return cls(layers, tails, int(metadata["seq_len"]))


def _check_contents(path: Path, metadata: dict[str, str], tensors: dict[str, Tensor]) -> None:
    """Refuse a state whose tensors differ from the content hash recorded with them, hold NaN or
    infinite values, or whose token count is unreadable."""
    recorded = metadata.get("content_sha256")
    others = {k: v for k, v in metadata.items() if k != "content_sha256"}
    if recorded is not None and recorded != tensors_sha256(tensors, others):
        raise StateError(f"{path}: its contents do not match the hash recorded when it was saved (corrupted or "
                         "edited); save the state again")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise StateError(f"{path}: the state tensor {bad} holds NaN or infinite values; save the state again from "
                         "a model whose outputs are finite")
    if not metadata.get("seq_len", "").isdigit():
        raise StateError(f"{path}: unreadable token count (seq_len {metadata.get('seq_len')!r}); save the state again")


def read_safetensors(path: Path, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a safetensors file; a missing or corrupt file is a clear error."""
    if not path.is_file():
        raise StateError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return metadata, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"{path} is not a readable safetensors {what} file (corrupt or truncated?): {err}") from None
