"""Structured transitions (D3PM, Austin et al. 2021, section 3.1): processes whose rate matrix prefers some
tokens over others, for the discrete-time chain of :mod:`diffusion.d3pm` and the continuous-time losses.

:class:`SymmetricRateProcess` takes any symmetric rate matrix ``A`` (``A_ij >= 0`` off the diagonal, rows
summing to 0) over K states.  Then ``exp(s A) = U diag(e^{s lambda}) U^T`` from one eigendecomposition ``A = U
diag(lambda) U^T`` (float64), so every row is computed in closed form: ``q(x_t | x_0) = e_{x_0} exp(sigma_bar A)``
costs ``O(K^2)`` per token and no matrix power is ever formed.  A symmetric kernel is doubly stochastic, so the
chain tends to the uniform distribution when the graph of ``A`` is connected (checked: the second eigenvalue must
be negative).

Two families build ``A``:

- :func:`nearest_neighbour_rate`: ``A_ij = 1`` when j is among the ``neighbours`` nearest tokens of i in an
  embedding space (cosine similarity) or i among j's, the D3PM "NN" transition (the paper's ``Q_t = exp(alpha_t
  A)``; here the schedule's ``sigma_bar`` plays ``sum alpha``);
- :func:`gaussian_band_rate`: ``A_ij = exp(-4 (i - j)^2 / ((K - 1)^2 b))`` for ``0 < |i - j| <= band``, for
  ordinal tokens (pixel values, digits): a token drifts to nearby values.  The paper's discretized Gaussian sets
  the off-diagonal entries of each step's ``Q_t`` this way with ``b = beta_t``; the rate form with one bandwidth
  ``b`` keeps the kernels of all steps commuting, so ``Q_bar_t`` stays one exponential.

The score-entropy pieces follow Lou et al. (2024) for a general rate matrix (``score_entropy``: the sum over
``y != x_t`` of ``Q(x_t, y) [s_y - r_y log s_y + K(r_y)]`` with ``r_y = q_t(y | x_0) / q_t(x_t | x_0)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .modeling_ddit import NOISE_FLOOR, neighbour_rate, symmetric_kernel_rows
from .processes import Process, _broadcast_noise, general_score_entropy

__all__ = ["NOISE_FLOOR", "SymmetricRateProcess", "gaussian_band_rate", "nearest_neighbour_rate", "nearest_neighbours",
           "neighbour_rate"]


def nearest_neighbours(embeddings: Tensor, neighbours: int) -> Tensor:
    """The ``neighbours`` nearest tokens of every token by cosine similarity of ``embeddings [K, d]``: ``[K, k]``."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be [tokens >= 2, dim], got shape {tuple(embeddings.shape)}")
    count = embeddings.shape[0]
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours < count:
        raise ValueError(f"neighbours must be an int in 1..{count - 1}, got neighbours={neighbours!r}")
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(neighbours, dim=-1).indices


def nearest_neighbour_rate(embeddings: Tensor, neighbours: int) -> Tensor:
    """The symmetric kNN rate matrix ``[K, K]`` (float64) of token ``embeddings [K, d]`` by cosine similarity."""
    return neighbour_rate(nearest_neighbours(embeddings, neighbours))


def gaussian_band_rate(num_states: int, bandwidth: float = 0.1, band: int | None = None) -> Tensor:
    """The discretized-Gaussian rate matrix ``[K, K]`` (float64) over ordinal states ``0..K-1``."""
    if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
        raise ValueError(f"num_states must be an int >= 2, got num_states={num_states!r}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got bandwidth={bandwidth!r}")
    index = torch.arange(num_states, dtype=torch.float64)
    distance = index[:, None] - index[None, :]
    rate = torch.exp(-4.0 * distance**2 / ((num_states - 1) ** 2 * bandwidth))
    off = distance != 0
    if band is not None:
        if isinstance(band, bool) or not isinstance(band, int) or band < 1:
            raise ValueError(f"band must be an int >= 1 or None, got band={band!r}")
        off &= distance.abs() <= band
    rate = torch.where(off, rate, torch.zeros_like(rate))
    return rate - torch.diag(rate.sum(-1))


