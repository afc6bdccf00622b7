"""Float64 references written from the definitions (rate matrices, matrix exponentials, brute-force sums).

Convention: ``Q[to, from]``, columns sum to zero, so column x0 of ``expm(sigma_bar Q)`` is q(x_t | x0).
"""

import itertools
import math

import numpy as np
import scipy.linalg
import torch


def absorbing_rate_matrix(n: int) -> torch.Tensor:
    """(n+1) x (n+1): every real token flows into MASK (index n) at rate 1."""
    q = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for y in range(n):
        q[y, y] = -1.0
        q[n, y] = 1.0
    return q


def uniform_rate_matrix(n: int) -> torch.Tensor:
    return torch.full((n, n), 1.0 / n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64)


def kernel(q: torch.Tensor, sigma_bar: float) -> torch.Tensor:
    """expm(sigma_bar Q) by scipy (torch.linalg.matrix_exp loses ~1e-11 here in float64)."""
    return torch.from_numpy(scipy.linalg.expm(sigma_bar * q.numpy()))


def brute_force_score_entropy(q: torch.Tensor, log_score: torch.Tensor, sigma_bar: float, x_t: int, x0: int) -> float:
    """sum_{y != x_t} Q(x_t, y) [s_y - r_y log s_y + K(r_y)], r_y = P[y, x0] / P[x_t, x0], K(a) = a(log a - 1)."""
    p = kernel(q, sigma_bar)
    total = 0.0
    for y in range(q.shape[0]):
        if y == x_t or q[x_t, y] == 0:
            continue
        r = (p[y, x0] / p[x_t, x0]).item()
        s_hat = log_score[y].item()
        k = r * (math.log(r) - 1.0) if r > 0 else 0.0
        total += q[x_t, y].item() * (math.exp(s_hat) - r * s_hat + k)
    return total


def enumerate_joint(vocab: int, length: int, seed: int = 0) -> dict[tuple[int, ...], float]:
    """A random strictly positive joint distribution over all sequences of a tiny vocabulary."""
    rng = np.random.default_rng(seed)
    seqs = list(itertools.product(range(vocab), repeat=length))
    weights = rng.gamma(0.7, size=len(seqs)) + 1e-3
    weights /= weights.sum()
    return dict(zip(seqs, weights.tolist()))


def conditional(joint: dict[tuple[int, ...], float], seq: tuple[int, ...], masked: tuple[int, ...], i: int) -> list[float]:
    """p(x_i = . | x_j = seq_j for j not in masked), exactly, by summing the joint."""
    vocab = 1 + max(max(s) for s in joint)
    probs = [0.0] * vocab
    for other, p in joint.items():
        if all(other[j] == seq[j] for j in range(len(seq)) if j not in masked):
            probs[other[i]] += p
    total = sum(probs)
    return [p / total for p in probs]


class ExactDenoiser(torch.nn.Module):
    """A time-free subs denoiser with exact conditionals of an enumerated joint over sequences of ``length``.

    Inputs are ``[B, prefix + length]``: the first ``prefix`` positions (a prompt) are ignored and predicted as
    themselves.  Masked positions get ``log p(x_i | visible x)``, visible ones carry their token; the mask id is
    ``vocab`` (so logits have ``vocab + 1`` columns), and MASK has probability 0.
    """

    def __init__(self, joint: dict[tuple[int, ...], float], prefix: int = 0) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.joint, self.prefix = joint, prefix
        self.vocab = 1 + max(max(s) for s in joint)
        self.length = len(next(iter(joint)))
        self.config = SimpleNamespace(mask_token_id=self.vocab, vocab_size=self.vocab + 1, process="absorbing",
                                      parameterization="subs", time_conditioning=False,
                                      max_position_embeddings=prefix + self.length, num_tokens=self.vocab,
                                      schedule="loglinear", schedule_kwargs={"eps": 1e-3})
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.calls = 0

    def _row(self, seq: tuple[int, ...]) -> torch.Tensor:
        if seq not in self.cache:
            mask = self.vocab
            masked = tuple(i for i, s in enumerate(seq) if s == mask)
            out = torch.full((self.length, self.vocab + 1), -1e6, dtype=torch.float64)
            for i in range(self.length):
                if i in masked:
                    out[i, : self.vocab] = torch.tensor(conditional(self.joint, seq, masked, i), dtype=torch.float64).log()
                else:
                    out[i, seq[i]] = 0.0
            self.cache[seq] = out
        return self.cache[seq]

    def forward(self, input_ids: torch.Tensor, total_noise: torch.Tensor | None = None, **kwargs: object) -> object:
        from transformers.modeling_outputs import MaskedLMOutput

        self.calls += 1
        prompt = torch.full((self.prefix, self.vocab + 1), -1e6, dtype=torch.float64)
        rows = []
        for r in input_ids.tolist():
            head = prompt.clone()
            for j in range(self.prefix):
                head[j, min(r[j], self.vocab)] = 0.0
            rows.append(torch.cat([head, self._row(tuple(r[self.prefix:]))]))
        return MaskedLMOutput(logits=torch.stack(rows))
