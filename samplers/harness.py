"""A diffusion LM as an lm-evaluation-harness model (``--model ddlm``; the optional extra ``ddlm[eval]``).

Importing this module registers :class:`DiffusionHarnessLM` under the name ``ddlm``; ``ddlm-lm-eval`` (lm-eval's
own command line with that done, :mod:`samplers.cli.harness`) and ``lm_eval.simple_evaluate`` after the import
both take it.  Any model :func:`diffusion.adapters.load_denoiser` loads works: ddlm's DDiT, converted causal LMs,
LLaDA/Dream-style and BERT-style masked LMs.

- ``loglikelihood(context, continuation)``: ``log p(y | c)`` estimated by the ELBO with the likelihood estimator
  ``estimator`` (:mod:`diffusion.estimators`; default ``quadrature``, the lowest-variance one at a fixed number of
  calls) at ``num_points`` network calls: ``sum_n w_n (1/t_n) sum_{k masked at t_n} log p_theta(y_k | c, y_t_n)``,
  a lower bound in expectation, exact in expectation for exact conditionals.  ``is_greedy``: the continuation,
  fully masked after the context, decoded with temperature 0 one token per call, most confident first
  (``remask``, ``low_confidence``), equals the continuation (``greedy=False`` skips it and reports False, as
  for score models, which that decoding does not suit).
- ``loglikelihood_rolling(text)``: minus the negative ELBO of the text cut into windows of the model's trained
  length, each window scored on its own, as ``ddlm-eval ppl`` scores held-out blocks
  (:func:`diffusion.evaluation.likelihood.sequence_nelbo`, rule ``quadrature``, ``num_points`` calls): a lower
  bound on the log-likelihood of the text when the windows are independent.
- ``generate_until(context, gen_kwargs)``: ``max_gen_toks`` tokens after the context with any registered sampler
  (default: the model's), ``steps`` steps (default one per token), temperature 0 unless ``do_sample``; the text
  is cut at the first stop string of ``until`` and at EOS.

Requests are grouped by shape and run ``batch_size`` rows at a time; each request draws its masks and samples
from its own stream (``seed`` and its tokens), so its result does not depend on the batching or the order.  A context too long for the model is cut from
the left (counted in :attr:`DiffusionHarnessLM.report`); a continuation or generation that alone does not fit
is refused with a ``ValueError`` naming the request.  :attr:`DiffusionHarnessLM.report` holds, per request type,
the requests and the network calls each took (every row of a batch takes part in each of its calls); a summary
line is printed to stderr.
"""

from __future__ import annotations

import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: registering ours must not hide them)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from diffusion.estimators import ELBO_ESTIMATORS, check_policy, concat_draws, get_estimator
from diffusion.evaluation.likelihood import sequence_nelbo
from diffusion.spec import DiffusionSpec

from .base import FREE, RowStreams, get_sampler

