"""Outside diffusion LMs through the adapters: LLaDA- and Dream-style remote code, BERT and ModernBERT.

Each model is a tiny random one built from a config and saved to a folder, then loaded back the way a
user would load a Hub model (``load_denoiser``), so the remote-code path really runs.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from diffusion.data import load_tokenizer
from diffusion.modeling_ddit import subs_log_probs
from diffusion import DiffusionLMAdapter, MaskedLMAdapter, load_denoiser
from samplers import FREE, get_sampler

REPO = Path(__file__).resolve().parents[1]
VOCAB = 4097  # the built-in tokenizer: 4096 BPE tokens + <|mask|> = 4096
MASK = 4096


def _stand_ins():
    if "modeling_tiny_dlm" not in sys.modules:  # save_pretrained copies the file it finds in sys.modules
        spec = importlib.util.spec_from_file_location("modeling_tiny_dlm", REPO / "tests/remote_code/modeling_tiny_dlm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["modeling_tiny_dlm"] = module
        spec.loader.exec_module(module)
    return sys.modules["modeling_tiny_dlm"]


def _save_remote(folder: Path, family: str) -> Path:
    """A remote-code folder: config + weights + modeling file + tokenizer (+ generation config for Dream)."""
    tiny = _stand_ins()
    torch.manual_seed(0)
    if family == "llada":
        config_cls, model_cls = tiny.LLaDAConfig, tiny.LLaDAModelLM
        config = config_cls(vocab_size=VOCAB, mask_token_id=MASK)
    else:
        config_cls, model_cls = tiny.DreamConfig, tiny.DreamModel
        config = config_cls(vocab_size=VOCAB)
        GenerationConfig(mask_token_id=MASK).save_pretrained(folder)
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModel")
    model_cls(config).save_pretrained(folder)
    tokenizer = load_tokenizer("builtin")
    tokenizer.mask_token = None if family == "dream" else tokenizer.mask_token  # Dream: the id lives elsewhere
    tokenizer.save_pretrained(folder)
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    return folder


@pytest.fixture(scope="module", params=["llada", "dream"])
def remote(request, tmp_path_factory):
    return request.param, _save_remote(tmp_path_factory.mktemp(request.param), request.param)


def test_remote_code_runs_only_when_trusted(remote):
    _, folder = remote
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_denoiser(str(folder))


def test_remote_adapters_align_the_logits_of_each_family(remote):
    family, folder = remote
    model, tokenizer = load_denoiser(str(folder), trust_remote_code=True)
    assert type(model) is DiffusionLMAdapter and model.shift_logits == (family == "dream")
    assert model.config.mask_token_id == MASK and type(model.model).__module__.startswith("transformers_modules")
    x = torch.randint(0, VOCAB - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, 3:9] = MASK
    with torch.no_grad():
        raw = model.model(input_ids=x).logits.float()
        out = model(input_ids=x).logits
    aligned = torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if family == "dream" else raw
    torch.testing.assert_close(out, subs_log_probs(aligned, x, MASK), rtol=0, atol=0)
    clean = x != MASK
    assert torch.equal(out[clean].argmax(-1), x[clean])  # subs: clean tokens are carried over
    assert bool((out[~clean][:, MASK].exp() == 0).all())  # MASK is never predicted
    torch.testing.assert_close(out[~clean].exp().sum(-1), torch.ones(int((~clean).sum())))


def _check_sampler_invariants(model, mask_id: int, vocab: int) -> None:
    prefix, suffix = [5, 6, 7], [8, 9]
    canvas = torch.tensor([prefix + [FREE] * 8 + suffix] * 2)
    settings = {"ancestral": {}, "remask": {"block_length": 4}, "threshold": {"block_length": 4, "threshold": 0.5}}
    for name, options in settings.items():
        runs = [get_sampler(name, **options).generate(model, canvas=canvas, num_steps=12,
                                                      generator=torch.Generator().manual_seed(seed))
                for seed in (0, 0, 1)]
        tokens = runs[0].tokens
        assert not bool((tokens == mask_id).any()) and bool(((tokens >= 0) & (tokens < vocab)).all()), name
        assert tokens[:, :3].tolist() == [prefix] * 2 and tokens[:, -2:].tolist() == [suffix] * 2, name
        assert torch.equal(tokens, runs[1].tokens), name  # same seed, same tokens
        assert runs[0].nfe >= 1


def test_samplers_keep_their_invariants_through_the_remote_adapters(remote):
    _, folder = remote
    model, _ = load_denoiser(str(folder), trust_remote_code=True)
    _check_sampler_invariants(model, MASK, VOCAB)


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_masked_lm_adapters_load_from_a_folder_and_keep_the_invariants(arch, tmp_path):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        ModernBertConfig,
        ModernBertForMaskedLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if arch == "bert":
        model = BertForMaskedLM(BertConfig(**common))
    else:
        model = ModernBertForMaskedLM(ModernBertConfig(**common, pad_token_id=0, eos_token_id=0, bos_token_id=0,
                                                       cls_token_id=0, sep_token_id=0, global_attn_every_n_layers=1))
    model.save_pretrained(tmp_path)
    load_tokenizer("builtin").save_pretrained(tmp_path)  # its mask token is the id the adapter must find
    adapter, _ = load_denoiser(str(tmp_path))
    assert type(adapter) is MaskedLMAdapter and adapter.config.mask_token_id == MASK
    _check_sampler_invariants(adapter, MASK, VOCAB)
    with pytest.raises(ValueError, match="mask_token_id=4097"):
        MaskedLMAdapter(adapter.model, mask_token_id=4097)


def test_generate_cli_runs_a_remote_code_model_only_with_the_flag(tmp_path):
    folder = _save_remote(tmp_path / "llada", "llada")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-m", "samplers.cli.generate", "--model", str(folder), "--prompt", "To be",
               "--length", "6", "--sampling-steps", "6", "--json"]
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "needs its own code to run" in refused.stderr and "--trust-remote-code" in refused.stderr
    done = subprocess.run([*command, "--trust-remote-code"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["nfe"] >= 1 and MASK not in report["samples"][0]["tokens"]


def _rl_through(model, tokenizer, tmp_path):
    from rl.config import GRPOConfig
    from rl.tasks import SortTask
    from rl.trainer import GRPOTrainer

    task = SortTask(3)
    config = GRPOConfig(output_dir=str(tmp_path / "rl"), max_steps=2, prompts_per_step=2, group_size=3,
                        completion_length=4, sampler="remask", sampling_steps=4, lr=1e-3, inner_steps=2, beta=0.05,
                        save_every=0, progress=False, variance_draws=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    def text_length(prompts, completions, **fields):  # varies even for random models: non-zero advantages
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(model, tokenizer, config, [*task.reward_functions, text_length], task.records(20),
                          [*task.reward_weights, 0.1])
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([m["loss"], m["estimator_variance"], m["kl"]])).all() for m in history)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    return trainer


def test_rl_fine_tunes_the_remote_code_models_through_their_adapters(remote, tmp_path):
    _, folder = remote
    model, tokenizer = load_denoiser(str(folder), trust_remote_code=True)
    trainer = _rl_through(model, tokenizer, tmp_path)
    exported = tmp_path / "rl" / "final"
    assert json.loads((exported / "config.json").read_text())["auto_map"]  # saved in its own (remote-code) format
    reloaded, _ = load_denoiser(str(exported), trust_remote_code=True)
    x = torch.randint(0, VOCAB - 1, (1, 8))
    x[:, 4:] = MASK
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, trainer.model(input_ids=x).logits, rtol=0, atol=0)


def test_rl_fine_tunes_a_bert_masked_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))
    _rl_through(MaskedLMAdapter(bert, MASK), load_tokenizer("builtin"), tmp_path)
