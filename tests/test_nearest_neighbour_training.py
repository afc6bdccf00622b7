"""Nearest-neighbour D3PM from ddlm-train (``--process nearest_neighbour --transition-embeddings MODEL``): the x0
model's scores are the exact mixture over its posterior, a run builds its neighbour lists from the given embeddings
and keeps them in its weights, trains on D3PM's L_vb, resumes bit-exactly, and its folder is sampled by ``d3pm``
and scored by ``ddlm-eval ppl --discrete-time``."""

import json

import pytest
import scipy.linalg
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.spec import DiffusionSpec
from diffusion.structured import SymmetricRateProcess, nearest_neighbour_rate, nearest_neighbours, neighbour_rate


def test_an_x0_models_scores_are_the_mixture_over_its_posterior():
    """``s_y = sum_x0 p(x0 | x_t) q_t(y | x0) / q_t(x_t | x0)`` against scipy's expm, for every x_t."""
    k = 6
    embeddings = torch.randn(k, 3, generator=torch.Generator().manual_seed(0))
    rate = nearest_neighbour_rate(embeddings, 2)
    process = SymmetricRateProcess(rate)
    log_probs = torch.log_softmax(torch.randn(k, k, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64), -1)
    for sigma in (0.1, 1.7):
        kernel = torch.from_numpy(scipy.linalg.expm(sigma * rate.numpy()))  # kernel[x0, y] = q_t(y | x0)
        x_t = torch.arange(k)
        got = process.log_score_from_log_probs(log_probs, sigma, x_t)
        for xt in range(k):
            want = (log_probs[xt].exp()[:, None] * kernel / kernel[:, xt : xt + 1]).sum(0)
            assert torch.allclose(got[xt].exp(), want, rtol=1e-9), (sigma, xt)
    assert torch.equal(nearest_neighbour_rate(embeddings, 2), neighbour_rate(nearest_neighbours(embeddings, 2)))


def test_an_untrained_x0_head_is_the_forward_posterior_of_uniform_data():
    """With zero raw outputs the head gives p(x0 | x_t) proportional to q_t(x_t | x0): the row x_t of the kernel."""
    k = 12
    config = DDiTConfig(vocab_size=k, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cond_dim=8,
                        process="nearest_neighbour", parameterization="x0", schedule="geometric",
                        schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0}, transition_neighbours=3)
    model = DDiTModel(config)
    model.neighbour_graph.neighbours.copy_(nearest_neighbours(torch.randn(k, 4, generator=torch.Generator()
                                                                          .manual_seed(2)), 3))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    process = DiffusionSpec.of(model).process
    ids = torch.randint(0, k, (2, 5), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.3, 2.0])
    got = model(input_ids=ids, total_noise=sigma).logits.double().exp()
    rows = process.transition_probs(ids, sigma)  # q_t(. | x0 = x_t) = q_t(x_t | x0 = .): the kernel is symmetric
    assert torch.allclose(got, rows / rows.sum(-1, keepdim=True), atol=1e-6)


def test_ddlm_train_builds_the_graph_trains_d3pm_resumes_and_its_model_is_sampled_and_scored(tmp_path, capsys):
    from safetensors.torch import load_file

    from diffusion.training import train
    from diffusion.training.config import TrainConfig
    from diffusion.training.init_model import load_token_embeddings
    from samplers import get_sampler
    from samplers.cli.evaluate import main as eval_main

    torch.manual_seed(0)
    source = DDiTModel(DDiTConfig(vocab_size=600, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  cond_dim=8))
    source.save_pretrained(tmp_path / "embeddings")
    config = dict(output_dir=str(tmp_path / "run"), process="nearest_neighbour", objective="score_entropy",
                  parameterization="x0", discrete_time=16, transition_embeddings=str(tmp_path / "embeddings"),
                  neighbours=4, tokenizer="train:300", seq_len=32, hidden_size=32, num_layers=1, num_heads=2,
                  cond_dim=16, batch_size=8, max_steps=24, warmup_steps=3, eval_every=12, eval_blocks=16,
                  eval_batch_size=16, save_every=12, lr=3e-3, precision="no", progress=False,
                  max_position_embeddings=32)
    result = train(TrainConfig(**config))
    losses = [r["eval_loss"] for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "eval_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, losses
    model = DDiTModel.from_pretrained(result.final_dir).eval()
    n = model.config.vocab_size
    process = DiffusionSpec.of(model).process
    embeddings = load_token_embeddings(str(tmp_path / "embeddings"), n)
    assert isinstance(process, SymmetricRateProcess)
    assert torch.equal(process.rate, nearest_neighbour_rate(embeddings, 4))
    straight = load_file(str(result.final_dir / "model.safetensors"))
    config.update(output_dir=str(tmp_path / "resumed"), stop_after_steps=12)
    train(TrainConfig(**config))
    config.update(stop_after_steps=None, resume="auto")
    again = load_file(str(train(TrainConfig(**config)).final_dir / "model.safetensors"))
    assert set(again) == set(straight) and all(torch.equal(straight[name], again[name]) for name in straight)

    out = get_sampler("d3pm").generate(model, batch_size=2, length=16, num_steps=8,
                                       generator=torch.Generator().manual_seed(0))
    assert out.nfe == 8 and bool((out.tokens >= 0).all()) and bool((out.tokens < n).all())
    capsys.readouterr()
    eval_main(["ppl", "--model", str(result.final_dir), "--max-blocks", "4", "--discrete-time", "16", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["form"].startswith("discrete time") and record["nats_per_token"] > 0


@pytest.mark.parametrize("bad, match", [
    ({"transition_embeddings": None}, "process='nearest_neighbour' and transition_embeddings go together"),
    ({"objective": "masked_elbo"}, "needs process='absorbing'|trains with objective='score_entropy'"),
    ({"neighbours": 0}, "neighbours must be an int >= 1"),
    ({"block_size": 4, "seq_len": 32}, "no block_size or init_from"),
])
def test_what_a_nearest_neighbour_run_cannot_take_is_named(bad, match):
    from diffusion.training.config import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"process": "nearest_neighbour", "objective": "score_entropy", "transition_embeddings": "x",
                       **bad})
    with pytest.raises(ValueError, match="process='nearest_neighbour' and transition_embeddings go together"):
        TrainConfig(transition_embeddings="x")
    with pytest.raises(ValueError, match="needs transition_neighbours"):
        DDiTConfig(vocab_size=10, process="nearest_neighbour", parameterization="x0")
    with pytest.raises(ValueError, match="lives in its weights"):
        DiffusionSpec.from_config(DDiTConfig(vocab_size=10, process="nearest_neighbour", parameterization="x0",
                                             transition_neighbours=2)).process


def test_embeddings_with_too_few_rows_are_refused(tmp_path):
    from diffusion.training.init_model import load_token_embeddings

    DDiTModel(DDiTConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         cond_dim=8)).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="embeds 20 tokens, fewer than this run's 300"):
        load_token_embeddings(str(tmp_path / "small"), 300)
