"""diffusion/dropout.py: inverted dropout from 16-bit shares of 64-bit draws, and the model's two dropout rates."""

import math

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion import modeling_ddit
from diffusion.dropout import Dropout, dropout, dropout_keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 1 / 3, 0.9])
def test_rate_is_within_2_to_the_minus_17_of_p_and_the_mask_draws_it(p):
    torch.manual_seed(0)
    n = 2_000_003  # not a multiple of 4: the last 64-bit word is only partly used
    keep, p_eff = dropout_keep_mask((n,), p)
    assert abs(p_eff - p) <= 2.0**-17 and p_eff * 65536 == round(p * 65536)
    dropped = n - int(keep.sum())
    # binomial(n, p_eff): 5 standard deviations
    assert abs(dropped - n * p_eff) <= 5 * math.sqrt(n * p_eff * (1 - p_eff))


def test_output_and_gradient_are_the_inverted_dropout_of_the_mask_drawn():
    x = torch.randn(3, 17, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 17, 5, dtype=torch.float64)
    torch.manual_seed(1)
    y = dropout(x, 0.25)
    torch.manual_seed(1)
    keep, p_eff = dropout_keep_mask(x.shape, 0.25)
    reference = x.detach() * keep.double() * (1 / (1 - p_eff))
    assert torch.equal(y.detach(), reference)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g * keep.double() * (1 / (1 - p_eff)))


def test_the_mean_over_draws_is_the_input():
    torch.manual_seed(2)
    x = torch.linspace(-3, 3, 64, dtype=torch.float64)
    draws = torch.stack([dropout(x, 0.3) for _ in range(4000)])
    # each entry: mean of 4000 draws of x / (1 - p) * Bernoulli(1 - p); standard error |x| sqrt(p / (1 - p) / 4000)
    stderr = x.abs() * math.sqrt(0.3 / 0.7 / 4000)
    assert bool(((draws.mean(0) - x).abs() <= 5 * stderr + 1e-12).all())


def test_the_seed_fixes_the_mask_eval_mode_and_zero_rate_are_the_identity():
    x = torch.randn(4, 9)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.5))
    module = Dropout(0.5).eval()
    assert module(x) is x and dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match="p=1.0"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="p=-0.1"):
        dropout(x, -0.1)


def test_a_rate_within_2_to_the_minus_17_of_one_and_nan_behave_as_f_dropout():
    torch.manual_seed(4)
    y = dropout(torch.ones(1000), 1 - 2.0**-18)  # no 16-bit share resolves it: F.dropout draws instead
    assert torch.isfinite(y).all() and (y == 0).sum() >= 990
    x = torch.full((4000,), float("nan"))
    assert torch.isnan(dropout(x, 0.5)).all()  # a product, as F.dropout's: dropping a NaN keeps it NaN


def _attention_rates(monkeypatch, **rates):
    """The rates the model's attention passes to ``dropout`` in one training forward."""
    seen = []
    monkeypatch.setattr(modeling_ddit, "dropout", lambda x, p: seen.append(p) or x)
    config = DDiTConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, cond_dim=8,
                        max_position_embeddings=8, **rates)
    model = DDiTModel(config).train()
    model(torch.randint(0, 10, (2, 8)))
    return seen


def test_attention_dropout_defaults_to_dropout_and_zero_turns_it_off(monkeypatch):
    assert _attention_rates(monkeypatch, dropout=0.2) == [0.2, 0.2]
    assert _attention_rates(monkeypatch, dropout=0.2, attention_dropout=0.0) == []
    assert _attention_rates(monkeypatch, dropout=0.0, attention_dropout=0.4) == [0.4, 0.4]
    with pytest.raises(ValueError, match="attention_dropout=1.5"):
        DDiTConfig(attention_dropout=1.5)
