"""Prefill, sampling and batched generation (hybrid/generation/generate.py) on a tiny GLA + KVM + attention +
sliding-window model, fp32 on CPU. The weights use a large init_std so greedy outputs vary from
token to token (with the default 0.02 a random model repeats one token, which would hide bugs)."""

import pytest
import torch

from hybrid.generation.generate import SamplingConfig, generate, prefill, sample
from hybrid.model.model import HybridLM
from hybrid.model.recipe import recipe_from_dict
from hybrid.model.state import ModelState

TINY = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": 4, "layers": "GKAS", "init_std": 0.3,
                  "mixers": {"gla": {"num_heads": 2},
                             "kvm": {"num_heads": 2, "chunk_len": 4, "budget": "power_law", "growth_factor": 2.0},
                             "attention": {"num_heads": 2}, "swa": {"num_heads": 2, "window": 5}},
                  "block": {"mlp_token_shift": True}}}
GREEDY = SamplingConfig(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(recipe_from_dict(TINY).model).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def argmax_by_full_forwards(model: HybridLM, tokens: list[int], n: int) -> list[int]:
    """The reference: rerun the whole sequence each step and take the last position's argmax."""
    tokens = list(tokens)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[-n:]


def test_greedy_equals_argmax_of_full_forwards(model):
    p = prompt(5, seed=1)
    result = generate(model, [p], GREEDY)
    assert result.tokens == [argmax_by_full_forwards(model, p, 8)]
    assert len(set(result.tokens[0])) > 2  # the check is not about a model that repeats one token
    assert result.finish_reasons == ["length"]
    assert result.states[0].seq_len == 5 + 8  # the state holds the prompt and every new token
    assert result.stats.generated_tokens == 8 and result.stats.prefill_tokens == 5
    assert set(result.stats.state_bytes) == {"recurrent", "kvm", "kv", "window"}


def test_prompts_of_different_lengths_batch_like_each_alone(model):
    prompts = [prompt(n, seed=n) for n in (3, 9, 14)]
    streamed = []
    batched = generate(model, prompts, GREEDY, on_token=lambda row, token: streamed.append((row, token)))
    for i, p in enumerate(prompts):
        alone = generate(model, [p], GREEDY)
        assert batched.tokens[i] == alone.tokens[0], f"row {i} (prompt length {len(p)})"
        assert batched.states[i].seq_len == len(p) + 8
        assert [t for row, t in streamed if row == i] == batched.tokens[i]  # streaming in order
    assert batched.stats.prefill_tokens == 3


def test_sampling_is_reproducible_with_a_seed(model):
    p = prompt(6, seed=2)
    config = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=123)
    first = generate(model, [p, p], config).tokens
    assert generate(model, [p, p], config).tokens == first
    other = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=124)
    assert generate(model, [p, p], other).tokens != first


@pytest.mark.parametrize("config", [SamplingConfig(temperature=1.5, top_k=1, max_new_tokens=8, seed=0),
                                    SamplingConfig(temperature=1.5, top_p=1e-6, max_new_tokens=8, seed=0)],
                         ids=["top_k=1", "tiny top_p"])
def test_top_k_1_and_tiny_top_p_are_greedy(model, config):
    p = prompt(4, seed=3)
    assert generate(model, [p], config).tokens == generate(model, [p], GREEDY).tokens


