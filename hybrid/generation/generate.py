"""Prefill, sampling and batched generation on top of ``HybridLM.forward(tokens, state)``.

Everything here goes through the model's one forward: prefill is that call over chunks of the
prompt, a decode step is that call on one token per row. Nothing pads: a state holds the same
number of tokens in every row (``ModelState.seq_len``), and padding fed into a recurrent or KVM
state would change it for good. Prompts of different lengths are therefore batched by *teacher
forcing* (see ``generate``), which keeps every row's state exactly what that prompt alone gives.

Logits that become NaN or infinite (broken weights, a corrupted state) stop generation with a
``GenerationError`` naming the step, instead of sampling garbage from them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from blocks.errors import InputError
from hybrid.model.model import HybridLM
from hybrid.model.state import ModelState


class GenerationError(InputError):
    """Generation cannot go on: the model's logits became NaN or infinite (the message says where)."""


# ----------------------------------------------------------------------------- prefill

@torch.no_grad()
def prefill(model: HybridLM, tokens: Tensor, state: ModelState | None = None, chunk_size: int = 1024,
            progress: Callable[[int, int], None] | None = None) -> tuple[Tensor, ModelState]:
    """Run a prompt through the model, ``chunk_size`` tokens per forward, and keep the state.

    tokens: (B, T) ids. Returns the logits after the last token (B, vocab) and the state after all
    T tokens (continuing ``state`` if given). Chunking bounds the activation memory of a long prompt
    (each call holds one chunk's activations plus the state); every chunk asks for the last
    position's logits only, so a (B, T, vocab) tensor is never built. ``progress(done, total)`` is
    called after each chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill needs tokens of shape (batch, time) with time >= 1, got {tuple(tokens.shape)}")
    tokens = tokens.to(model.device)
    total = tokens.shape[1]
    for start in range(0, total, chunk_size):
        out = model(tokens[:, start:start + chunk_size], state, last_only=True)
        state = out.state
        if progress is not None:
            progress(min(start + chunk_size, total), total)
    return out.logits[:, -1], state  # (B, vocab)


# ----------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen and when a row stops.

    temperature: 0 = greedy (argmax; top_k / top_p ignored). top_k: keep the k most likely tokens
    (None or >= vocab: all). top_p: then keep the smallest most-likely set whose probability reaches
    top_p (1.0: all). Ties are broken towards the lower id everywhere, so top_k=1 and a tiny top_p
    are exactly greedy. A row ends after ``max_new_tokens`` or when it emits one of ``stop_tokens``
    (the stop token is kept in its output). ``seed``: a fixed seed makes sampling reproducible.
    ``vocab_limit``: only ids below it are chosen (a tokenizer with fewer ids than the model's padded
    vocabulary: the ids beyond it decode to no text).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None
    vocab_limit: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1 or None, got {self.vocab_limit}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, vocab) -> token ids (B,) drawn as ``config`` says (computed in fp32)."""
    if config.vocab_limit is not None:
        logits = logits[:, :config.vocab_limit]  # the same ids, without those beyond the limit
    if config.temperature == 0:
        return logits.argmax(dim=-1)  # the first maximum: ties go to the lower id
    scaled = logits.float() / config.temperature
    if not torch.isfinite(scaled).all():  # a temperature so small that logits overflow: shift them to <= 0 first
        scaled = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / config.temperature
    # Sort once (stable, so equal logits keep id order) and filter in sorted order.
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if config.top_k is not None and config.top_k < sorted_logits.shape[-1]:
        sorted_logits[:, config.top_k:] = float("-inf")
    probs = sorted_logits.softmax(dim=-1)  # (B, vocab), renormalised over the top-k
    if config.top_p < 1:
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        probs = probs.masked_fill(mass_before >= config.top_p, 0.0)  # the most likely token always stays
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1), index into the sorted order
    return order.gather(-1, choice).squeeze(-1)


# ----------------------------------------------------------------------------- generation

@dataclasses.dataclass
class GenerationStats:
    prefill_tokens: int  # tokens per row prefilled in one batch (the shortest prompt)
    prefill_seconds: float
    decode_steps: int  # one-token forwards (teacher-forced prompt tokens included)
    decode_seconds: float
    generated_tokens: int  # over all rows
    state_bytes: dict[str, int]  # bytes of the returned states, by kind (recurrent, kvm, window, kv)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclasses.dataclass
class GenerationResult:
    """``tokens[i]``: the new tokens of row i (a stop token included). ``states[i]``: row i's state
    (batch 1) after its prompt *and* all its new tokens, ready to continue the conversation with
    ``generate(model, [next_tokens], config, state=states[i])``. ``finish_reasons[i]``: ``"stop"``
    (a stop token) or ``"length"`` (max_new_tokens)."""

    tokens: list[list[int]]
    states: list[ModelState]
    finish_reasons: list[str]
    stats: GenerationStats


