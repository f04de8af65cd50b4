"""``KVMHybridForCausalLM``: ``HybridLM`` as a transformers causal LM (``from_pretrained``, ``generate``).

The module wraps the toolkit's own ``HybridLM`` (as ``self.model``), so a model loaded through
transformers computes exactly what ``hybrid generate`` computes, with the same layers and kernels.
Its decoding states travel through ``generate`` as a ``HybridCache``: every layer's state continues
whatever its kind.

Batches of prompts of different lengths come left-padded with an ``attention_mask``; the first
forward reads each row from its first real token (rows of equal length together, see
``hybrid.hf.cache``), so padding never enters a state and each row's tokens are those of its prompt
alone, as in ``hybrid.generation.generate``. The mask must be left padding: zeros, then ones, and no
padding after the first forward. Logits at padded positions are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from blocks.rope import RotaryEmbedding
from hybrid.hf.cache import HybridCache, RowGroup
from hybrid.hf.config import KVMHybridConfig
from hybrid.model.model import Block, HybridLM


class KVMHybridForCausalLM(PreTrainedModel, GenerationMixin):
    """The causal LM of a ``KVMHybridConfig``; ``forward`` and ``generate`` as transformers expects."""

    config_class = KVMHybridConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [Block.__name__]
    _is_stateful = True  # its states cannot be rolled back

    def __init__(self, config: KVMHybridConfig):
        super().__init__(config)
        self.model = HybridLM(config.model_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """Only what loading leaves empty: the RoPE frequencies, which are not saved (transformers
        allocates such buffers empty and calls this). ``HybridLM`` initialises every weight itself, as
        its recipe says, and loading then replaces them all."""
        if isinstance(module, RotaryEmbedding):
            module.reset_frequencies()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward makes its own HybridCache

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head  # None when the head reads the embedding matrix

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: HybridCache | None = None, use_cache: bool | None = None, labels: Tensor | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) -> logits (B, T, vocab), or (B, k, vocab) for ``logits_to_keep`` k > 0.

        ``cache`` continues earlier calls (None with ``use_cache``, the default: a new one is returned).
        ``attention_mask`` (B, T + positions already read) may only mark left padding of the first
        call. ``labels`` (B, T): the mean next-token cross-entropy (-100 ignored) as ``loss``.
        ``position_ids`` are not used: positions come from the states."""
        _refuse_unsupported(input_ids, inputs_embeds, kwargs)
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"{type(cache).__name__} cannot hold this model's states (recurrent, KVM and KV states "
                            "by layer): pass a HybridCache, or no cache")
        if cache is None and use_cache is not False:
            cache = HybridCache()
        keep_last = logits_to_keep == 1 and labels is None
        if cache is not None and cache.groups:
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"the cache holds {cache.batch_size} rows but input_ids has {input_ids.shape[0]}")
            _check_no_padding(attention_mask, input_ids.shape[1])
            groups, starts = cache.groups, [0] * len(cache.groups)
        else:
            groups, starts = _prompt_groups(input_ids, attention_mask)
        logits = self._run(input_ids, groups, starts, keep_last)
        if cache is not None:
            cache.groups = groups
            cache.columns += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if not keep_last and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return output if return_dict is not False else output.to_tuple()

    def _run(self, input_ids: Tensor, groups: list[RowGroup], starts: list[int], keep_last: bool) -> Tensor:
        """One forward per group of rows, each continuing its state (None: a new one), group i reading
        columns ``starts[i]:`` of its rows; the groups keep their new states. Returns the logits
        (B, T or 1, vocab), zero where padded."""
        batch, length = input_ids.shape
        logits = None
        for group, start in zip(groups, starts):
            out = self.model(input_ids[group.rows, start:].to(self.device), group.state, last_only=keep_last)
            if logits is None:
                logits = out.logits.new_zeros(batch, 1 if keep_last else length, out.logits.shape[-1])
            logits[group.rows, 0 if keep_last else start:] = out.logits  # (rows, T - start or 1, vocab)
            group.state = out.state
        return logits


def _prompt_groups(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[list[RowGroup], list[int]]:
    """The rows of a first forward grouped by prompt length (left padding stripped), with no state
    yet: (the groups, the column where each group's prompts start)."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return [RowGroup(list(range(batch)), None)], [0]
    mask = attention_mask.to(torch.bool)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must have the shape of input_ids "
                         f"{tuple(input_ids.shape)} on the first forward")
    lengths = mask.sum(dim=1).tolist()
    positions = torch.arange(length, device=mask.device)
    expected = positions[None, :] >= (length - mask.sum(dim=1, keepdim=True))  # ones after left padding
    if not torch.equal(mask, expected) or min(lengths) == 0:
        raise ValueError("attention_mask must be left padding (zeros, then ones) with at least one token per row: "
                         "pad on the left (tokenizer.padding_side = 'left'); a recurrent or KVM state cannot skip "
                         "padding inside or after a prompt")
    by_length: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_length.setdefault(n, []).append(row)
    return [RowGroup(rows, None) for rows in by_length.values()], [length - n for n in by_length]


def _check_no_padding(attention_mask: Tensor | None, new_columns: int) -> None:
    if attention_mask is not None and not bool(attention_mask[:, -new_columns:].to(torch.bool).all()):
        raise ValueError("attention_mask pads tokens that continue a cache: only the first forward's prompts may "
                         "be (left) padded")


def _refuse_unsupported(input_ids: Tensor | None, inputs_embeds: Tensor | None, kwargs: dict) -> None:
    if input_ids is None or inputs_embeds is not None:
        raise ValueError("KVMHybridForCausalLM reads token ids: pass input_ids (inputs_embeds is not supported)")
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(name, None):
            raise ValueError(f"{name}=True is not supported: KVM and linear-RNN layers have no attention "
                             "matrix, and hidden states are not collected")
    unknown = sorted(name for name, value in kwargs.items() if value is not None)
    if unknown:
        raise TypeError(f"KVMHybridForCausalLM.forward got unexpected arguments {unknown}")