def test_sample_filters_at_the_edges():
    draws = 400
    # Ties at the top-k boundary go to the lower id, exactly like argmax.
    tied = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]]).expand(draws, -1)
    ids = sample(tied, SamplingConfig(top_k=2), torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {1, 2}
    assert sample(tied[:1], SamplingConfig(temperature=0)).item() == 1
    # top_p keeps the smallest most-likely set reaching p: probabilities 0.5, 0.3, 0.2 with p = 0.6 -> {0, 1}.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(draws, -1)
    assert set(sample(logits, SamplingConfig(top_p=0.6), torch.Generator().manual_seed(0)).tolist()) == {0, 1}
    # top_p = 1 and top_k >= vocab filter nothing: the same draws as no filtering at all.
    wide = torch.randn(draws, 7, generator=torch.Generator().manual_seed(1))
    plain = sample(wide, SamplingConfig(), torch.Generator().manual_seed(2))
    assert torch.equal(sample(wide, SamplingConfig(top_p=1.0, top_k=7), torch.Generator().manual_seed(2)), plain)
    assert torch.equal(sample(wide, SamplingConfig(top_k=1000), torch.Generator().manual_seed(2)), plain)
    assert set(plain.tolist()) == set(range(7))
    for bad in ({"temperature": -1}, {"top_k": 0}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_stop_tokens_end_a_row(model):
    p, q = prompt(5, seed=4), prompt(7, seed=5)
    free = generate(model, [p], GREEDY).tokens[0]
    k = next(k for k in range(2, 8) if free[k] not in free[:k])  # the first new token at position >= 2
    config = SamplingConfig(temperature=0, max_new_tokens=8, stop_tokens=(free[k],))
    result = generate(model, [p, q], config)
    assert result.tokens[0] == free[:k + 1]  # the stop token is kept, nothing after it
    assert result.finish_reasons[0] == "stop"
    assert result.states[0].seq_len == len(p) + k + 1
    alone = generate(model, [q], config)  # the other row goes on as if alone
    assert result.tokens[1] == alone.tokens[0] and result.finish_reasons[1] == alone.finish_reasons[0]


def test_max_new_tokens_zero_only_reads_the_prompts(model):
    result = generate(model, [prompt(3, 6), prompt(5, 7)], SamplingConfig(max_new_tokens=0))
    assert result.tokens == [[], []]
    assert [s.seq_len for s in result.states] == [3, 5]


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model):
    tokens = torch.tensor([prompt(23, seed=8), prompt(23, seed=9)])
    whole = model(tokens)
    seen = []
    logits, state = prefill(model, tokens, chunk_size=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(5, 23), (10, 23), (15, 23), (20, 23), (23, 23)]
    assert state.seq_len == 23
    torch.testing.assert_close(logits, whole.logits[:, -1], atol=1e-5, rtol=0)
    nxt = torch.tensor([[1], [2]])  # and the two states continue alike
    torch.testing.assert_close(model(nxt, state).logits, model(nxt, whole.state).logits, atol=1e-5, rtol=0)


def test_saved_prompt_state_continues_like_never_stopping(model, tmp_path):
    full = prompt(17, seed=10)
    uninterrupted = generate(model, [full], GREEDY)
    _, state = prefill(model, torch.tensor([full[:12]]), chunk_size=4)
    fingerprint = model.config.fingerprint()
    state.save(tmp_path / "prompt.safetensors", fingerprint)
    loaded = ModelState.load(tmp_path / "prompt.safetensors", fingerprint, model.state_classes())
    resumed = generate(model, [full[12:]], GREEDY, state=loaded)
    assert resumed.tokens == uninterrupted.tokens
    assert resumed.states[0].seq_len == uninterrupted.states[0].seq_len == 17 + 8
    # One cached state (batch 1) shared by two continuations: each as if alone.
    shared = generate(model, [full[12:], full[12:15]], GREEDY, state=loaded)
    assert shared.tokens == [uninterrupted.tokens[0], generate(model, [full[:15]], GREEDY).tokens[0]]


def test_result_state_continues_a_conversation(model):
    first, reply = prompt(6, seed=11), prompt(3, seed=12)
    turn = generate(model, [first], GREEDY)
    continued = generate(model, [reply], GREEDY, state=turn.states[0])
    assert continued.tokens == generate(model, [first + turn.tokens[0] + reply], GREEDY).tokens


def test_bad_prompts_are_rejected(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], GREEDY)
    _, state = prefill(model, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="2 rows but there are 3 prompts"):
        generate(model, [[1], [2], [3]], GREEDY, state=state)
