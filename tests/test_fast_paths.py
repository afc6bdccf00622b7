"""The speed paths compute the same things as the plain ones.

* ``score_mask``: the model's outputs at selected positions equal the rows of its dense output;
* the objective's masked-positions-only loss equals the dense loss, value and gradient;
* samplers that ask for masked positions only give the same tokens as with a model that computes all;
* the event-batched exact cache gives the uncached sampler's tokens, trajectory and callbacks;
* the training-time attention form equals the fused kernel.
"""

import pytest
import torch
from torch import nn

from diffusion import DDiTConfig, DDiTModel
from diffusion.modeling_ddit import ROW_BUCKET, accepts_score_mask
from diffusion.objectives import DiffusionObjective
from samplers import get_sampler

V = 24  # real tokens


def _model(**overrides):
    torch.manual_seed(0)
    base = dict(vocab_size=V + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                max_position_embeddings=160)
    model = DDiTModel(DDiTConfig(**{**base, **overrides})).eval()
    with torch.no_grad():  # open the adaLN gates so that time conditioning matters
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


MODELS = {
    "subs": lambda: _model(),
    "score absorbing": lambda: _model(parameterization="score"),
    "score uniform": lambda: _model(parameterization="score", process="uniform", vocab_size=V, schedule="geometric",
                                    schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0}),
}