@torch.no_grad()
def generate(model: HybridLM, prompts: Sequence[Sequence[int]], config: SamplingConfig = SamplingConfig(),
             state: ModelState | None = None, on_token: Callable[[int, int], None] | None = None,
             prefill_chunk_size: int = 1024) -> GenerationResult:
    """Continue each prompt with up to ``config.max_new_tokens`` tokens.

    prompts: token ids, one non-empty list per row, of any lengths. ``state``: continue an earlier
    state instead of starting empty (prompt caching): batch 1 (shared by every row) or one row per
    prompt; each prompt then holds only the tokens that come after it. ``on_token(row, token_id)``
    is called for every new token as soon as it is chosen (streaming; pair with
    ``tokenizer.stream_decoder()`` for text).

    How rows of different lengths share one batch without padding: all rows prefill the shortest
    prompt length m together; then every step feeds one token per row: a row still inside its prompt
    feeds its next prompt token (its logits are not used), a row past it feeds the token it just
    sampled. All rows stay at the same ``seq_len``, and each row's tokens are those of its prompt
    alone. A row that stops is taken out of the batch (``state.select``) after its last token is fed,
    with its own state kept for the result: finished rows cost no compute, and the result state of
    every row includes its last token. So each row's last token is fed although its logits are never
    used: one extra token per row, the price of states that continue cleanly.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (to cache a prompt, keep the state after all "
                         "but its last token, and pass that token as the prompt that continues it)")
    batch = len(prompts)
    if state is not None and state.batch_size != batch:
        if state.batch_size != 1:
            raise ValueError(f"state holds {state.batch_size} rows but there are {batch} prompts "
                             "(pass a state of batch 1 to share it, or one row per prompt)")
        state = state.select([0] * batch)

    common = min(len(p) for p in prompts)
    start = time.perf_counter()
    logits, state = prefill(model, torch.tensor([p[:common] for p in prompts], device=model.device), state,
                            chunk_size=prefill_chunk_size)  # logits: (B, vocab)
    synchronize(model.device)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    out, final, reasons, steps = _decode(model, prompts, common, logits, state, config, on_token)
    synchronize(model.device)
    decode_seconds = time.perf_counter() - start

    state_bytes: dict[str, int] = {}
    for s in final:
        for kind, n in s.bytes_by_kind().items():
            state_bytes[kind] = state_bytes.get(kind, 0) + n
    stats = GenerationStats(common, prefill_seconds, steps, decode_seconds, sum(map(len, out)), state_bytes)
    return GenerationResult(out, final, reasons, stats)


def _decode(model: HybridLM, prompts: list[list[int]], common: int, logits: Tensor, state: ModelState,
            config: SamplingConfig, on_token: Callable[[int, int], None] | None
            ) -> tuple[list[list[int]], list[ModelState], list[str], int]:
    """The one-token steps of ``generate`` after the ``common`` prompt tokens every row prefilled:
    (new tokens per row, final state per row, finish reason per row, steps taken)."""
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(config.seed)
    stop = set(config.stop_tokens)
    batch = len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    fed = [common] * batch  # how many of row i's tokens (prompt, then output) the state holds
    final: list[ModelState | None] = [None] * batch
    reasons = [""] * batch
    rows = list(range(batch))  # the prompt index of each row of `state` and `logits`
    steps = 0
    while True:
        # A row whose tokens are all in the state either is finished (it leaves the batch with its
        # state) or samples its next token from the logits after its last one.
        keep, sampling = [], []
        for j, i in enumerate(rows):
            if fed[i] < len(prompts[i]) + len(out[i]):
                keep.append(j)
            elif (out[i] and out[i][-1] in stop) or len(out[i]) == config.max_new_tokens:
                reasons[i] = "stop" if out[i] and out[i][-1] in stop else "length"
                final[i] = state if len(rows) == 1 else state.select([j])
            else:
                keep.append(j)
                sampling.append(j)
        if not keep:
            return out, final, reasons, steps
        if len(keep) < len(rows):
            sampling = [keep.index(j) for j in sampling]
            rows, state, logits = [rows[j] for j in keep], state.select(keep), logits[keep]
        if sampling:
            _require_finite(logits[sampling], [rows[j] for j in sampling], out, steps)
            for j, token in zip(sampling, sample(logits[sampling], config, generator).tolist()):
                out[rows[j]].append(token)
                if on_token is not None:
                    on_token(rows[j], token)
        # Every row feeds its next token: the next prompt token (teacher forcing) or the one just sampled.
        step = [prompts[i][fed[i]] if fed[i] < len(prompts[i]) else out[i][-1] for i in rows]
        result = model(torch.tensor(step, device=model.device)[:, None], state)  # (B, 1) -> (B, 1, vocab)
        logits, state = result.logits[:, -1], result.state
        for i in rows:
            fed[i] += 1
        steps += 1


def _require_finite(logits: Tensor, rows: list[int], out: list[list[int]], steps: int) -> None:
    """Raise ``GenerationError`` when a row's logits (B, vocab) hold a NaN or an infinity."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    if all(finite):
        return
    row = rows[finite.index(False)]
    raise GenerationError(f"the logits became NaN or infinite at new token {len(out[row]) + 1} of prompt {row + 1} "
                          f"(decode step {steps}): the weights, or the state being continued, give non-finite "
                          "values; generation stopped there. Check the checkpoint (a diverged run?) and the state")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the timings measure the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
