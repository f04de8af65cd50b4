"""lm-evaluation-harness (``lm_eval``, the optional ``eval`` extra) on our checkpoints.

``HybridEvalLM`` implements lm-eval's ``LM`` interface on top of ``HybridLM.forward(tokens, state)``:

* ``loglikelihood``: the context is prefilled (chunked, no logits kept), then its last token and the
  continuation run in one forward whose logits score the continuation; ``is_greedy`` says whether
  every continuation token is the argmax.
* ``loglikelihood_rolling``: the whole text in one stream (``hybrid.evaluation.perplexity.token_losses``). The
  state carries any length, so no rolling windows are needed: every token is predicted once from
  all the text before it, which is what lm-eval's windows approximate for fixed-context models.
* ``generate_until``: greedy (or sampled, when a task asks ``do_sample`` with a temperature)
  decoding until a stop string or ``max_gen_toks``.

The first token of a text is predicted from ``prefix_token_id``: the tokenizer's end-of-text id, or
for the byte tokenizer (which has none) the newline byte, as a document would follow a line break.
Requests run one at a time (prompts of different lengths are never padded: padding would enter a
recurrent or KVM state), so lm-eval's ``batch_size`` is accepted and not used.

    from hybrid.evaluation.lm_eval_adapter import HybridEvalLM, run_lm_eval
    run_lm_eval(HybridEvalLM("runs/demo"), ["my_task"], include_path="my_tasks/")

Importing this module registers the model as ``hybrid`` with lm-eval (``--model hybrid
--model_args pretrained=CKPT``). lm-eval 0.4.13 finds models only in its own source tree and in
modules imported before its command line runs: it reads no plugin entry points (docs/interop.md).
So ``hybrid lm-eval ARGS`` runs lm-eval's own command line (every option of ``lm_eval``) after
importing this module. A folder written by ``hybrid export-hf`` needs no registration:
``lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from hybrid.evaluation.perplexity import token_losses
from hybrid.formats.tokenizer import Tokenizer
from hybrid.generation.generate import SamplingConfig, prefill, sample
from hybrid.model.model import HybridLM


@register_model("hybrid")
class HybridEvalLM(LM):
    """lm-eval's ``LM`` for a checkpoint folder / training run / recipe (``pretrained``, as lm-eval's
    ``--model_args`` name it), on ``device`` (``auto``: CUDA where there is one), or for a model and
    tokenizer already in memory."""

    def __init__(self, pretrained: str | None = None, *, model: HybridLM | None = None,
                 tokenizer: Tokenizer | None = None, device: str | None = "auto", dtype: str | None = None,
                 prefill_chunk: int = 1024, batch_size: int | str | None = None, max_batch_size: int | None = None):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("give either pretrained (checkpoint folder, training run or recipe) or model and "
                             "tokenizer")
        if pretrained is not None:
            from hybrid.formats.model_source import open_model

            if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line asks for cuda:0 unless told otherwise; its own models then run on the CPU
                print(f"[lm-eval asks for {device}, but torch sees no CUDA device: running on the CPU]",
                      file=sys.stderr)
                device = "cpu"
            _, model, tokenizer = open_model(str(pretrained), device or "auto", dtype, 0, sys.stderr)
        if tokenizer is None:
            raise ValueError("a model in memory needs its tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prefill_chunk = int(prefill_chunk)
        self._device = model.device

    @property
    def prefix_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else self.tokenizer.encode("\n")[-1]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, tokenized together where the tokenizer allows (so a
        BPE merge across the boundary is scored as the model would see it)."""
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context) if context else []
        if whole[:len(ctx)] != ctx:
            return ctx, self.tokenizer.encode(continuation)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _continuation_logprob(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ctx = ctx or [self.prefix_token_id]
        state = None
        if len(ctx) > 1:
            _, state = prefill(self.model, torch.tensor([ctx[:-1]], device=self.model.device), None,
                               chunk_size=self.prefill_chunk)
        tokens = torch.tensor([ctx[-1:] + cont[:-1]], device=self.model.device)
        logprobs = F.log_softmax(self.model(tokens, state).logits[0].float(), dim=-1)  # (len(cont), vocab)
        target = torch.tensor(cont, device=self.model.device)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = self._split(context, continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}: nothing to score")
            results.append(self._continuation_logprob(ctx, cont))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            ids = [self.prefix_token_id] + self.tokenizer.encode(text)
            results.append(-float(token_losses(self.model, ids, self.prefill_chunk).double().sum()))
        return results

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            config = SamplingConfig(temperature=temperature, max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)))
            results.append(self._generate(self.tokenizer.encode(context) or [self.prefix_token_id], until, config))
        return results

    def _generate(self, ids: list[int], until: Sequence[str], config: SamplingConfig) -> str:
        """Decode from ``ids`` until one of ``until`` appears (the text is cut before it) or the end-of-text
        token or ``max_new_tokens``."""
        logits, state = prefill(self.model, torch.tensor([ids], device=self.model.device), None,
                                chunk_size=self.prefill_chunk)
        generator = torch.Generator(device=self.model.device).manual_seed(0)
        out: list[int] = []
        text = ""
        for _ in range(config.max_new_tokens):
            token = int(sample(logits, config, generator)[0])
            if token == self.tokenizer.eos_id:
                break
            out.append(token)
            text = self.tokenizer.decode(out)
            if any(stop in text for stop in until):
                break
            result = self.model(torch.tensor([[token]], device=self.model.device), state)
            logits, state = result.logits[:, -1], result.state
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


def run_lm_eval(lm: HybridEvalLM, tasks: Sequence[str], include_path: str | Path | None = None,
                limit: float | None = None, num_fewshot: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on ``tasks`` (names, or task YAMLs found under ``include_path``);
    returns its results dict (``results[task][metric]``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                             num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    return output
