"""The mixer registry: every token mixer registers by name, one-letter symbol and state kind.

Recipes name mixers (``kvm``) or lay layers out with symbols (``"GGGK*3"``); both resolve here.
A mixer class registers with::

    @register_mixer("kvm", symbol="K", state=KVMState)
    class KVMAttention(nn.Module):
        Config = KVMConfig          # a dataclass of the mixer's options (validated by recipes)
        def __init__(self, config: KVMConfig, d_model: int, layer_idx: int = 0,
                     n_layers: int | None = None): ...   # n_layers: model depth, for depth-aware init
        def forward(self, x, state=None, ctx=None) -> tuple[Tensor, LayerState]: ...

The contract of ``forward``: ``x`` is (batch, time, d_model); ``state=None`` starts from an empty
history, a state continues it by any number of tokens; ``ctx`` is a per-forward dict for
cross-layer streams (RWKV-7's ``v_first``, value residuals). The same call serves training,
prefill, continuation and one-token decode.

``ctx["documents"]`` (``blocks.documents.Documents``, read with ``documents_in``), when present,
says that the rows of ``x`` pack several documents: the mixer then computes every document as if it
were a sequence of its own (its state, positions, token shift and convolutions restart at its first
token, and no token reads another document), starts from ``state=None`` and returns ``None`` as the
state. Training with ``train.document_isolation`` relies on it.

The built-in mixers are registered by the ``blocks`` package itself (its ``__init__`` imports them),
and Python runs a package's ``__init__`` before any of its modules, so ``from blocks.registry import
get_mixer`` always sees every built-in mixer.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from blocks.errors import InputError
from blocks.state import STATE_KINDS, LayerState


class UnknownMixerError(InputError, KeyError):
    """A mixer name or symbol that nothing registered. The message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    symbol: str
    state_cls: type[LayerState]
    cls: type
    description: str

    @property
    def config_cls(self) -> type:
        return self.cls.Config

    @property
    def state_kind(self) -> str:
        return self.state_cls.kind


_BY_NAME: dict[str, MixerSpec] = {}
_BY_SYMBOL: dict[str, MixerSpec] = {}


def register_mixer(name: str, *, symbol: str, state: type[LayerState]) -> Callable[[type], type]:
    """Class decorator adding a mixer to the registry (names and symbols must be unique).
    ``state`` is the mixer's ``LayerState`` subclass; its ``kind`` is the mixer's state kind."""
    if len(symbol) != 1 or not symbol.isalpha():
        raise ValueError(f"mixer symbol must be one letter, got {symbol!r}")
    if not (isinstance(state, type) and issubclass(state, LayerState) and state.kind in STATE_KINDS):
        raise ValueError(f"mixer state must be a LayerState subclass with a kind in {STATE_KINDS}, got {state!r}")

    def decorate(cls: type) -> type:
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"mixer {cls.__name__} needs a dataclass attribute `Config` for its options")
        for table, key, what in ((_BY_NAME, name, "name"), (_BY_SYMBOL, symbol, "symbol")):
            if key in table and table[key].cls is not cls:
                raise ValueError(f"mixer {what} {key!r} is already taken by {table[key].cls.__name__}")
        doc = (cls.__doc__ or "").strip().splitlines()
        spec = MixerSpec(name, symbol, state, cls, doc[0] if doc else "")
        _BY_NAME[name] = spec
        _BY_SYMBOL[symbol] = spec
        return cls

    return decorate


def _unknown(kind: str, key: str, valid: list[str]) -> UnknownMixerError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownMixerError(f"unknown mixer {kind} {key!r}.{hint} Valid {kind}s: {', '.join(valid)}")


def get_mixer(name: str) -> MixerSpec:
    """The spec registered under ``name``; an error listing every valid name otherwise."""
    if name not in _BY_NAME:
        raise _unknown("name", name, sorted(_BY_NAME))
    return _BY_NAME[name]


def get_mixer_by_symbol(symbol: str) -> MixerSpec:
    if symbol not in _BY_SYMBOL:
        raise _unknown("symbol", symbol, sorted(_BY_SYMBOL))
    return _BY_SYMBOL[symbol]


def all_mixers() -> list[MixerSpec]:
    return sorted(_BY_NAME.values(), key=lambda s: s.name)


def build_mixer(name: str, d_model: int, layer_idx: int = 0, n_layers: int | None = None, **options: Any):
    """Construct a registered mixer from keyword options (validated by its Config dataclass)."""
    spec = get_mixer(name)
    return spec.cls(spec.config_cls(**options), d_model=d_model, layer_idx=layer_idx, n_layers=n_layers)