class SymmetricRateProcess(Process):
    """A process over K states with a symmetric rate matrix ``rate [K, K]`` (see the module docstring).

    ``max_states`` bounds K (the eigendecomposition and every row cost ``O(K^2)`` memory and time); a larger
    vocabulary is refused rather than left to run out of memory.
    """

    name = "structured"

    def __init__(self, rate: Tensor, *, max_states: int = 8192,
                 spectrum: tuple[Tensor, Tensor] | None = None) -> None:
        if rate.dim() != 2 or rate.shape[0] != rate.shape[1]:
            raise ValueError(f"the rate matrix must be square [K, K], got shape {tuple(rate.shape)}")
        count = rate.shape[0]
        if count > max_states:
            raise ValueError(f"a structured process over {count} states needs {count}x{count} matrices; at most "
                             f"max_states={max_states} are allowed")
        super().__init__(count)
        rate = rate.double()
        off = ~torch.eye(count, dtype=torch.bool)
        if not torch.allclose(rate, rate.T, atol=1e-12) or bool((rate[off] < 0).any()):
            raise ValueError("the rate matrix must be symmetric with non-negative off-diagonal entries")
        if not torch.allclose(rate.sum(-1), torch.zeros(count, dtype=torch.float64), atol=1e-9):
            raise ValueError("the rate matrix's rows must sum to 0")
        eigenvalues, vectors = torch.linalg.eigh(rate) if spectrum is None else spectrum
        if count > 1 and float(eigenvalues[-2]) > -1e-10:
            raise ValueError("the rate matrix's graph is not connected: the chain would never reach the uniform "
                             "distribution (add neighbours or widen the band)")
        self.num_states, self.mask_id = count, None
        self.rate, self.eigenvalues, self.vectors = rate, eigenvalues, vectors

    def _rows(self, coefficients: Tensor, sigma_bar: Tensor) -> Tensor:
        """``coefficients [..., K]`` (rows of ``U`` or ``p U``) times ``diag(e^{sigma lambda}) U^T``, with rounding
        noise below ``NOISE_FLOOR`` set to 0 (:func:`~diffusion.modeling_ddit.symmetric_kernel_rows`)."""
        return symmetric_kernel_rows(coefficients, sigma_bar, self.eigenvalues, self.vectors)

    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        sigma_bar = _broadcast_noise(sigma_bar, x0)
        rows = self._rows(self.vectors.to(x0.device)[x0], sigma_bar)
        return torch.where(sigma_bar.unsqueeze(-1) == 0, F.one_hot(x0, self.num_states).double(), rows)

    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """Exact at ``sigma_bar = 0`` (the identity); elsewhere accurate to ~1e-15 absolute (the eigenvectors'
        rounding), so ratios of probabilities far below that are not to be trusted."""
        self._check_states("probs", probs)
        sigma_bar = _broadcast_noise(sigma_bar, probs[..., 0])
        rows = self._rows(probs.double() @ self.vectors.to(probs.device), sigma_bar)
        return torch.where(sigma_bar.unsqueeze(-1) == 0, probs.double(), rows)

    def reverse_transition(self, x_t: Tensor, dsigma: Tensor | float) -> Tensor:
        return self.transition_probs(x_t, dsigma)  # exp(s A) is symmetric: row x_t = column x_t

    def log_score_from_log_probs(self, log_probs: Tensor, sigma_bar: Tensor | float, x_t: Tensor) -> Tensor:
        """The log-score of an x0-parameterised model from its ``log p(x0 | x_t) [..., K]``: the mixture ``s_y =
        sum_x0 p(x0 | x_t) q_t(y | x0) / q_t(x_t | x0)`` (the other positions' factors cancel), i.e. the push of
        ``p / q_t(x_t | .)`` through ``exp(sigma_bar A)``; ``q_t(x_t | .)`` is row x_t (the kernel is symmetric).
        float64; ``log s_{x_t} = 0``."""
        self._check_states("log_probs", log_probs)
        sigma_bar = _broadcast_noise(sigma_bar, x_t)
        reach = self.transition_probs(x_t, sigma_bar)  # q_t(x_t | x0 = .); 0 where x0 cannot reach x_t
        weights = torch.where(reach > 0, log_probs.double().exp() / reach.clamp_min(NOISE_FLOOR),
                              torch.zeros_like(reach))
        score = self.push_probs(weights, sigma_bar)
        log_score = torch.log(score.clamp_min(torch.finfo(torch.float64).tiny))
        return log_score.scatter(-1, x_t.unsqueeze(-1), 0.0)

    def sample_xt(self, x0: Tensor, sigma_bar: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        probs = self.transition_probs(x0, sigma_bar)
        flat = torch.multinomial(probs.reshape(-1, self.num_states).float(), 1, generator=generator)
        return flat.reshape(x0.shape)

    def sample_limit(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        return torch.randint(0, self.num_states, shape, generator=generator, device=device)

    def rate_into(self, x_t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.rate.to(x_t.device)[x_t].to(dtype)  # A[y, x_t] = A[x_t, y]

    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        self._check_states("score", score)
        # exp(-dsigma A) s, not clamped: a staggered score may have any sign
        dsigma = _broadcast_noise(dsigma, score[..., 0])
        decay = torch.exp(-dsigma.double().unsqueeze(-1) * self.eigenvalues.to(score.device))
        vectors = self.vectors.to(score.device)
        return (((score.double() @ vectors) * decay) @ vectors.T).to(score.dtype)

    def score_entropy(self, log_score: Tensor, sigma_bar: Tensor | float, x_t: Tensor, x0: Tensor) -> Tensor:
        self._check_states("log_score", log_score)
        log_score = log_score.float() if log_score.dtype in (torch.float16, torch.bfloat16) else log_score
        probs = self.transition_probs(x0, sigma_bar).to(log_score.dtype)  # q_t(. | x0)
        return general_score_entropy(log_score, probs, x_t, self.rate_into(x_t, log_score.dtype))
