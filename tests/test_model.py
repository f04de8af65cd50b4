"""The hybrid LM built from every tiny recipe (``recipes/tiny/*.yaml``): one forward serves training,
prefill, continuation and decode, so every way of splitting a sequence must give the full forward's
logits; the model-level state selects rows, saves and loads; bad input is refused clearly; a
training step reaches every parameter.

The paper's init zeroes every output projection (docs/kvm.md §2), which would make the mixers invisible
in the logits and these checks vacuous; the models here get random weights everywhere instead.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blocks.projection import ProjectedAttention
from blocks.state import StateError
from hybrid.model.model import HybridLM
from hybrid.model.recipe import RECIPES_DIR, RecipeError, load_recipe, recipe_from_dict
from hybrid.model.state import ModelState

TINY = sorted((RECIPES_DIR / "tiny").glob("*.yaml"))
T = 60  # with 8-token KVM chunks and a 2-chunk window: the state is read from token 16 and updated at
#          tokens 24, 32, ..., 56 (5 updates); tokens before 48 end up compressed in the state
P = 13  # prefill length: mid-chunk, before the state is first read
SAVE_AT = 27  # a saved state mid-chunk, after the first KVM update
ATOL = 1e-4


@functools.cache
def tiny_model(path: Path) -> HybridLM:
    """The recipe's model in fp32 eval mode, with random weights (see the module docstring)."""
    torch.manual_seed(0)
    model = HybridLM(load_recipe(path).model)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.05 if p.dim() == 1 else 0.5 / math.sqrt(p.shape[-1])
            p.add_(torch.randn_like(p) * scale)
    return model.float().eval()


def tokens_for(model: HybridLM, batch: int = 1, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.2e} > {ATOL:.0e}"


def run_pieces(model: HybridLM, tokens: torch.Tensor, lengths: list[int], state: ModelState | None = None):
    """Consecutive calls over ``tokens`` in pieces of these lengths; (concatenated logits, final state)."""
    logits, start = [], 0
    for n in lengths:
        out = model(tokens[:, start:start + n], state)
        logits.append(out.logits)
        state, start = out.state, start + n
    assert start == tokens.shape[1]
    return torch.cat(logits, dim=1), state


recipe_ids = [p.stem for p in TINY]
per_recipe = pytest.mark.parametrize("path", TINY, ids=recipe_ids)


def test_every_architecture_kind_has_a_tiny_recipe():
    def kinds(path: Path) -> frozenset[str]:
        return frozenset(layer.mixer for layer in load_recipe(path).model.layers)

    tiny = {kinds(p) for p in TINY}
    full_size = [p for folder in ("paper", "hybrids") for p in (RECIPES_DIR / folder).glob("**/[!_]*.yaml")]
    assert full_size
    for path in full_size:
        assert kinds(path) in tiny, f"no tiny recipe mixes {sorted(kinds(path))} like {path.name}"
    assert set().union(*tiny) == {"kvm", "attention", "swa", "bswa", "gla", "rwkv7", "mamba2", "gated_deltanet"}
    budgets = {layer.options.budget for p in TINY for layer in load_recipe(p).model.layers if layer.mixer == "kvm"}
    assert budgets == {"fixed", "power_law", "saturation"}


@per_recipe
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(path):
    model = tiny_model(path)
    tokens = tokens_for(model)
    full = model(tokens)
    assert full.logits.shape == (1, T, model.config.vocab_size) and torch.isfinite(full.logits).all()
    logits, state = run_pieces(model, tokens, [P] + [1] * (T - P))
    assert_close(logits, full.logits, f"prefill {P} + one-token decode")
    assert state.seq_len == T
    assert_close(model(tokens, last_only=True).logits, full.logits[:, -1:], "last_only")
    # The check has teeth: the last logits depend on a token that no window reaches any more in the
    # pure-KVM models (it is in the compressed state), so history really flows through the state.
    changed = tokens.clone()
    changed[0, 30] = (changed[0, 30] + 1) % model.config.vocab_size
    assert (model(changed).logits[:, -1] - full.logits[:, -1]).abs().max() > 1e-3


@per_recipe
@torch.no_grad()
def test_continue_by_multi_token_pieces(path):
    model = tiny_model(path)
    tokens = tokens_for(model)
    full = model(tokens).logits
    for pieces in ([P, 9, T - P - 9], [1, 16, T - 17], [8, 8, 8, 8, T - 32]):
        logits, state = run_pieces(model, tokens, pieces)
        assert_close(logits, full, f"pieces {pieces}")
        assert state.seq_len == T


@per_recipe
@torch.no_grad()
def test_batch_rows_are_independent(path):
    model = tiny_model(path)
    tokens = tokens_for(model, batch=2)
    batched, state = run_pieces(model, tokens, [P, T - P])
    for row in range(2):
        alone = model(tokens[row:row + 1]).logits
        assert_close(batched[row:row + 1], alone, f"row {row} in a batch of 2 vs alone")


@per_recipe
@torch.no_grad()
def test_state_select_reorders_rows(path):
    model = tiny_model(path)
    tokens = tokens_for(model, batch=2)
    full = model(tokens).logits
    state = model(tokens[:, :P]).state
    swapped = model(tokens[[1, 0], P:], state.select([1, 0])).logits
    assert_close(swapped, full[[1, 0], P:], "continuing from select([1, 0])")
    one = model(tokens[1:, P:], state.select([1])).logits
    assert_close(one, full[1:, P:], "continuing row 1 alone from select([1])")


