"""Forward processes of discrete diffusion: absorbing (masked) and uniform.

Each process is a continuous-time Markov chain on ``num_states`` token states with a
fixed rate matrix ``Q`` written, as in SEDD, with columns indexed by the *source* state:
``Q[to, from]``, columns summing to zero, ``dp_t/dt = sigma(t) Q p_t``.  After total
noise ``sigma_bar`` the transition kernel is ``exp(sigma_bar Q)``, whose column ``x0`` is
``q(x_t = . | x0)``.

Shapes: token tensors are ``LongTensor[...]`` (usually ``[B, L]``); ``sigma_bar`` is a
scalar, ``[B]`` (one noise level per sequence) or already broadcastable to the tokens;
state-valued outputs add a trailing ``num_states`` dimension.

Score conventions (SEDD): the model's *log-score* ``s_hat[..., y]`` at position ``i``
estimates ``log p_t(x_t with x_t^i -> y) / p_t(x_t)``; the *score* is its exponential.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MODEL_PROCESSES", "PROCESSES", "AbsorbingProcess", "Process", "UniformProcess", "draw_moves",
           "general_score_entropy", "get_process", "mask_tokens"]


def _broadcast_noise(sigma_bar: Tensor | float, tokens: Tensor) -> Tensor:
    """Give ``sigma_bar`` trailing singleton dims so that it broadcasts against ``tokens``.

    A ``[B]`` noise level becomes ``[B, 1]`` for ``[B, L]`` tokens.  The dtype is at least float32;
    a Python number becomes float64 so that it loses nothing before meeting the caller's dtype.
    """
    if not isinstance(sigma_bar, Tensor):
        sigma_bar = torch.tensor(float(sigma_bar), device=tokens.device, dtype=torch.float64)
    if not sigma_bar.is_floating_point() or sigma_bar.dtype in (torch.float16, torch.bfloat16):
        sigma_bar = sigma_bar.float()
    if sigma_bar.dim() > tokens.dim():
        raise ValueError(
            f"sigma_bar has more dims ({tuple(sigma_bar.shape)}) than the tokens ({tuple(tokens.shape)})"
        )
    return sigma_bar.reshape(sigma_bar.shape + (1,) * (tokens.dim() - sigma_bar.dim()))


def draw_moves(shape: torch.Size | tuple[int, ...], probability: Tensor, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """``BoolTensor[shape]``: each position moves independently with ``probability`` (broadcast to ``shape``).

    One uniform per position in ``probability``'s dtype, ``u < probability``, drawn where ``generator`` lives
    (else on ``device``, default ``probability``'s), so that a CPU generator drives a run on any device.  Every
    corruption of the toolkit draws its Bernoulli choices here.
    """
    if generator is not None:
        device = generator.device
    elif device is None:
        device = probability.device
    u = torch.rand(shape, generator=generator, device=device, dtype=probability.dtype)
    return u.to(probability.device) < probability


def mask_tokens(x0: Tensor, probability: Tensor | float, mask_id: int, *, generator: torch.Generator | None = None,
                where: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Absorbing corruption: replace each token by ``mask_id`` with ``probability``; ``(x_t, masked)``.

    Args:
        x0: ``LongTensor[...]`` clean tokens.
        probability: the masking probability ``1 - alpha``: a number, ``[B]`` (one per row) or broadcastable to
            ``x0``; its dtype (at least float32) is the dtype of the uniforms drawn, one per position.
        mask_id: the MASK id (anywhere in the vocabulary: outside models put it where they like).
        where: optional ``BoolTensor`` like ``x0``: only these positions may be masked (a completion, say).
    Returns:
        ``x_t`` like ``x0`` and ``masked``, the ``BoolTensor`` of positions replaced.
    """
    probability = _broadcast_noise(probability, x0)
    masked = draw_moves(x0.shape, probability.to(x0.device), generator, device=x0.device)
    if where is not None:
        masked = masked & where
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def _phi(u: Tensor) -> Tensor:
    """phi(u) = e^u - 1 - u >= 0, accurate near u = 0 (where the score entropy terms vanish)."""
    return torch.expm1(u) - u


def general_score_entropy(log_score: Tensor, probs: Tensor, x_t: Tensor, rates: Tensor) -> Tensor:
    """Denoising score entropy for any rate matrix (Lou et al. 2024), per position ``[...]``.

    ``SE = sum_{y != x_t} Q(x_t, y) [s_y - r_y log s_y + K(r_y)]`` with ``r_y = q_t(y | x0) / q_t(x_t | x0)``;
    ``s - r log s + K(r) = r phi(log s - log r)`` for ``r > 0`` and ``s`` for ``r = 0`` (``K(0) = 0``).

    Args:
        log_score: ``[..., K]`` model log-scores; probs: ``[..., K]`` the rows ``q_t(. | x0)``; x_t: ``[...]``;
        rates: ``[..., K]`` the rates ``Q(x_t, y)`` into x_t.  All in one floating dtype, which the sum keeps.
    """
    tiny = torch.finfo(log_score.dtype).tiny
    ratio = probs / probs.gather(-1, x_t.unsqueeze(-1)).clamp_min(tiny)
    log_ratio = torch.log(ratio.clamp_min(tiny))
    terms = torch.where(ratio > 0, ratio * _phi(log_score - log_ratio), log_score.exp())
    others = ~F.one_hot(x_t, log_score.shape[-1]).bool()
    return (rates * torch.where(others, terms, torch.zeros_like(terms))).sum(-1)


class Process(ABC):
    """A forward noising process over ``num_states`` token states."""

    name: str
    num_tokens: int  # N, the real tokens
    num_states: int  # N + 1 (absorbing: MASK is state N) or N (uniform)
    mask_id: int | None

    def __init__(self, num_tokens: int) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 2:
            raise ValueError(f"num_tokens must be an int >= 2, got num_tokens={num_tokens!r}")
        self.num_tokens = num_tokens

    @property
    def vocab_size(self) -> int:
        """Deprecated name of :attr:`num_tokens` (the real tokens N, not the states)."""
        warnings.warn("Process.vocab_size is deprecated; use num_tokens (N) or num_states", DeprecationWarning,
                      stacklevel=2)
        return self.num_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.num_tokens})"

    def _check_states(self, name: str, tensor: Tensor) -> None:
        if tensor.shape[-1] != self.num_states:
            raise ValueError(
                f"{name} must have a last dimension of num_states={self.num_states}, "
                f"got shape {tuple(tensor.shape)}"
            )

    # --- forward process -------------------------------------------------------------

    @abstractmethod
    def sample_xt(self, x0: Tensor, sigma_bar: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x0) independently at every position. Returns ``LongTensor`` like ``x0``."""

    @abstractmethod
    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """The row ``q(x_t = . | x0) = exp(sigma_bar Q)[:, x0]``. Returns ``Tensor[..., num_states]``."""

    @abstractmethod
    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """The distribution of x_t when x0 is drawn from ``probs [..., num_states]``: ``sum_j probs_j
        exp(sigma_bar Q)[:, j]`` (the row vector ``probs exp(sigma_bar Q)^T``; D3PM's ``x0 Q_bar_t``).
        ``sigma_bar`` broadcasts against ``probs[..., 0]``; ``transition_probs(x0)`` is the one-hot case."""

    @abstractmethod
    def sample_limit(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Draw from the limiting distribution p_1 (all MASK, or uniform tokens)."""

    # --- reverse-process pieces for the samplers ---------------------------------------

    @abstractmethod
    def rate_into(self, x_t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``Q(x_t, y)`` for every source state y: the forward rate from y into x_t. ``[..., num_states]``."""

    @abstractmethod
    def reverse_transition(self, x_t: Tensor, dsigma: Tensor | float) -> Tensor:
        """``exp(dsigma Q)[x_t, y] = q(x_t | x_s = y)`` for every y, with dsigma = sigma_bar(t) - sigma_bar(s)."""

    @abstractmethod
    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        """``exp(-dsigma Q) s`` applied along the state dimension (SEDD's Tweedie correction)."""

    def reverse_rate(self, x_t: Tensor, score: Tensor) -> Tensor:
        """Reverse-time rate out of x_t: ``R_y = Q(x_t, y) s_y`` for y != x_t, ``R_{x_t} = -sum_{y != x_t} R_y``.

        Args:
            x_t: ``LongTensor[...]`` current states.
            score: ``Tensor[..., num_states]`` the score s (ratios, not logs).
        """
        self._check_states("score", score)
        rate = self.rate_into(x_t, score.dtype) * score
        rate = rate.scatter(-1, x_t.unsqueeze(-1), 0.0)
        return rate.scatter(-1, x_t.unsqueeze(-1), -rate.sum(-1, keepdim=True))

    def euler_transition(self, x_t: Tensor, score: Tensor, step_rate: Tensor | float) -> Tensor:
        """Euler step of the reverse chain: ``onehot(x_t) + dt sigma(t) R(x_t, .)`` (unnormalised, may be < 0).

        Args:
            step_rate: ``dt * sigma(t)``, scalar or ``[B]``.
        """
        step_rate = _broadcast_noise(step_rate, x_t).unsqueeze(-1)
        onehot = F.one_hot(x_t, self.num_states).to(score.dtype)
        return onehot + step_rate * self.reverse_rate(x_t, score)

    def analytic_transition(self, x_t: Tensor, score: Tensor, dsigma: Tensor | float) -> Tensor:
        """Tweedie tau-leaping step: ``p(x_s = y | x_t) ~ [exp(-dsigma Q) s]_y exp(dsigma Q)(x_t, y)``.

        With the exact score of a one-token sequence this is the exact reverse posterior.
        """
        self._check_states("score", score)
        return self.staggered_score(score, dsigma) * self.reverse_transition(x_t, dsigma).to(score.dtype)

    # --- loss ----------------------------------------------------------------------------

    @abstractmethod
    def score_entropy(self, log_score: Tensor, sigma_bar: Tensor | float, x_t: Tensor, x0: Tensor) -> Tensor:
        """Denoising score entropy per position (SEDD).

        ``SE = sum_{y != x_t} Q(x_t, y) [s_y - r_y log s_y + K(r_y)]``, ``K(a) = a (log a - 1)``,
        ``r_y = q(y | x0) / q(x_t | x0)``.  Non-negative, zero iff ``s_y = r_y`` wherever ``Q(x_t, y) > 0``.

        Args:
            log_score: ``[..., num_states]`` model log-scores (float32 or wider is used internally).
            sigma_bar: total noise, scalar, ``[B]`` or broadcastable to ``x_t``.
            x_t, x0: ``LongTensor[...]`` noisy and clean tokens.

        Returns:
            ``Tensor[...]`` (same shape as ``x_t``).
        """


class AbsorbingProcess(Process):
    """Absorbing (masked) process: each real token jumps to MASK at rate sigma(t).

    ``num_tokens + 1`` states, MASK at ``mask_id`` (default ``num_tokens``, the last; a model converted from an
    autoregressive LM may have it elsewhere, and then the score-based methods, written for MASK last, refuse it).
    ``q(x_t = x0 | x0) = alpha = exp(-sigma_bar)``, ``q(x_t = MASK | x0) = 1 - alpha``.
    """

    name = "absorbing"

    def __init__(self, num_tokens: int, mask_id: int | None = None) -> None:
        super().__init__(num_tokens)
        self.num_states = num_tokens + 1
        self.mask_id = num_tokens if mask_id is None else mask_id
        if isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int) or not 0 <= self.mask_id <= num_tokens:
            raise ValueError(f"mask_id must be an id in [0, {num_tokens}], got mask_id={mask_id!r}")

    def _require_mask_last(self, method: str) -> None:
        if self.mask_id != self.num_tokens:
            raise ValueError(f"AbsorbingProcess.{method} needs MASK as the last state (id {self.num_tokens}), "
                             f"got mask_id={self.mask_id}")

    def __repr__(self) -> str:
        return f"AbsorbingProcess(num_tokens={self.num_tokens}, mask_id={self.mask_id})"

    def sample_xt(self, x0: Tensor, sigma_bar: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        return mask_tokens(x0, -torch.expm1(-_broadcast_noise(sigma_bar, x0)), self.mask_id, generator=generator)[0]

    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        sigma_bar = _broadcast_noise(sigma_bar, x0)
        alpha = torch.exp(-sigma_bar).unsqueeze(-1)
        probs = alpha * F.one_hot(x0, self.num_states).to(alpha.dtype)
        probs[..., self.mask_id] += (1.0 - alpha[..., 0]).expand(x0.shape)
        return probs

    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        # alpha p + (1 - alpha) (sum of p) e_MASK: every state keeps its mass w.p. alpha, the rest goes to MASK.
        self._check_states("probs", probs)
        alpha = torch.exp(-_broadcast_noise(sigma_bar, probs[..., 0])).unsqueeze(-1).to(probs.dtype)
        out = alpha * probs
        out[..., self.mask_id] += ((1.0 - alpha) * probs).sum(-1)
        return out

    def sample_limit(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def rate_into(self, x_t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        # Into MASK: rate 1 from every real token (0 from MASK itself). Into a real token x: only the
        # diagonal -1 (nothing flows into a real token).
        is_mask = (x_t == self.mask_id).unsqueeze(-1)
        into_mask = torch.ones(x_t.shape + (self.num_states,), device=x_t.device, dtype=dtype)
        into_mask[..., self.mask_id] = 0.0
        diagonal = -F.one_hot(x_t, self.num_states).to(dtype)
        return torch.where(is_mask, into_mask, diagonal)

    def reverse_transition(self, x_t: Tensor, dsigma: Tensor | float) -> Tensor:
        # Row x_t of exp(dsigma Q): MASK row = (1 - e^-dsigma, ..., 1 - e^-dsigma, 1); real x row = e^-dsigma e_x.
        dsigma = _broadcast_noise(dsigma, x_t).unsqueeze(-1)
        keep = torch.exp(-dsigma)
        row = keep * F.one_hot(x_t, self.num_states).to(keep.dtype)
        is_mask = (x_t == self.mask_id).unsqueeze(-1)
        mask_row = (1.0 - keep).expand(row.shape).clone()
        mask_row[..., self.mask_id] = 1.0
        return torch.where(is_mask, mask_row, row)

    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        # exp(-dsigma Q) s: real entries scale by e^dsigma; the MASK entry gains (1 - e^dsigma) sum_real s.
        self._require_mask_last("staggered_score")
        self._check_states("score", score)
        dsigma = _broadcast_noise(dsigma, score[..., 0]).unsqueeze(-1).to(score.dtype)
        grow = torch.exp(dsigma)
        out = score * grow
        real_sum = score[..., : self.mask_id].sum(-1, keepdim=True)
        mask_col = score[..., self.mask_id :] - torch.expm1(dsigma) * real_sum
        return torch.cat([out[..., : self.mask_id], mask_col], dim=-1)

    def score_entropy(self, log_score: Tensor, sigma_bar: Tensor | float, x_t: Tensor, x0: Tensor) -> Tensor:
        # At a masked position the only ratio with Q(MASK, y) > 0 and r_y > 0 is y = x0 with
        # r = alpha / (1 - alpha) = 1 / expm1(sigma_bar); all other real y have r_y = 0 (K(0) = 0).
        # SE = sum_{y real, y != x0} s_y + r phi(log s_x0 - log r); unmasked positions give 0.
        self._require_mask_last("score_entropy")
        self._check_states("log_score", log_score)
        log_score = log_score.float() if log_score.dtype in (torch.float16, torch.bfloat16) else log_score
        sigma_bar = _broadcast_noise(sigma_bar, x_t).to(log_score.dtype)
        log_r = -torch.log(torch.expm1(sigma_bar))
        real = log_score[..., : self.mask_id]
        x0_real = x0.unsqueeze(-1)
        log_s_x0 = real.gather(-1, x0_real).squeeze(-1)
        exp_real = real.exp()
        others = exp_real.sum(-1) - exp_real.gather(-1, x0_real).squeeze(-1)
        se = others + torch.exp(log_r) * _phi(log_s_x0 - log_r)
        return torch.where(x_t == self.mask_id, se, torch.zeros_like(se))

    def log_score_from_log_probs(self, log_probs: Tensor, sigma_bar: Tensor | float, x_t: Tensor) -> Tensor:
        """RADD identity: the absorbing log-score from a time-free denoiser's log-probabilities.

        ``log s_y = log p_theta(x0 = y | x_t) - log(exp(sigma_bar) - 1)`` at masked positions, and
        ``log s_{x_t} = 0`` (the ratio of a state to itself).

        Args:
            log_probs: ``[..., num_states]`` log p_theta over states (MASK column ~ -inf).
        """
        self._check_states("log_probs", log_probs)
        sigma_bar = _broadcast_noise(sigma_bar, x_t).to(log_probs.dtype).unsqueeze(-1)
        log_score = log_probs - torch.log(torch.expm1(sigma_bar))
        return log_score.scatter(-1, x_t.unsqueeze(-1), 0.0)


class UniformProcess(Process):
    """Uniform process: at rate sigma(t) a token is redrawn uniformly from all ``num_tokens`` states.

    ``Q = (1/N) 1 1^T - I`` (symmetric), so ``exp(s Q) = e^{-s} I + (1 - e^{-s}) (1/N) 1 1^T`` and
    ``q(x_t = y | x0) = (1 - alpha)/N + alpha [y = x0]``.
    """

    name = "uniform"

    def __init__(self, num_tokens: int) -> None:
        super().__init__(num_tokens)
        self.num_states = num_tokens
        self.mask_id = None

    def sample_xt(self, x0: Tensor, sigma_bar: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        moves = draw_moves(x0.shape, -torch.expm1(-_broadcast_noise(sigma_bar, x0)).to(x0.device), generator,
                           device=x0.device)
        redrawn = torch.randint(0, self.num_tokens, x0.shape, generator=generator, device=x0.device)
        return torch.where(moves, redrawn, x0)

    def _kernel_row(self, index: Tensor, total: Tensor) -> Tensor:
        # exp(total Q)[index, .] = exp(total Q)[., index] by symmetry.
        keep = torch.exp(-total).unsqueeze(-1)
        row = keep * F.one_hot(index, self.num_states).to(keep.dtype)
        return row + (1.0 - keep) / self.num_tokens

    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        return self._kernel_row(x0, _broadcast_noise(sigma_bar, x0))

    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        # alpha p + (1 - alpha) (sum of p) / N: the mass that moves is spread uniformly.
        self._check_states("probs", probs)
        alpha = torch.exp(-_broadcast_noise(sigma_bar, probs[..., 0])).unsqueeze(-1).to(probs.dtype)
        return alpha * probs + (1.0 - alpha) * probs.sum(-1, keepdim=True) / self.num_tokens

    def sample_limit(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        return torch.randint(0, self.num_tokens, shape, generator=generator, device=device)

    def rate_into(self, x_t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return 1.0 / self.num_tokens - F.one_hot(x_t, self.num_states).to(dtype)

    def reverse_transition(self, x_t: Tensor, dsigma: Tensor | float) -> Tensor:
        return self._kernel_row(x_t, _broadcast_noise(dsigma, x_t))

    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        # exp(-dsigma Q) s = e^dsigma s + (1 - e^dsigma)/N sum_z s_z
        self._check_states("score", score)
        dsigma = _broadcast_noise(dsigma, score[..., 0]).unsqueeze(-1).to(score.dtype)
        return torch.exp(dsigma) * score - torch.expm1(dsigma) * score.sum(-1, keepdim=True) / self.num_tokens

    def score_entropy(self, log_score: Tensor, sigma_bar: Tensor | float, x_t: Tensor, x0: Tensor) -> Tensor:
        # With esigm1 = e^sigma_bar - 1 and rho = esigm1 / (esigm1 + N):
        #   x_t == x0: r_y = rho for every y != x_t;
        #   x_t != x0: r_y = 1/rho at y = x0 and 1 elsewhere.
        # Every summand is (1/N) r phi(log s - log r); the sums over y are taken in closed form and the
        # x0 term of the second case (r = 1/rho, huge for small sigma_bar) in the cancellation-free phi form.
        self._check_states("log_score", log_score)
        log_score = log_score.float() if log_score.dtype in (torch.float16, torch.bfloat16) else log_score
        n = self.num_tokens
        sigma_bar = _broadcast_noise(sigma_bar, x_t).to(log_score.dtype)
        esigm1 = torch.expm1(sigma_bar)
        log_rho = -torch.log1p(n / esigm1)
        rho = torch.exp(log_rho)

        log_s_xt = log_score.gather(-1, x_t.unsqueeze(-1)).squeeze(-1)
        log_s_x0 = log_score.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        exp_s = log_score.exp()
        pos = exp_s.sum(-1) - exp_s.gather(-1, x_t.unsqueeze(-1)).squeeze(-1)  # sum_{y != x_t} s_y
        neg = log_score.sum(-1) - log_s_xt  # sum_{y != x_t} log s_y

        same = pos - rho * neg + (n - 1) * rho * (log_rho - 1.0)
        x0_term = _phi(log_s_x0 + log_rho) / rho
        differ = (pos - log_s_x0.exp()) - (n - 2) - (neg - log_s_x0) + x0_term
        return torch.where(x_t == x0, same, differ) / n

    def log_score_from_log_probs(self, log_probs: Tensor, sigma_bar: Tensor | float, x_t: Tensor) -> Tensor:
        """The log-score of an x0-parameterised uniform model (``parameterization="x0"``) from its log-probabilities.

        Per position the concrete score is a mixture over the model's ``p(x0 | x_t)`` (the other positions' factors
        cancel because the forward process acts on each position alone):
        ``s_y = sum_x0 p(x0 | x_t) q_t(y | x0) / q_t(x_t | x0)``.  With ``q_t(y | x0) = b + a [y = x0]``, ``a =
        e^{-sigma_bar}``, ``b = (1 - a) / N`` the three kinds of x0 (``x_t``, ``y``, any other) give

            s_y = 1 + N p_y / (e^sigma_bar - 1) - N p_{x_t} / (N + e^sigma_bar - 1)      (y != x_t),

        and ``log s_{x_t} = 0``.  Both corrections keep ``s_y >= 0``: ``N p_{x_t} / (N + e^sigma_bar - 1) <= 1``.
        Score entropy on these scores is the uniform process's continuous-time ELBO for an x0 model (UDLM, Schiff
        et al., ICLR 2025; Duo, Sahoo et al., ICML 2025), and the SEDD samplers read them as they read a score model's.

        Args:
            log_probs: ``[..., N]`` log p_theta(x0 | x_t) (float32 or float64; lower precisions are promoted).
        """
        self._check_states("log_probs", log_probs)
        if log_probs.dtype in (torch.float16, torch.bfloat16):
            log_probs = log_probs.float()
        n = self.num_tokens
        esigm1 = torch.expm1(_broadcast_noise(sigma_bar, x_t).to(log_probs.dtype)).unsqueeze(-1)
        # 1 - N p_xt / (N + E) = (N (1 - p_xt) + E) / (N + E), with 1 - p_xt = -expm1(log p_xt): at small sigma_bar
        # the true ratios are ~sigma_bar / N and p_xt ~ 1 - 1e-8, below float32's resolution of 1 - p_xt itself.
        rest = -torch.expm1(log_probs.gather(-1, x_t.unsqueeze(-1)))
        stay = (n * rest + esigm1) / (n + esigm1)
        log_score = torch.log((stay + n * log_probs.exp() / esigm1).clamp_min(torch.finfo(log_probs.dtype).tiny))
        return log_score.scatter(-1, x_t.unsqueeze(-1), 0.0)


PROCESSES: dict[str, type[Process]] = {cls.name: cls for cls in (AbsorbingProcess, UniformProcess)}
# What a model may name: the two above; "bridge", the Discrete Markov Bridge, whose process is built from the model's
# own learnt rates (diffusion/markov_bridge.py); "nearest_neighbour", D3PM's nearest-neighbour transitions, from the
# model's own neighbour lists (diffusion/structured.py); both through DiffusionSpec.of(model)
MODEL_PROCESSES = (*PROCESSES, "bridge", "nearest_neighbour")


def get_process(name: str, num_tokens: int) -> Process:
    """Build a process by name (``absorbing`` or ``uniform``) over ``num_tokens`` real tokens."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process name={name!r}; valid names: {sorted(PROCESSES)}")
    return PROCESSES[name](num_tokens)
