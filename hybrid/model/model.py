"""The causal language model built from a recipe: embedding -> blocks -> norm -> head.

Each block is ``x += rs * mixer(norm(x)); x += rs * mlp(norm(x))`` with the mixer taken from the
registry, so one model mixes KVM, attention and linear-RNN layers freely. ``forward(tokens, state)``
takes any number of tokens and continues ``state`` (None: an empty history); it returns the logits
and the new ``ModelState``, the same call for training, prefill, continuation and decode.

Cross-layer streams travel in a per-forward ``ctx`` dict:

* the attention value residual (docs/kvm.md §2): ``v_first`` of a value-residual group is the group's
  first layer's ``v_proj`` applied to that layer's norm of the *embedding stream*, as the
  published backbone computes it (for the first layer itself this is just its own value);
* RWKV-7's ``v_first`` comes from the first RWKV-7 layer of the model;
* with ``document_starts``, the packed documents (``blocks.documents.Documents``), which every mixer
  and every MLP token shift restarts at.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.config import ConfigError
from blocks.documents import CONTEXT_KEY, Documents
from blocks.mlp import MLP
from blocks.projection import ProjectedAttention
from blocks.registry import get_mixer
from blocks.state import LayerState
from hybrid.model.recipe import BlockConfig, ModelConfig
from hybrid.model.state import ModelState


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab), or (B, 1, vocab) with last_only
    state: ModelState | None  # None after a batch of packed documents


def make_norm(block: BlockConfig, dim: int) -> nn.Module:
    if block.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=block.norm_eps)
    return nn.LayerNorm(dim, eps=block.norm_eps, bias=block.norm_bias)


class Block(nn.Module):
    """One layer: a pre-norm mixer and a pre-norm MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int, mixer_options=None):
        super().__init__()
        layer, block, d = config.layers[layer_idx], config.block, config.d_model
        self.residual_scale = block.residual_scale
        self.mixer_norm = make_norm(block, d)
        try:
            self.mixer = get_mixer(layer.mixer).cls(mixer_options or layer.options, d_model=d, layer_idx=layer_idx,
                                                    n_layers=config.n_layers)
        except ConfigError as err:  # a rule that needs d_model (head sizes): name the recipe's YAML path
            raise ConfigError(f"model.mixers.{layer.name}.{err.field}", err.reason) from None
        self.mlp_norm = make_norm(block, d)
        self.mlp = MLP(d, block.hidden_size(d), block.mlp, block.mlp_bias, block.mlp_token_shift,
                       layer_idx, config.n_layers)

    def forward(self, x: Tensor, state: LayerState | None, mlp_tail: Tensor | None, ctx: dict
                ) -> tuple[Tensor, LayerState | None, Tensor | None]:
        """x: (B, T, D) -> (B, T, D), the mixer's new state and the MLP's token-shift tail."""
        y, state = self.mixer(self.mixer_norm(x), state, ctx)
        x = x + self.residual_scale * y
        y, mlp_tail = self.mlp(self.mlp_norm(x), mlp_tail, ctx.get(CONTEXT_KEY))
        return x + self.residual_scale * y, state, mlp_tail