__all__ = ["DiffusionHarnessLM"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


@register_model("ddlm")
class DiffusionHarnessLM(LM):
    """lm-eval's three request types on a diffusion LM (see the module docstring for the maths).

    ``pretrained``: a model folder or Hub id (or pass ``model`` and ``tokenizer`` objects instead).
    """

    def __init__(self, pretrained: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 estimator: str = "quadrature", num_points: int = 8, greedy: bool = True, sampler: str | None = None,
                 steps: int | None = None, batch_size: int | str | None = 16, seed: int = 0, device: str | None = None,
                 trust_remote_code: bool = False, max_gen_toks: int = 32, **unused: Any) -> None:
        super().__init__()
        unknown = sorted(k for k, v in unused.items() if v is not None and k != "max_batch_size")
        if unknown:
            raise ValueError(f"the ddlm lm-eval model does not take {unknown}; it takes pretrained, estimator, "
                             "num_points, greedy, sampler, steps, batch_size, seed, device, trust_remote_code, "
                             "max_gen_toks")
        if estimator not in ELBO_ESTIMATORS:
            raise ValueError(f"estimator must be one of the ELBO estimators {sorted(ELBO_ESTIMATORS)}, got "
                             f"estimator={estimator!r}")
        self.num_points = _positive_int("num_points", num_points)
        if batch_size is None or str(batch_size).startswith("auto"):
            batch_size = 16  # lm-eval's "auto" searches for the largest batch that fits a GPU; 16 rows here
        elif isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if steps is not None:
            _positive_int("steps", steps)
        if sampler is not None:
            get_sampler(sampler)  # an unknown name fails before the model loads
        if (pretrained is None) == (model is None):
            raise ValueError("give exactly one of pretrained (a model folder or Hub id) and model")
        if model is None:
            from diffusion.cli.loading import load_denoiser_for

            model, tokenizer = load_denoiser_for(str(pretrained), trust_remote_code=bool(trust_remote_code))
        elif tokenizer is None:
            raise ValueError("a model object needs its tokenizer (tokenizer=...)")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            print(f"ddlm lm-eval: device={device!r} but this machine has no CUDA device: running on the CPU "
                  "(lm-eval's command line asks for cuda unless --device says otherwise)", file=sys.stderr)
            device = "cpu"
        self.model = model.to(device).eval() if device else model.eval()
        self.tokenizer, self.seed, self.greedy, self.sampler_name, self.steps = (
            tokenizer, int(seed), bool(greedy), sampler, steps)
        self.spec = DiffusionSpec.of(model)
        check_policy(self.spec, estimator)
        if self.greedy and not self.spec.masked:
            print("ddlm lm-eval: the greedy check decodes with a masked (subs) model and this one is a score model: "
                  "is_greedy is reported False (greedy=false silences this)", file=sys.stderr)
            self.greedy = False
        self.estimator = get_estimator(estimator, self.spec.mask_id, num_points=self.num_points)
        self.context = int(model.config.max_position_embeddings)
        self.window = int(getattr(model.config, "trained_length", None) or self.context)
        self.report: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "calls": 0, "cut_contexts": 0})

    # --- helpers ---------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit_context(self, kind: str, index: int, context: list[int], room: int, what: str) -> list[int]:
        """``context`` cut from the left to ``self.context - room`` tokens; ``room`` alone must fit."""
        if room > self.context:
            raise ValueError(f"{kind} request {index}: the {what} is {room} tokens, beyond the model's context of "
                             f"{self.context}")
        keep = self.context - room
        if len(context) > keep:
            self.report[kind]["cut_contexts"] += 1
            return context[len(context) - keep:]
        return context

    def _grouped(self, shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
        """Request indices in batches of at most ``batch_size`` that share a shape, in a fixed order."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            groups[shape].append(index)
        return [indices[i:i + self.batch_size] for _, indices in sorted(groups.items())
                for i in range(0, len(indices), self.batch_size)]

    def _summary(self, kind: str, before: dict[str, float], detail: str) -> None:
        """One stderr line for the requests of this call (``before``: the report's entry when it began)."""
        entry = {key: value - before[key] for key, value in self.report[kind].items()}
        per_request = entry["calls"] / max(entry["requests"], 1)
        cut = f"; {entry['cut_contexts']:.0f} contexts cut from the left" if entry["cut_contexts"] else ""
        print(f"ddlm lm-eval: {kind}: {entry['requests']:.0f} requests, {per_request:.1f} network calls each "
              f"({detail}){cut}", file=sys.stderr, flush=True)

    def _stream(self, tokens: Sequence[int]) -> torch.Generator:
        """A request's own random stream, from ``seed`` and its tokens: its score or text does not depend on which
        requests share its batch or come before it."""
        data = torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes()
        return torch.Generator().manual_seed(zlib.crc32(data, self.seed % 2**32))  # the CPU generator keeps 32 bits

    # --- lm-eval's interface -----------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        kind, rows = "loglikelihood", []
        before = dict(self.report[kind])
        for index, request in enumerate(requests):
            context, continuation = request.args
            target = self._encode(continuation)
            if not target:
                raise ValueError(f"{kind} request {index}: the continuation {continuation!r} has no tokens")
            rows.append((self._fit_context(kind, index, self._encode(context), len(target), "continuation"), target))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        greedy = get_sampler("remask", temperature=0.0) if self.greedy else None
        for batch in self._grouped([(len(c), len(t)) for c, t in rows]):
            sequences = torch.tensor([rows[i][0] + rows[i][1] for i in batch], dtype=torch.long)
            completion = torch.zeros_like(sequences, dtype=torch.bool)
            completion[:, len(rows[batch[0]][0]):] = True
            draw = concat_draws([self.estimator.draw(sequences[r:r + 1], completion[r:r + 1],
                                                     self._stream(sequences[r].tolist() + [len(rows[i][0])]))
                                 for r, i in enumerate(batch)])
            log_likelihood = self.estimator.estimate(self.model, draw).sum(-1).double().cpu()
            calls = self.estimator.calls
            matches = [False] * len(batch)
            if greedy is not None:
                canvas = torch.where(completion, torch.full_like(sequences, FREE), sequences)
                out = greedy.generate(self.model, canvas=canvas, num_steps=int(completion[0].sum()))
                matches = (out.tokens.cpu() == sequences).all(-1).tolist()
                calls += out.nfe
            for row, index in enumerate(batch):
                results[index] = (float(log_likelihood[row]), bool(matches[row]))
            self.report[kind]["requests"] += len(batch)
            self.report[kind]["calls"] += calls * len(batch)
        self._summary(kind, before, f"{self.estimator.name}, {self.num_points} points"
                            + (", greedy check one token per call" if greedy is not None else ""))
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        kind = "loglikelihood_rolling"
        before = dict(self.report[kind])
        documents = []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self._encode(text)
            if not tokens:
                raise ValueError(f"{kind} request {index}: the text {text!r} has no tokens")
            documents.append(tokens)
        totals = []
        for tokens in documents:  # each document on its own stream: its score does not depend on the others
            windows = [tokens[start:start + self.window] for start in range(0, len(tokens), self.window)]
            generator, total = self._stream(tokens), 0.0
            for size in sorted({len(w) for w in windows}, reverse=True):  # the full windows, then the shorter last
                same = [w for w in windows if len(w) == size]
                for first in range(0, len(same), self.batch_size):
                    x0 = torch.tensor(same[first:first + self.batch_size], dtype=torch.long)
                    nelbo, calls = sequence_nelbo(self.model, x0, method="quadrature", num_points=self.num_points,
                                                  generator=generator)
                    total -= float(nelbo.sum())
                    self.report[kind]["calls"] += calls
            totals.append(total)
        self.report[kind]["requests"] += len(requests)
        self._summary(kind, before, f"windows of {self.window} tokens, quadrature, {self.num_points} points each")
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any]) -> list[str]:
        kind, jobs = "generate_until", []
        before = dict(self.report[kind])
        for index, request in enumerate(requests):
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            length = _positive_int(f"{kind} request {index}: max_gen_toks",
                                   int(options.pop("max_gen_toks", self.max_gen_toks)))
            sample = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 1.0 if sample else 0.0))
            if not sample:
                temperature = 0.0
            prompt = self._fit_context(kind, index, self._encode(context), length, "generation (max_gen_toks)")
            if not prompt:
                raise ValueError(f"{kind} request {index}: the context {context!r} has no tokens")
            jobs.append((prompt, length, temperature, until))
        results = [""] * len(jobs)
        name = self.sampler_name or self.spec.default_sampler
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for batch in self._grouped([(len(p), n, t) for p, n, t, _ in jobs]):
            prompt, length, temperature, _ = jobs[batch[0]]
            sampler = self._sampler(name, temperature)
            streams = RowStreams([self._stream(jobs[i][0] + [length]) for i in batch], 1)
            out = sampler.generate(self.model, prompt_ids=torch.tensor([jobs[i][0] for i in batch]), length=length,
                                   num_steps=self.steps or length, generator=streams)
            for row, index in enumerate(batch):
                tokens = out.tokens[row, len(prompt):].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[:tokens.index(eos)]
                results[index] = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), jobs[index][3])
            self.report[kind]["requests"] += len(batch)
            self.report[kind]["calls"] += out.nfe * len(batch)
        self._summary(kind, before, f"{name}, " + (f"{self.steps} steps" if self.steps else "one step per token"))
        return results

    def _sampler(self, name: str, temperature: float) -> Any:
        try:
            return get_sampler(name, temperature=temperature)
        except TypeError as error:
            raise ValueError(f"sampler {name!r} takes no temperature; choose another with sampler=...") from error


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string in ``until``."""
    end = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                end = min(end, found)
    return text[:end]


def registered() -> Callable[..., Any]:
    """The class lm-eval's registry holds under ``ddlm`` (this module's, once it is imported)."""
    from lm_eval.api.registry import get_model

    return get_model("ddlm")
