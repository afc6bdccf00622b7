"""A synthetic verifiable task that runs on a CPU in minutes: sort a short list of digits.

Prompt ``"31415>"`` (the digits, then ``>``), completion ``"11345"`` then EOS.  Every prompt and every
completion has the same number of tokens under the task's character tokenizer, so rollouts batch without
padding.  Rewards: :func:`sorted_exact` (1 if the completion is the sorted list), :func:`sorted_partial`
(the fraction of positions right, a dense signal) and the format check ``format_reward(r"\\d{n}")``.
"""

from __future__ import annotations

from typing import Any

import torch

from .rewards import format_reward

__all__ = ["SortTask", "char_tokenizer", "sorted_exact", "sorted_partial"]

_ALPHABET = list("0123456789>")


def char_tokenizer() -> Any:
    """A character tokenizer for the task: ``<|endoftext|>`` = 0, the digits and ``>``, ``<|mask|>`` last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(_ALPHABET)}, "<|mask|>": len(_ALPHABET) + 1}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   mask_token="<|mask|>", clean_up_tokenization_spaces=False)


def sorted_exact(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion is exactly the sorted digits.

    >>> sorted_exact(["312>"], ["123"], answer=["123"])
    [1.0]
    """
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def sorted_partial(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """The fraction of positions where the completion has the right digit.

    >>> sorted_partial(["312>"], ["132"], answer=["123"])
    [0.3333333333333333]
    """
    return [sum(x == y for x, y in zip(c.strip(), a)) / len(a) for c, a in zip(completions, answer)]


class SortTask:
    """Sort ``num_digits`` random digits.  ``records(n, generator)`` -> ``[{"prompt", "answer"}]``."""

    def __init__(self, num_digits: int = 5) -> None:
        if isinstance(num_digits, bool) or not isinstance(num_digits, int) or not 2 <= num_digits <= 32:
            raise ValueError(f"num_digits must be an int in [2, 32], got num_digits={num_digits!r}")
        self.num_digits = num_digits
        self.prompt_length = num_digits + 1  # digits and ">"
        self.completion_length = num_digits + 1  # sorted digits and EOS
        self.reward_functions = [sorted_exact, sorted_partial, format_reward(rf"\d{{{num_digits}}}")]
        self.reward_weights = [1.0, 1.0, 0.2]

    def records(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, str]]:
        digits = torch.randint(0, 10, (n, self.num_digits), generator=generator)
        out = []
        for row in digits.tolist():
            text = "".join(map(str, row))
            out.append({"prompt": f"{text}>", "answer": "".join(map(str, sorted(row)))})
        return out

    def preference_records(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, str]]:
        """``[{"prompt", "chosen", "rejected", "answer"}]``: chosen is the sorted answer, rejected the same with one
        position changed to another digit (reward ``sorted_exact`` 0 against 1, ``sorted_partial`` (n-1)/n against 1).
        """
        records = self.records(n, generator)
        where = torch.randint(0, self.num_digits, (n,), generator=generator).tolist()
        shift = torch.randint(1, 10, (n,), generator=generator).tolist()
        out = []
        for r, k, d in zip(records, where, shift):
            wrong = list(r["answer"])
            wrong[k] = str((int(wrong[k]) + d) % 10)
            out.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": "".join(wrong), "answer": r["answer"]})
        return out

    def sft_batch(self, tokenizer: Any, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequences [n, P + C], completion [n, P + C] bool)``: solved examples for supervised warm-up."""
        records = self.records(n, generator)
        ids = [tokenizer(r["prompt"] + r["answer"])["input_ids"] + [tokenizer.eos_token_id] for r in records]
        sequences = torch.tensor(ids)
        completion = torch.zeros_like(sequences, dtype=torch.bool)
        completion[:, self.prompt_length:] = True
        return sequences, completion
