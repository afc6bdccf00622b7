"""Token editing (LLaDA 2.1) in the remasking sampler: what it reads, when it edits, what it never touches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion import DDiTConfig, DDiTModel
from diffusion.adapters import DiffusionLMAdapter
from samplers import FREE, get_sampler

V, MASK, LENGTH = 20, 19, 12
STRENGTH = 3.0  # p(preferred) = e^3 / (e^3 + 18) = 0.527 over the 19 real tokens


class _Prefers(nn.Module):
    """Logits that prefer token ``10 + i % 5`` at position i, the same at every position whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=V, max_position_embeddings=32)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, V)
        logits.scatter_(-1, preferred(length).expand(batch, length).unsqueeze(-1), STRENGTH)
        return SimpleNamespace(logits=logits)


def preferred(length: int) -> torch.Tensor:
    return 10 + torch.arange(length) % 5


MODEL = DiffusionLMAdapter(_Prefers(), MASK)
PROMPT = torch.tensor([[1, 2, 3]])


def _sample(edit_threshold: float | None, seed: int = 0, **kwargs):
    return get_sampler("remask", edit_threshold=edit_threshold, **kwargs).generate(
        MODEL, prompt_ids=PROMPT.expand(8, -1), length=LENGTH, num_steps=LENGTH,
        generator=torch.Generator().manual_seed(seed), return_trajectory=True)


def test_the_adapter_gives_its_own_prediction_at_unmasked_positions_when_asked():
    x = torch.tensor([[1, 2, MASK, 4]])
    carried = MODEL(input_ids=x).logits[0]
    own = MODEL(input_ids=x, carry_unmasked=False).logits[0]
    assert carried[0, 1] == 0 and own[0, 1] < 0  # point mass on the token, or the model's prediction
    expected = torch.log_softmax(_Prefers()(x).logits[0, :, :MASK], -1)
    torch.testing.assert_close(own[:, :MASK], expected)
    assert bool((own[:, MASK] == carried[:, MASK]).all()) and float(own[:, MASK].max()) < -1e5  # MASK: probability 0


def test_threshold_one_never_edits_and_equals_no_editing_token_for_token():
    plain, never = _sample(None), _sample(1.0)
    assert torch.equal(plain.tokens, never.tokens) and plain.nfe == never.nfe == LENGTH


def test_editing_replaces_every_committed_token_the_model_is_sure_of_and_never_the_prompt():
    plain, edited = _sample(None), _sample(0.5)
    target = preferred(3 + LENGTH)[3:]
    assert torch.equal(edited.tokens[:, :3], PROMPT.expand(8, -1)) and edited.nfe == LENGTH
    assert bool((plain.tokens[:, 3:] != target).any())  # without editing, sampling at temperature 1 strays
    # one token per step: every token committed before the last step was read again and set to the preferred one
    last = [int(((a != b) & (a == MASK)).nonzero()[0, 0]) for a, b in zip(edited.trajectory[-2], edited.trajectory[-1])]
    for row, last_position in enumerate(last):
        others = torch.ones(3 + LENGTH, dtype=torch.bool)
        others[:3] = False
        others[last_position] = False
        assert torch.equal(edited.tokens[row][others], preferred(3 + LENGTH)[others])
    # p(preferred) = 0.527: a threshold above it never edits
    assert torch.equal(_sample(0.53).tokens, plain.tokens)


def test_editing_stays_inside_the_current_block():
    edited = _sample(0.5, block_length=6, seed=3)  # blocks [0, 6), [6, 12), [12, 15), 4 steps each
    wrong = edited.tokens != preferred(3 + LENGTH)
    wrong[:, :3] = False
    for start in (0, 6, 12):  # each block's last step commits one token, which nothing reads again
        assert int(wrong[:, start:start + 6].sum(-1).max()) <= 1
    assert int(wrong.sum(-1).max()) >= 2  # so edits never reach back into a finished block


def test_editing_refuses_a_bad_threshold_or_a_model_that_carries_tokens_over():
    ddit = DDiTModel(DDiTConfig(vocab_size=V + 1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                max_position_embeddings=16))
    with pytest.raises(ValueError, match="edit_threshold=1.5"):
        get_sampler("remask", edit_threshold=1.5)
    with pytest.raises(ValueError, match="edit_threshold=nan"):
        get_sampler("remask", edit_threshold=float("nan"))
    with pytest.raises(ValueError, match="DDiTModel's subs outputs carry"):
        get_sampler("remask", edit_threshold=0.9).generate(ddit, canvas=torch.full((1, 4), FREE), num_steps=4)