@per_recipe
@torch.no_grad()
def test_save_and_load_state(path, tmp_path):
    model = tiny_model(path)
    tokens = tokens_for(model, batch=2)
    full = model(tokens).logits
    state = model(tokens[:, :SAVE_AT]).state
    fingerprint = model.config.fingerprint()
    file = tmp_path / "state.safetensors"
    state.save(file, fingerprint)
    loaded = ModelState.load(file, fingerprint, model.state_classes())
    assert loaded.seq_len == SAVE_AT and loaded.bytes_by_kind() == state.bytes_by_kind()
    resumed = model(tokens[:, SAVE_AT:], loaded).logits
    assert_close(resumed, full[:, SAVE_AT:], "continuing a saved and loaded state")

    with pytest.raises(StateError, match="saved by a different model"):
        ModelState.load(file, "0123456789abcdef", model.state_classes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(StateError, match="corrupt or truncated"):
        ModelState.load(truncated, fingerprint, model.state_classes())
    with pytest.raises(StateError, match="no state file"):
        ModelState.load(tmp_path / "missing.safetensors", fingerprint, model.state_classes())


@per_recipe
@torch.no_grad()
def test_bytes_by_kind_reports_the_recipe_kinds(path):
    model = tiny_model(path)
    config = model.config
    tokens = tokens_for(model)
    short, long = model(tokens[:, :20]).state, model(tokens).state
    kinds = set(config.state_kinds) | ({"recurrent"} if config.block.mlp_token_shift else set())
    assert set(long.bytes_by_kind()) == kinds
    assert all(n > 0 for n in long.bytes_by_kind().values())
    assert long.nbytes() == sum(long.bytes_by_kind().values())
    assert short.bytes_by_kind().get("recurrent") == long.bytes_by_kind().get("recurrent")  # fixed size
    if "kv" in kinds:
        assert long.bytes_by_kind()["kv"] > short.bytes_by_kind()["kv"]  # grows with every token


@torch.no_grad()
def test_bad_tokens_are_refused_clearly():
    model = tiny_model(RECIPES_DIR / "tiny" / "kvm_fixed.yaml")
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\); got ids in \[3, {vocab}\]"):
        model(torch.tensor([[3, vocab]]))
    with pytest.raises(ValueError, match=r"token ids must be in .* got ids in \[-1, 3\]"):
        model(torch.tensor([[3, -1]]))
    with pytest.raises(ValueError, match="integer tensor of shape \\(batch, time\\), got torch.float32"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="integer tensor of shape \\(batch, time\\), got torch.int64 \\(3,\\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tokens is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    state = model(torch.tensor([[1, 2], [3, 4]])).state
    with pytest.raises(ValueError, match="state holds 2 sequences but tokens has 1 rows"):
        model(torch.tensor([[5]]), state)


def no_gradient_expected(model: HybridLM) -> set[str]:
    """Parameters that a forward never uses, so they get no gradient (by design, not a bug): the
    value-residual gate of layer 0 when layer 0 starts a value-residual group. Its own values *are*
    the group's v_first, so it has nothing to mix towards; the published backbone keeps the gate on
    every layer too (its parameter count includes them, docs/kvm.md §2). A group starting deeper takes
    v_first from the embedding stream (hybrid/model/model.py), so its first layer does use its gate."""
    mixer = model.blocks[0].mixer
    if isinstance(mixer, ProjectedAttention) and mixer.config.value_residual:
        return {f"blocks.0.mixer.{name}" for name, _ in mixer.named_parameters() if name.startswith("v_residual_")}
    return set()


@per_recipe
def test_training_step_reaches_every_parameter(path):
    model = tiny_model(path)
    tokens = tokens_for(model, batch=2, length=T + 1)

    def loss_fn() -> torch.Tensor:
        logits = model(tokens[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    skip = no_gradient_expected(model)
    missing = [name for name, p in model.named_parameters()
               if name not in skip and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached {missing}"
    assert all(dict(model.named_parameters())[name].grad is None for name in skip)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad
            assert loss_fn() < loss.detach()  # one small gradient step lowers the loss on this batch
    finally:
        with torch.no_grad():  # the model is shared (cached) by the other tests: restore it
            for name, p in model.named_parameters():
                p.copy_(before[name])
        model.zero_grad(set_to_none=True)


def test_mixer_rules_that_need_d_model_name_the_yaml_path():
    """Head sizes are checked against d_model when the recipe is read (each mixer is built once on the
    meta device, hybrid.model.limits); the error names the recipe and its key."""
    data = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "layers": "KR",
                      "mixers": {"kvm": {"num_heads": 3}, "rwkv7": {"head_dim": 16}}}}
    with pytest.raises(RecipeError, match=r"^<dict>: model.mixers.kvm.num_heads: must divide d_model \(32\), got 3"):
        recipe_from_dict(data)
    data["model"]["mixers"] = {"kvm": {"num_heads": 2, "rope_partial_dim": 64}, "rwkv7": {"head_dim": 12}}
    with pytest.raises(RecipeError, match=r"model.mixers.kvm.rope_partial_dim: must be <= head_dim \(16\), got 64"):
        recipe_from_dict(data)
