"""Evaluate a model (``ddlm-eval``): held-out perplexity (bound) with a 95% interval, or sample quality.

    ddlm-eval ppl --model runs/shakespeare/final --method quadrature --num-points 8
    ddlm-eval ppl --model runs/ar/final                                  # an AR baseline: exact perplexity
    ddlm-eval genppl --model runs/shakespeare/final --reference runs/ar/final --sampling-steps 32 128 --num-samples 16

``ppl`` scores packed blocks of the data set's held-out split: diffusion models by their negative ELBO
(an upper bound on the NLL), causal LMs exactly.  ``genppl`` samples with any sampler and scores the
samples with a reference causal LM (generative perplexity), beside their unigram entropy and the
network calls.  ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from diffusion.time_nodes import TIME_RULES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddlm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="held-out perplexity (bound) with a 95%% interval")
    ppl.add_argument("--model", required=True, help="a model folder or Hub id (diffusion or causal LM)")
    ppl.add_argument("--dataset", default="builtin:shakespeare", help="data set (as ddlm-train --dataset)")
    ppl.add_argument("--seq-len", type=int, default=None,
                     help="block length (default: the run's seq_len when the model sits in a ddlm-train run folder, "
                          "else the model's context)")
    ppl.add_argument("--max-blocks", type=int, default=256, help="held-out blocks to score")
    ppl.add_argument("--method", default="quadrature", choices=TIME_RULES,
                     help="time-node rule of the bound (diffusion models; default: quadrature)")
    ppl.add_argument("--num-points", type=int, default=8, help="time points per sequence (diffusion models)")
    ppl.add_argument("--any-order", type=int, default=0,
                     help="also the any-order autoregressive NLL with this many orders (time-free masked models)")
    ppl.add_argument("--batch-size", type=int, default=16)
    gen = sub.add_parser("genppl", help="generative perplexity and unigram entropy of samples")
    gen.add_argument("--model", required=True, help="the diffusion model to sample from")
    gen.add_argument("--reference", required=True, help="causal LM folder or Hub id that scores the samples")
    gen.add_argument("--sampler", default=None, help="sampler name (default: ancestral / analytic)")
    gen.add_argument("--sampling-steps", type=int, nargs="+", default=[32, 128], help="sampling step counts")
    gen.add_argument("--num-samples", type=int, default=16)
    gen.add_argument("--length", type=int, default=None,
                     help="tokens per sample (default: as --seq-len of ppl)")
    for q in (ppl, gen):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def _load_any(name: str, trust_remote_code: bool) -> tuple[Any, Any, bool]:
    """(model, tokenizer, is_causal) for a diffusion model or a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from diffusion import load_denoiser

    hf_logging.disable_progress_bar()

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(f"could not load {name!r} (no such folder, or the Hub is unreachable)") from err
    if any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])):
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code).eval()
        return model, AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code), True
    model, tokenizer = load_denoiser(name, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer, False


def _default_length(name: str, model: Any) -> int:
    """The training block length of a ``ddlm-train`` run's ``final/`` folder, else the model's context."""
    run_config = Path(name).parent / "train_config.json"
    if Path(name).is_dir() and run_config.is_file():
        return int(json.loads(run_config.read_text())["seq_len"])
    return int(model.config.max_position_embeddings)


def _ppl(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from diffusion.data import build_blocks, load_texts
    from diffusion.evaluation.likelihood import (
        any_order_nll,
        evaluate_causal_likelihood,
        evaluate_likelihood,
        summarize,
    )

    model, tokenizer, causal = _load_any(args.model, args.trust_remote_code)
    seq_len = args.seq_len or _default_length(args.model, model)
    texts = load_texts(args.dataset)["validation"]
    blocks = build_blocks(texts, tokenizer, seq_len)[: args.max_blocks]
    start = time.perf_counter()
    if causal:
        result = evaluate_causal_likelihood(model, blocks, batch_size=args.batch_size).to_dict()
    else:
        result = evaluate_likelihood(model, blocks, method=args.method, num_points=args.num_points,
                                     batch_size=args.batch_size, seed=args.seed, progress=args.progress).to_dict()
        if args.any_order:
            values, calls = [], 0
            generator = torch.Generator().manual_seed(args.seed)
            for i in range(0, len(blocks), args.batch_size):
                v, c = any_order_nll(model, blocks[i : i + args.batch_size], num_orders=args.any_order,
                                     generator=generator)
                values.append(v)
                calls += c
            result["any_order"] = summarize(torch.cat(values), seq_len, calls=calls, method="any_order",
                                            num_points=args.any_order, form="any-order AR").to_dict()
    result.update(model=args.model, dataset=args.dataset, seq_len=seq_len, seconds=round(time.perf_counter() - start, 2))
    return result


def _genppl(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from diffusion import DiffusionSpec
    from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy

    from .. import get_sampler

    model, tokenizer, causal = _load_any(args.model, args.trust_remote_code)
    if causal:
        raise ValueError(f"--model {args.model!r} is a causal LM; genppl samples from diffusion models")
    reference, reference_tokenizer, ref_causal = _load_any(args.reference, args.trust_remote_code)
    if not ref_causal:
        raise ValueError(f"--reference {args.reference!r} is not a causal LM")
    name = args.sampler or DiffusionSpec.from_config(model.config).default_sampler
    length = args.length or _default_length(args.model, model)
    rows = []
    for steps in args.sampling_steps:
        start = time.perf_counter()
        out = get_sampler(name).generate(model, batch_size=args.num_samples, length=length, num_steps=steps,
                                         generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
        quality = generative_perplexity(out.tokens, reference, sample_tokenizer=tokenizer,
                                        reference_tokenizer=reference_tokenizer)
        rows.append({"steps": steps, "nfe": out.nfe, "seconds": round(seconds, 2), **quality,
                     "unigram_entropy": unigram_entropy(out.tokens)})
    return {"model": args.model, "reference": args.reference, "sampler": name, "length": length,
            "num_samples": args.num_samples, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("max_blocks", "num_points", "batch_size", "num_samples", "length", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"ddlm-eval: error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.command == "genppl" and any(s < 1 for s in args.sampling_steps):
        print(f"ddlm-eval: error: --sampling-steps must all be >= 1, got {args.sampling_steps}", file=sys.stderr)
        return 2
    try:
        result = _ppl(args) if args.command == "ppl" else _genppl(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ddlm-eval: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.command == "ppl":
        low, high = result["perplexity_ci95"]
        kind = "perplexity" if result["form"] == "autoregressive" else "perplexity bound"
        print(f"{args.model}: {result['nats_per_token']:.4f} nats/token, {kind} {result['perplexity']:.2f} "
              f"(95% CI {low:.2f}-{high:.2f}), {result['num_sequences']} blocks of {result['seq_len']}, "
              f"{result['network_calls']} network calls, {result['method']} x {result['num_points']}")
        if "any_order" in result:
            print(f"  any-order AR: {result['any_order']['nats_per_token']:.4f} nats/token")
    else:
        for row in result["rows"]:
            print(f"{result['sampler']} {row['steps']} steps: gen-ppl {row['gen_ppl']:.1f}, unigram entropy "
                  f"{row['unigram_entropy']:.3f}, {row['nfe']} network calls, {row['seconds']} s")
    return 0



if __name__ == "__main__":
    sys.exit(main())