class HybridLM(nn.Module):
    """A causal LM whose layers may each be a different mixer (see the module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.embed_norm = make_norm(config.block, d) if config.embedding_norm else None
        self.blocks = nn.ModuleList(Block(config, i, _mixer_options(config, i)) for i in range(config.n_layers))
        self.final_norm = make_norm(config.block, d)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self._value_groups = _value_residual_sources(self.blocks)
        self.weights_id: str | None = None  # the content hash of the weights when known (hybrid.formats.checkpoint)
        self.reset_parameters()

    # ------------------------------------------------------------------------- init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``normal``: embeddings and MLP weights N(0, init_std), residual outputs scaled by
        1/sqrt(2 * n_layers) (GPT-2). ``kvm_paper`` (docs/kvm.md §2): tiny uniform embeddings, orthogonal
        MLP input and head, zero MLP and attention output projections. Mixers keep their own init
        otherwise (fla's for the LRNN layers)."""
        cfg = self.config
        if cfg.init == "kvm_paper":
            nn.init.uniform_(self.embed.weight, -1e-4, 1e-4)
            if self.lm_head is not None:
                nn.init.orthogonal_(self.lm_head.weight, gain=0.5 * math.sqrt(cfg.vocab_size / cfg.d_model))
            for block in self.blocks:
                for proj in (block.mlp.up_proj, block.mlp.gate_proj):
                    if proj is not None:
                        nn.init.orthogonal_(proj.weight)
                nn.init.zeros_(block.mlp.down_proj.weight)
                if isinstance(block.mixer, ProjectedAttention):
                    nn.init.zeros_(block.mixer.o_proj.weight)
        else:
            std = cfg.init_std
            nn.init.normal_(self.embed.weight, std=std)
            if self.lm_head is not None:
                nn.init.normal_(self.lm_head.weight, std=std)
            for block in self.blocks:
                for proj in (block.mlp.up_proj, block.mlp.gate_proj):
                    if proj is not None:
                        nn.init.normal_(proj.weight, std=std)
                nn.init.normal_(block.mlp.down_proj.weight, std=std / math.sqrt(2 * cfg.n_layers))
        for block in self.blocks:
            for proj in (block.mlp.up_proj, block.mlp.gate_proj, block.mlp.down_proj):
                if proj is not None and proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    # ------------------------------------------------------------------------- use

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def state_classes(self) -> list[type[LayerState]]:
        return [get_mixer(layer.mixer).state_cls for layer in self.config.layers]

    def num_parameters(self, include_embeddings: bool = True, include_head: bool = True) -> int:
        """Parameter count; a tied head counts once, as the embedding."""
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self.embed.weight.numel()
        if not include_head and self.lm_head is not None:
            total -= self.lm_head.weight.numel()
        return total

    def forward(self, tokens: Tensor, state: ModelState | None = None, *, last_only: bool = False,
                document_starts: Tensor | None = None) -> LMOutput:
        """tokens: (B, T) token ids -> logits (B, T, vocab) (``last_only``: (B, 1, vocab)) and the state
        after these tokens. ``state`` continues an earlier call (None: start of the sequence).

        ``document_starts``: (B, T) bool, True at the first token of every document packed into the
        rows (column 0 always; blocks/documents.py). Every layer then keeps the documents apart, each
        as if it were a sequence of its own; such a batch starts from no state and the returned
        state is None (a row has no single history to continue)."""
        self._check(tokens, state)
        ctx: dict = {}
        if document_starts is not None:
            if state is not None:
                raise ValueError("a batch of packed documents (document_starts) starts from no state: pass state=None")
            if tuple(document_starts.shape) != tuple(tokens.shape):
                raise ValueError(f"document_starts has shape {tuple(document_starts.shape)}, tokens "
                                 f"{tuple(tokens.shape)}: they must match")
            ctx[CONTEXT_KEY] = Documents(document_starts)
        x = self.embed(tokens)  # (B, T, D)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for group, first in self._value_groups.items():  # v_first from the embedding stream (see docstring)
            if first > 0:
                block = self.blocks[first]
                ctx[group] = block.mixer.v_proj(block.mixer_norm(x))
        layers: list[LayerState] = []
        tails: list[Tensor | None] = []
        for i, block in enumerate(self.blocks):
            x, layer_state, tail = block(x, None if state is None else state.layers[i],
                                         None if state is None else state.mlp_tails[i], ctx)
            layers.append(layer_state)
            tails.append(tail)
        if last_only:
            x = x[:, -1:]
        logits = self.logits(self.final_norm(x))
        if document_starts is not None:
            return LMOutput(logits, None)
        return LMOutput(logits, ModelState(layers, tails, (0 if state is None else state.seq_len) + tokens.shape[1]))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states (B, T, D) -> logits (B, T, vocab), soft-capped if the recipe says so."""
        logits = F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _check(self, tokens: Tensor, state: ModelState | None) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, time), got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens is empty (time = 0): pass at least one token")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got ids in "
                             f"[{int(tokens.min())}, {int(tokens.max())}] (a tokenizer for another model?)")
        if state is not None:
            if not isinstance(state, ModelState) or len(state.layers) != self.config.n_layers:
                raise ValueError(f"state must be the ModelState of this {self.config.n_layers}-layer model, "
                                 f"got {type(state).__name__}")
            if state.batch_size != tokens.shape[0]:
                raise ValueError(f"state holds {state.batch_size} sequences but tokens has {tokens.shape[0]} rows "
                                 "(use state.select(rows) to pick rows)")


def _mixer_options(config: ModelConfig, layer_idx: int):
    """Options a layer is built with: the recipe's, plus what only the whole model knows (RWKV-7:
    whether this is the first RWKV-7 layer, which starts the v_first stream)."""
    layer = config.layers[layer_idx]
    if layer.mixer == "rwkv7" and layer.options.v_first_source is None:
        first = next(i for i, other in enumerate(config.layers) if other.mixer == "rwkv7")
        return dataclasses.replace(layer.options, v_first_source=layer_idx == first)
    return layer.options


def _value_residual_sources(blocks: nn.ModuleList) -> dict[str, int]:
    """Value-residual group -> index of its first layer."""
    first: dict[str, int] = {}
    for i, block in enumerate(blocks):
        mixer = block.mixer
        if isinstance(mixer, ProjectedAttention) and mixer.config.value_residual:
            first.setdefault(mixer.config.value_residual_group, i)
    return first
