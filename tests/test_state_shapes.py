"""``state_at`` predicts the decoding state's shapes after n tokens: checked against real prefills."""

import pytest
import torch

from hybrid.model.model import HybridLM
from hybrid.model.recipe import recipe_from_dict
from hybrid.model.state_shapes import state_at

RECIPE = {"model": {
    "vocab_size": 64, "d_model": 32, "n_layers": 6, "layers": "GKASBK",
    "mixers": {"gla": {"num_heads": 2},
               "kvm": {"num_heads": 2, "chunk_len": 4, "budget": "power_law", "growth_factor": 2.0},
               "attention": {"num_heads": 2}, "swa": {"num_heads": 2, "window": 5},
               "bswa": {"num_heads": 2, "chunk_len": 4}},
    "block": {"mlp_token_shift": True}}}


def with_mixers(**mixers) -> dict:
    """RECIPE with some mixers' options updated."""
    model = dict(RECIPE["model"], mixers={name: {**options, **mixers.get(name, {})}
                                          for name, options in RECIPE["model"]["mixers"].items()})
    return {"model": model}


@pytest.fixture(scope="module", params=["no sinks", "sinks"])
def model(request):
    """The recipe, and the recipe with attention sinks on its window attentions (3 > swa's window, 6)."""
    recipe = RECIPE if request.param == "no sinks" else with_mixers(swa={"sink_len": 3}, bswa={"sink_len": 6})
    torch.manual_seed(0)
    return HybridLM(recipe_from_dict(recipe).model).eval()


@pytest.mark.parametrize("n_tokens", [1, 3, 4, 5, 8, 9, 13, 16, 17, 40, 41])
def test_shapes_match_a_real_prefill(model, n_tokens):
    with torch.no_grad():
        real = model(torch.randint(0, 64, (2, n_tokens))).state
    for predicted in (state_at(model, n_tokens, batch_size=2), state_at(model, n_tokens, batch_size=2, device="meta")):
        assert predicted.seq_len == real.seq_len == n_tokens
        assert predicted.bytes_by_kind() == real.bytes_by_kind()
        for i, (want, got) in enumerate(zip(real.layers, predicted.layers)):
            assert type(want) is type(got)
            assert want.seq_len == got.seq_len
            shapes = {k: tuple(v.shape) for k, v in want.state_dict().items()}
            assert shapes == {k: tuple(v.shape) for k, v in got.state_dict().items()}, f"layer {i}"


def test_a_predicted_state_decodes(model):
    state = state_at(model, 41, batch_size=2)
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, 3)), state)
    assert torch.isfinite(out.logits).all()
    assert out.state.seq_len == 44


def test_sink_tokens_are_counted_in_the_state_bytes():
    """A window of W tokens plus n sinks holds as many keys as a window of W + n, once the context is long."""
    def window_bytes(n_tokens: int, **swa) -> int:
        recipe = {"model": dict(RECIPE["model"], layers="S", n_layers=1, mixers={"swa": {"num_heads": 2, **swa}})}
        model = HybridLM(recipe_from_dict(recipe).model).eval()
        return state_at(model, n_tokens, device="meta").bytes_by_kind()["window"]

    assert window_bytes(1000, window=5, sink_len=4) == window_bytes(1000, window=9) > window_bytes(1000, window=5)
    per_token = (window_bytes(1000, window=9) - window_bytes(1000, window=5)) // 4
    assert window_bytes(3, window=5, sink_len=4) == window_bytes(3, window=5) == 3 * per_token  # all 3 tokens, once