class Dense(nn.Module):
    """The same model without ``score_mask`` support: every caller falls back to the dense outputs."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("kind", MODELS)
def test_score_mask_outputs_are_the_dense_rows(kind):
    model = MODELS[kind]()
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (3, 150), generator=gen)
    if mask_id is not None:
        x[torch.rand(x.shape, generator=gen) < 0.5] = mask_id
    sigma = torch.tensor([0.3, 1.0, 2.5])
    with torch.no_grad():
        dense = model(input_ids=x, total_noise=sigma).logits
        choices = {
            "masked": x == mask_id if mask_id is not None else torch.rand(x.shape, generator=gen) < 0.4,
            "mixed": torch.rand(x.shape, generator=gen) < 0.3,  # masked and unmasked positions
            "one row": torch.zeros_like(x, dtype=torch.bool).index_fill_(1, torch.tensor([5]), True),
            "none": torch.zeros_like(x, dtype=torch.bool),
        }
        for name, where in choices.items():
            assert int(where.sum()) % ROW_BUCKET != 0 or name == "none"  # the padded head path is used
            sparse = model(input_ids=x, total_noise=sigma, score_mask=where).logits
            assert sparse.shape == (int(where.sum()), model.config.vocab_size), name
            torch.testing.assert_close(sparse, dense[where], rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="score_mask"):
        model(input_ids=x, total_noise=sigma, score_mask=where.long())


@pytest.mark.parametrize("kind, objective", [("subs", "masked_elbo"), ("subs", "score_entropy"),
                                             ("score absorbing", "score_entropy")])
def test_masked_positions_loss_equals_the_dense_loss_and_gradient(kind, objective):
    model = MODELS[kind]().train()
    assert accepts_score_mask(model) and not accepts_score_mask(Dense(model))
    loss_fn = DiffusionObjective.from_config(model.config, objective)
    x0 = torch.randint(0, V, (4, 40), generator=torch.Generator().manual_seed(2))
    t, xt = loss_fn.corrupt(x0, generator=torch.Generator().manual_seed(3))
    padding = torch.ones_like(x0)
    padding[1, 30:] = 0
    for attention_mask in (None, padding):
        results = []
        for caller in (model, Dense(model)):
            model.zero_grad(set_to_none=True)
            out = loss_fn.loss(caller, x0, xt, t, attention_mask=attention_mask)
            out.loss.backward()
            results.append((out.per_sequence.detach(), [p.grad.clone() for p in model.parameters()]))
        (sparse, sparse_grads), (dense, dense_grads) = results
        assert int((dense > 0).sum()) >= 3  # real losses (a row with a tiny t may have nothing masked)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
        for a, b in zip(sparse_grads, dense_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


SAMPLER_CASES = [
    ("ancestral", {"cache": False, "temperature": 0.9, "top_k": 6}, "subs"),
    ("ancestral", {"top_p": 0.9}, "subs"),
    ("euler", {}, "score absorbing"),
    ("analytic", {}, "subs"),
    ("analytic", {}, "score uniform"),
    ("remask", {"block_length": 8, "temperature": 1.0}, "subs"),
    ("threshold", {"threshold": 0.1, "block_length": 8}, "subs"),
]


@pytest.mark.parametrize("name, options, kind", SAMPLER_CASES)
def test_samplers_give_the_same_tokens_with_a_dense_model(name, options, kind):
    model = MODELS[kind]()
    canvas = torch.full((3, 32), -1)
    canvas[:, :5] = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(4))
    outs = [get_sampler(name, **options).generate(m, canvas=canvas, num_steps=32,
                                                  generator=torch.Generator().manual_seed(5))
            for m in (model, Dense(model))]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert bool((outs[0].tokens[:, :5] == canvas[:, :5]).all())


def test_event_batched_cache_equals_the_step_loop():
    """Same tokens, the same canvas after every step (trajectory and callback) and far fewer calls."""
    model = MODELS["subs"]()
    canvas = torch.full((4, 24), -1)
    canvas[:, [0, 7, 23]] = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(6))
    runs = []
    for cache in (True, False):
        seen = []
        out = get_sampler("ancestral", cache=cache, temperature=0.8).generate(
            model, canvas=canvas, num_steps=200, return_trajectory=True,
            callback=lambda step, x, seen=seen: seen.append((step, x.clone())),
            generator=torch.Generator().manual_seed(7))
        runs.append((out, seen))
    (cached, cached_seen), (plain, plain_seen) = runs
    assert torch.equal(cached.tokens, plain.tokens)
    assert len(cached.trajectory) == len(plain.trajectory) == 201
    assert all(torch.equal(a, b) for a, b in zip(cached.trajectory, plain.trajectory))
    assert [s for s, _ in cached_seen] == [s for s, _ in plain_seen] == list(range(200))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(cached_seen, plain_seen))
    # Every sequence changes at most 21 times (its free tokens), so at most 21 batched rounds + noise removal.
    assert plain.nfe == 200 and cached.nfe <= 22
    # The generator is left where the step loop leaves it.
    gens = [torch.Generator().manual_seed(8) for _ in range(2)]
    for cache, gen in zip((True, False), gens):
        get_sampler("ancestral", cache=cache).generate(model, canvas=canvas, num_steps=50, generator=gen)
    assert torch.equal(torch.rand(3, generator=gens[0]), torch.rand(3, generator=gens[1]))


def test_training_attention_form_equals_the_fused_kernel():
    model = MODELS["score absorbing"]()
    x = torch.randint(0, V + 1, (2, 40), generator=torch.Generator().manual_seed(9))
    padding = torch.ones_like(x)
    padding[1, 25:] = 0
    sigma = torch.tensor([0.5, 1.5])
    with torch.no_grad():  # inference: scaled_dot_product_attention
        fused = model(input_ids=x, total_noise=sigma, attention_mask=padding).logits
    assert torch.equal(model(input_ids=x, total_noise=sigma, attention_mask=padding).logits.detach(), fused)  # eval + grad
    model.train()  # training mode with autograd on a CPU: the matmul form (no dropout here)
    trained = model(input_ids=x, total_noise=sigma, attention_mask=padding).logits
    real = fused > -1e5
    torch.testing.assert_close(trained.detach()[real], fused[real], rtol=1e-5, atol=1e-5)
    # A sequence that is all padding has no visible key; the matmul form stays finite there.
    padding[0] = 0
    out = model(input_ids=x, total_noise=sigma, attention_mask=padding).logits
    assert bool(torch.isfinite(out[out > -1e5]).all())
    model.eval()
