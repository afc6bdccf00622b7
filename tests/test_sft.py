"""Instruction SFT: exact chat formatting, no loss on the prompt, EOS padding, LoRA, bit-exact resume, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

from diffusion import DDiTConfig, DDiTModel
from diffusion.adapters import DenoiserConfig, load_denoiser
from diffusion.data import load_tokenizer
from diffusion.data.instructions import (
    InstructionExample,
    collate,
    encode_example,
    encode_examples,
    load_instruction_rows,
)
from diffusion.lambda_form import completion_loss
from diffusion.training.sft import SFTConfig, train_sft

V = 9


def test_chat_rows_are_formatted_exactly_as_apply_chat_template_does():
    tokenizer = load_tokenizer("builtin")
    rows = load_instruction_rows("builtin:shakespeare-dialogue")
    conversation = {"messages": [{"role": "system", "content": "Speak in verse."}, *rows[3]["messages"]]}
    for row in (rows[0], rows[1], conversation):
        example = encode_example(row, tokenizer)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=True, add_generation_prompt=True)
        assert example.prompt + example.completion == list(full)
        assert example.prompt == list(prompt["input_ids"])
    assert tokenizer.decode(encode_example(rows[0], tokenizer).completion).startswith("FRANCISCO:")
    plain = encode_example({"prompt": "To be", "completion": " or not"}, tokenizer, format="plain")
    assert plain.prompt == tokenizer("To be", add_special_tokens=False)["input_ids"]
    assert plain.completion == tokenizer(" or not", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


class _TableModel(nn.Module):
    """Logits are a learnable table ``[L, V]`` (the same for every row): the loss's gradient shows which positions'
    outputs it reads."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(length, V, generator=torch.Generator().manual_seed(0)))
        self.config = DenoiserConfig(vocab_size=V, mask_token_id=V - 1, max_position_embeddings=length)

    def forward(self, input_ids, total_noise=None, attention_mask=None, **kwargs):
        return MaskedLMOutput(logits=torch.log_softmax(self.table.expand(input_ids.shape[0], -1, -1), -1))


def test_the_loss_never_reads_a_prompt_position_and_never_masks_one():
    model = _TableModel(10)
    sequences = torch.randint(0, V - 1, (16, 10), generator=torch.Generator().manual_seed(1))
    completion = torch.zeros(16, 10, dtype=torch.bool)
    completion[:, 6:] = True  # the prompt is positions 0..5
    loss = completion_loss(model, sequences, completion, V - 1, torch.Generator().manual_seed(2))
    loss.backward()
    assert bool((model.table.grad[:6] == 0).all())  # zero gradient w.r.t. every prompt-only output
    assert bool((model.table.grad[6:] != 0).any())
    from diffusion.processes import mask_tokens

    _, masked = mask_tokens(sequences, torch.full((16,), 0.99), V - 1, where=completion,
                            generator=torch.Generator().manual_seed(3))
    assert not bool(masked[:, :6].any()) and bool(masked[:, 6:].any())


def test_padding_with_eos_trains_on_the_eos_and_otherwise_padding_is_out_of_the_loss():
    examples = [InstructionExample([5, 6], [7, 0]), InstructionExample([5], [7, 7, 7, 0])]
    padded = collate(examples, eos_id=0, pad_with_eos=True, max_length=8)
    assert padded.sequences.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [5, 7, 7, 7, 0, 0, 0, 0]]
    assert padded.completion.tolist() == [[False, False] + [True] * 6, [False] + [True] * 7]
    assert padded.attention_mask is None
    plain = collate(examples, eos_id=0, pad_with_eos=False)
    assert plain.sequences.shape == (2, 5)
    assert plain.completion.tolist() == [[False, False, True, True, False], [False, True, True, True, True]]
    assert plain.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    tokenizer = load_tokenizer("builtin")
    long = {"prompt": "word " * 40, "completion": "more " * 40}
    kept, dropped = encode_examples([long, {"prompt": "x", "completion": "more " * 40}], tokenizer, max_length=30,
                                    format="plain")
    assert dropped == 1 and len(kept) == 1 and len(kept[0].prompt) + len(kept[0].completion) == 30


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, max_position_embeddings=128, mask_token_id=tokenizer.mask_token_id,
                                 eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(base, output, **overrides) -> SFTConfig:
    values = dict(model=str(base), output_dir=str(output), max_length=96, batch_size=4, max_steps=4, lr=3e-3,
                  save_every=2, log_every=1, progress=False, precision="no")
    return SFTConfig(**{**values, **overrides})


def test_sft_resumes_bit_exactly_and_the_final_model_reloads(tmp_path, base_model):
    straight = train_sft(_config(base_model, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):  # stopped after the step-2 checkpoint
        _interrupt_after(_config(base_model, tmp_path / "b"), step=3)
    resumed = train_sft(_config(base_model, tmp_path / "b", resume="auto"))
    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in straight.metrics_path.read_text().splitlines()]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    model, tokenizer = load_denoiser(str(straight.final_dir))
    assert tokenizer.chat_template and model.config.mask_token_id == 4096


def _interrupt_after(config: SFTConfig, step: int) -> None:
    """Run ``config`` and raise KeyboardInterrupt when the optimizer reaches ``step``."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_then_stop(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step_then_stop
    try:
        train_sft(config)
    finally:
        torch.optim.AdamW.step = original


def test_lora_trains_only_the_adapters_and_exports_merged_weights(tmp_path, base_model):
    result = train_sft(_config(base_model, tmp_path / "lora", lora_rank=2, max_steps=2, pad_with_eos=True,
                               lr=1e-2))
    base = load_file(str(base_model / "model.safetensors"))
    tuned = load_file(str(result.final_dir / "model.safetensors"))
    assert tuned.keys() == base.keys()  # merged: a plain model, no LoRA keys
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(any(t in k for t in ("qkv", "attn_out", "mlp_in", "mlp_out")) for k in changed), changed
    assert "embed_tokens.weight" not in changed


def test_bad_sft_input_is_one_line_and_exit_2(tmp_path, base_model):
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "no chat here"}) + "\n")
    with pytest.raises(ValueError, match=r"has the columns \['text'\]: instruction data needs a 'messages' column"):
        load_instruction_rows(str(data))
    done = subprocess.run([sys.executable, "-m", "diffusion.cli.sft", "--model", str(base_model), "--data", str(data),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "instruction data needs a 'messages' column" in done.stderr
    tokenizer = load_tokenizer("builtin")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat rows need a tokenizer with a chat template"):
        encode_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       tokenizer)
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        _config(base_model, tmp_path, lora_rank=-1)
