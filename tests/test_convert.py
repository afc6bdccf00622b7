"""Converting a causal LM into a masked-diffusion denoiser: what it keeps, what it adds, how it reloads."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from diffusion import DiffusionObjective, DiffusionSpec
from diffusion.adapters import load_denoiser, read_converted
from diffusion.attention_patterns import annealed_causal, attention_pattern
from diffusion.cli.loading import load_model_for
from diffusion.convert import choose_mask_id, convert_causal_lm, load_causal_lm
from diffusion.data.corpus import builtin_tokenizer_path
from samplers import get_sampler


def _tokenizer() -> PreTrainedTokenizerFast:
    """The built-in BPE (4096 pieces, <|endoftext|> and <|mask|> as added tokens) without a mask token set."""
    return PreTrainedTokenizerFast(tokenizer_file=str(builtin_tokenizer_path() / "tokenizer.json"),
                                   eos_token="<|endoftext|>")


def _llama(vocab: int, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def _gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_conversion_keeps_every_weight_but_the_added_mask_row_which_is_the_mean(tie):
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    original = _llama(vocab, tie=tie)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    adapter, tokenizer = convert_causal_lm(original, tokenizer)
    mask = adapter.config.mask_token_id
    assert (mask, len(tokenizer), adapter.config.vocab_size) == (vocab, vocab + 1, vocab + 1)
    assert tokenizer.convert_ids_to_tokens(mask) == "<|mdm_mask|>"
    after = adapter.model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        if value.shape[0] == vocab and value.dim() == 2:  # the embedding and the head gained one row
            assert torch.equal(after[name][:vocab], value), name
            torch.testing.assert_close(after[name][mask], value.mean(0))
        else:
            assert torch.equal(after[name], value), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_with_the_causal_mask_kept_and_shift_on_the_converted_model_is_the_original(family):
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    build = _llama if family == "llama" else _gpt2
    original, copy = build(vocab), build(vocab)
    adapter, _ = convert_causal_lm(copy, tokenizer, attention="causal", shift_logits=True)
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(input_ids=x).logits
        inner = adapter.model(input_ids=x, attention_mask=adapter._attention_mask(x, None, None)).logits
        torch.testing.assert_close(inner[..., :vocab], expected, rtol=0, atol=0)  # the 4-D causal mask path
        masked = x.clone()
        masked[:, -1] = adapter.config.mask_token_id  # the output at L-2 predicts token L-1
        out = adapter(input_ids=masked).logits[:, -1]
    torch.testing.assert_close(out[:, :vocab], torch.log_softmax(expected[:, -2].float(), -1), rtol=1e-5, atol=1e-5)
    assert bool(torch.isneginf(out[:, adapter.config.mask_token_id]).all() or
                (out[:, adapter.config.mask_token_id] < -1e4).all())


def test_bidirectional_attention_lets_early_positions_see_later_ones():
    tokenizer = _tokenizer()
    adapter, _ = convert_causal_lm(_llama(len(tokenizer)), tokenizer)
    causal, _ = convert_causal_lm(_llama(len(tokenizer)), _tokenizer(), attention="causal")
    mask = adapter.config.mask_token_id
    x = torch.full((1, 8), mask)
    y = x.clone()
    y[0, 6] = 17
    with torch.no_grad():
        assert not torch.allclose(adapter(input_ids=x).logits[0, 1], adapter(input_ids=y).logits[0, 1])
        assert torch.equal(causal(input_ids=x).logits[0, 1], causal(input_ids=y).logits[0, 1])


def test_annealed_attention_grows_from_causal_to_bidirectional_in_one_fixed_order():
    causal, full = attention_pattern("causal", 16), attention_pattern("bidirectional", 16)
    assert torch.equal(annealed_causal(16, 0.0), causal) and torch.equal(annealed_causal(16, 1.0), full)
    previous = causal
    for progress in (0.25, 0.5, 0.75):
        current = annealed_causal(16, progress)
        assert bool((current >= previous).all()) and torch.equal(current, annealed_causal(16, progress))
        future = current & ~causal
        assert abs(future.sum().item() / (~causal).sum().item() - progress) < 0.15
        previous = current
    tokenizer = _tokenizer()
    adapter, _ = convert_causal_lm(_llama(len(tokenizer)), tokenizer, anneal_steps=4)
    x = torch.zeros(1, 16, dtype=torch.long)
    adapter.train()
    adapter.set_step(0)
    assert torch.equal(adapter._attention_mask(x, None, None)[0, 0] == 0, causal)
    adapter.set_step(2)
    assert torch.equal(adapter._attention_mask(x, None, None)[0, 0] == 0, annealed_causal(16, 0.5))
    adapter.eval()  # evaluation and sampling use the attention the model is annealed towards
    assert bool((adapter._attention_mask(x, None, None) == 0).all())


def test_a_converted_folder_reloads_with_its_own_architecture_and_runs_every_sampler(tmp_path):
    tokenizer = _tokenizer()
    adapter, tokenizer = convert_causal_lm(_llama(len(tokenizer)), tokenizer)
    adapter.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert read_converted(str(tmp_path)) == {"mask_token_id": 4097, "shift_logits": True, "attention": "bidirectional",
                                             "block_size": None, "eos_token_id": 0}
    loaded, loaded_tokenizer = load_denoiser(str(tmp_path))
    model, _, causal = load_model_for(str(tmp_path))
    assert not causal and loaded_tokenizer.mask_token_id == 4097
    x = torch.randint(0, 4096, (2, 10), generator=torch.Generator().manual_seed(2))
    x[:, 3:7] = 4097
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, adapter(input_ids=x).logits)
    for name in ("ancestral", "remask", "threshold"):
        out = get_sampler(name).generate(loaded, batch_size=2, length=8, num_steps=8,
                                         generator=torch.Generator().manual_seed(3))
        assert not bool((out.tokens == 4097).any()), name
    from diffusion.hub import export_for_hub, read_sampler_config

    exported = export_for_hub(tmp_path, tmp_path.parent / f"{tmp_path.name}-hub")  # what ddlm-push uploads
    assert read_sampler_config(exported) == {"sampler": "ancestral", "num_steps": 128}
    assert "converted from a causal LM" in (exported / "README.md").read_text()
    again, _ = load_denoiser(str(exported))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, adapter(input_ids=x).logits)


def test_a_block_converted_model_conditions_each_block_on_the_clean_prefix():
    """Block size 1, every token masked: the block-diffusion loss is the prefix-by-prefix NLL of the adapter."""
    from diffusion.block_diffusion import BlockDiffusionObjective

    tokenizer = _tokenizer()
    adapter, _ = convert_causal_lm(_llama(len(tokenizer)), tokenizer, attention="block", block_size=1,
                                   shift_logits=False)
    spec = DiffusionSpec.from_config(adapter.config)
    assert spec.block_size == 1
    objective = BlockDiffusionObjective.from_spec(spec, 1)
    mask = adapter.config.mask_token_id
    x0 = torch.randint(0, 4096, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = objective.loss(adapter, x0, torch.full_like(x0, mask), torch.ones(2, 6)).per_sequence.double()
        expected = torch.zeros(2, dtype=torch.float64)
        for b in range(6):
            prefix = torch.cat([x0[:, :b], torch.full((2, 1), mask)], dim=1)
            expected -= adapter(input_ids=prefix).logits[:, b].double().gather(-1, x0[:, b : b + 1]).squeeze(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = get_sampler("block").generate(adapter, batch_size=2, length=6, num_steps=6,  # its default: no KV cache
                                        generator=torch.Generator().manual_seed(7))
    assert not bool((out.tokens == mask).any())


def test_a_mask_id_anywhere_trains_with_the_masked_elbo():
    tokenizer = _tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reserved_0|>"]})  # id 4097, unused by text
    model = _llama(len(tokenizer) + 3)  # three padding rows past the tokenizer, as Qwen has
    adapter, _ = convert_causal_lm(model, tokenizer, mask_token_id=4097)
    spec = DiffusionSpec.from_config(adapter.config)
    assert (spec.mask_id, spec.num_states) == (4097, len(tokenizer) + 3)
    objective = DiffusionObjective.from_spec(spec)
    x0 = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(4))
    t, xt = objective.corrupt(x0, generator=torch.Generator().manual_seed(5))
    assert bool(((xt == 4097) | (xt == x0)).all()) and bool((xt == 4097).any())
    loss = objective.loss(adapter, x0, xt, t).loss
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match="needs MASK as the last state"):
        DiffusionObjective.from_spec(spec, "score_entropy")


def test_bad_conversions_are_refused_in_one_line(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = _tokenizer()
    with pytest.raises(ValueError, match="collides with the real token 'Ġthe'"):
        choose_mask_id(_llama(len(tokenizer)), tokenizer, mask_token_id=tokenizer.convert_tokens_to_ids("Ġthe"))
    with pytest.raises(ValueError, match="is the tokenizer's eos token"):
        choose_mask_id(_llama(len(tokenizer)), tokenizer, mask_token_id=tokenizer.eos_token_id)
    with pytest.raises(ValueError, match=r"mask_token_id must be an id in \[0, 4097\)"):
        choose_mask_id(_llama(len(tokenizer)), tokenizer, mask_token_id=5000)
    with pytest.raises(ValueError, match="is already the real token"):
        choose_mask_id(_llama(len(tokenizer)), tokenizer, mask_token="Ġthe")
    with pytest.raises(ValueError, match="attention='block' needs shift_logits=False"):
        convert_causal_lm(_llama(len(tokenizer)), tokenizer, attention="block", block_size=4)
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"is a BertForMaskedLM, which has no causal-LM head"):
        load_causal_lm(str(bert))
    from diffusion.cli.convert import main as convert_main

    assert convert_main(["--model", str(bert), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which has no causal-LM head" in err and not (tmp_path / "out").exists()
