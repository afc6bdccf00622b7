"""Evaluate a model (``ddlm-eval``): held-out perplexity (bound) with a 95% interval, or sample quality.

    ddlm-eval ppl --model runs/shakespeare/final --method quadrature --num-points 8
    ddlm-eval ppl --model runs/ar/final                                  # an AR baseline: exact perplexity
    ddlm-eval genppl --model runs/shakespeare/final --reference runs/ar/final --sampling-steps 32 128 --num-samples 16
    ddlm-eval calls --model runs/shakespeare/final --reference runs/ar/final --out quality_vs_calls

``ppl`` scores packed blocks: by default the documents the model's training run held out (its
``data_split.json``), else the ``--dataset`` named (whole, or its ``--split``); diffusion models by their negative
ELBO (an upper bound on the NLL), causal LMs exactly; in nats per token and bits per byte.  ``genppl`` samples with any sampler and scores the
samples with a reference causal LM (generative perplexity), beside their unigram entropy and the
network calls.  ``calls`` does that for every sampler of the model's family at several call budgets and draws
generative perplexity and unigram entropy against network calls (``--out`` STEM: STEM.json and STEM.png, the
picture needs matplotlib).  ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from diffusion.cli.errors import console_command
from diffusion.data.loading import TEXT_SPLITS
from diffusion.evaluation.held_out import SPLITS
from diffusion.time_nodes import TIME_RULES


def _parser() -> Any:
    from diffusion.cli.args import ArgumentParser

    p = ArgumentParser(prog="ddlm-eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="held-out perplexity (bound) with a 95%% interval", description=__doc__)
    ppl.add_argument("--model", required=True, help="a model folder or Hub id (diffusion or causal LM)")
    ppl.add_argument("--dataset", default=None,
                     help="data set to score, as ddlm-train --dataset (default: the documents the model's training "
                          "run held out, from its data_split.json)")
    ppl.add_argument("--split", default="all", choices=SPLITS,
                     help="with --dataset: which of its documents to score (default: %(default)s)")
    ppl.add_argument("--dataset-config", default=None,
                     help="with --dataset: its configuration, Hub data sets (default: none)")
    ppl.add_argument("--text-column", default="text", help="with --dataset: the column holding the text "
                                                         "(default: %(default)s)")
    ppl.add_argument("--text-split", default=None, choices=TEXT_SPLITS,
                     help="with --dataset of .txt/.md files: what a document is (default: the run's rule for its own "
                          "data, else paragraph)")
    ppl.add_argument("--encoding", default=None,
                     help="with --dataset of .txt/.md files: their encoding (default: the run's for its own data, "
                          "else utf-8)")
    ppl.add_argument("--valid-fraction", type=float, default=None,
                     help="with --dataset --split train/validation, a source without a validation split: the fraction "
                          "of documents held out (default: the run's when --dataset is the run's data, else 0.02)")
    ppl.add_argument("--split-seed", type=int, default=None,
                     help="with --dataset --split train/validation: the seed of that hold-out (default: the run's "
                          "when --dataset is the run's data, else 0)")
    ppl.add_argument("--seq-len", type=int, default=None,
                     help="block length (default: the length the model was trained on, else its context)")
    ppl.add_argument("--max-blocks", type=int, default=256, help="held-out blocks to score (default: %(default)s)")
    ppl.add_argument("--method", default="quadrature", choices=TIME_RULES,
                     help="time-node rule of the bound, diffusion models (default: %(default)s)")
    ppl.add_argument("--num-points", type=int, default=8,
                     help="time points per sequence, diffusion models (default: %(default)s)")
    ppl.add_argument("--discrete-time", type=int, default=None, metavar="T",
                     help="D3PM's T-step bound L_vb instead of the continuous one, absorbing subs models: every step "
                          "once per sequence, T network calls; --method and --num-points are then not used (default: %(default)s, the "
                          "continuous bound)")
    ppl.add_argument("--any-order", type=int, default=0,
                     help="also the any-order autoregressive NLL with this many orders, time-free masked models; "
                          "it costs seq_len network calls per order; 0 is off (default: %(default)s)")
    ppl.add_argument("--store-curve", action="store_true",
                     help="with --any-order: write the per-step loss curve to the model folder's ardm_curve.json, "
                          "which the ardm sampler plans its call budget with")
    ppl.add_argument("--batch-size", type=int, default=16, help="blocks per forward pass (default: %(default)s)")
    gen = sub.add_parser("genppl", help="generative perplexity and unigram entropy of samples", description=__doc__)
    gen.add_argument("--model", required=True, help="the diffusion model to sample from")
    gen.add_argument("--reference", required=True, help="causal LM folder or Hub id that scores the samples")
    gen.add_argument("--sampler", default=None, help="sampler name (default: the model's default sampler, ancestral "
                                                     "for masked models and analytic for score models)")
    gen.add_argument("--sampling-steps", type=int, nargs="+", default=[32, 128],
                     help="sampling step counts (default: %(default)s)")
    gen.add_argument("--num-samples", type=int, default=16, help="samples per step count (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=64,
                     help="samples per sampler call: memory grows with it, not with --num-samples (default: "
                          "%(default)s)")
    gen.add_argument("--length", type=int, default=None,
                     help="tokens per sample (default: the length the model was trained on, else its context)")
    calls = sub.add_parser("calls", help="quality against network calls for every sampler, as JSON and a PNG",
                           description=__doc__)
    calls.add_argument("--model", required=True, help="the diffusion model to sample from")
    calls.add_argument("--reference", required=True, help="causal LM folder or Hub id that scores the samples")
    calls.add_argument("--calls", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256],
                       help="call budgets, each a sampler's num_steps (default: %(default)s)")
    calls.add_argument("--samplers", nargs="+", default=None,
                       help="only these samplers of the default set, by name (default: all for the model's family)")
    calls.add_argument("--num-samples", type=int, default=32, help="samples per point (default: %(default)s)")
    calls.add_argument("--batch-size", type=int, default=64, help="samples per sampler call (default: %(default)s)")
    calls.add_argument("--length", type=int, default=None,
                       help="tokens per sample (default: the length the model was trained on, else its context)")
    calls.add_argument("--real-text", action="store_true",
                       help="also score --num-samples blocks of the run's held-out text alike, drawn as a dashed line")
    calls.add_argument("--out", default="quality_vs_calls",
                       help="writes OUT.json (the rows) and OUT.png (the picture) (default: %(default)s)")
    for q in (ppl, gen, calls):
        q.add_argument("--seed", type=int, default=0, help="seed of the noise and samples (default: %(default)s)")
        q.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars (default: bars when stderr is a terminal)")
    return p


def _default_length(name: str, model: Any) -> int:
    """The block length the model was trained on (its config's ``trained_length``, or the ``ddlm-train`` run it
    sits in), else the model's context."""
    trained = getattr(model.config, "trained_length", None)
    if trained:
        return int(trained)
    run_config = Path(name).expanduser().parent / "train_config.json"
    if Path(name).expanduser().is_dir() and run_config.is_file():
        return int(json.loads(run_config.read_text())["seq_len"])
    return int(model.config.max_position_embeddings)


def _store_curve(name: str, steps: Any, orders: int) -> None:
    """Write ARDM's per-step loss curve next to the model (atomically), for the ardm sampler."""
    from samplers.ardm import CURVE_FILE

    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--store-curve writes into a local model folder; --model {name!r} is not one")
    record = {"nats_per_step": steps.mean(0).tolist(), "blocks": int(steps.shape[0]), "orders": orders,
              "seq_len": int(steps.shape[1])}
    _write_json_atomically(folder / CURVE_FILE, record)


def _ppl(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tqdm.auto import tqdm

    from diffusion.cli.loading import load_model_for
    from diffusion.evaluation.held_out import bits_per_byte, evaluation_data, scored_bytes
    from diffusion.evaluation.likelihood import (
        any_order_steps,
        evaluate_causal_likelihood,
        evaluate_likelihood,
        summarize,
    )

    if args.dataset is None and args.split != "all":
        raise ValueError(f"--split {args.split} needs --dataset (without it the run's held-out split is scored)")
    model, tokenizer, causal = load_model_for(args.model, trust_remote_code=args.trust_remote_code)
    if causal and args.discrete_time is not None:  # before the data is read and scored
        raise ValueError(f"--discrete-time is a bound of diffusion models; --model {args.model!r} is a causal LM, "
                         "whose perplexity is exact")
    seq_len = args.seq_len or _default_length(args.model, model)
    data = evaluation_data(args.model, tokenizer, seq_len, args.max_blocks, dataset=args.dataset, split=args.split,
                           dataset_config=args.dataset_config, text_column=args.text_column,
                           valid_fraction=args.valid_fraction, split_seed=args.split_seed,
                           text_split=args.text_split, encoding=args.encoding)
    for warning in data.warnings:
        print(f"ddlm-eval: warning: {warning}", file=sys.stderr)
    blocks = data.blocks
    start = time.perf_counter()
    if causal:
        result = evaluate_causal_likelihood(model, blocks, batch_size=args.batch_size).to_dict()
    else:
        result = evaluate_likelihood(model, blocks, method=args.method, num_points=args.num_points,
                                     batch_size=args.batch_size, seed=args.seed,
                                     progress=None if args.progress else False,
                                     discrete_time=args.discrete_time).to_dict()
        if args.any_order:
            steps, calls = [], 0
            generator = torch.Generator().manual_seed(args.seed)
            batches = -(-len(blocks) // args.batch_size)
            bar = tqdm(total=batches * args.any_order * seq_len, desc=f"any-order ({args.any_order} orders)",
                       unit="call", disable=None if args.progress else True)
            for i in range(0, len(blocks), args.batch_size):
                v, c = any_order_steps(model, blocks[i : i + args.batch_size], num_orders=args.any_order,
                                       generator=generator, progress=bar)
                steps.append(v)
                calls += c
            bar.close()
            steps = torch.cat(steps)
            result["any_order"] = summarize(steps.sum(-1), seq_len, calls=calls, method="any_order",
                                            num_points=args.any_order, form="any-order AR").to_dict()
            result["any_order"]["nats_per_step"] = steps.mean(0).tolist()
            if args.store_curve:
                _store_curve(args.model, steps, args.any_order)
    tokens, num_bytes = scored_bytes(blocks, tokenizer, skip_first=causal)
    result.update(model=args.model, dataset=args.dataset, data=data.description, document_ids=data.document_ids,
                  num_documents=data.num_documents, documents_scored=data.documents_scored,
                  blocks_available=data.blocks_available, warnings=data.warnings, seq_len=seq_len,
                  bytes_scored=num_bytes, bits_per_byte=bits_per_byte(result["nats_per_token"], tokens, num_bytes),
                  seconds=round(time.perf_counter() - start, 2))
    return result


def _model_and_reference(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """``(model, tokenizer, reference, reference_tokenizer)``: a diffusion model and the causal LM scoring it."""
    from diffusion.cli.loading import load_model_for

    model, tokenizer, causal = load_model_for(args.model, trust_remote_code=args.trust_remote_code)
    if causal:
        raise ValueError(f"--model {args.model!r} is a causal LM ({type(model).__name__}): genppl samples diffusion "
                         "models; score it with ddlm-eval ppl, sample it with ddlm-generate")
    reference, reference_tokenizer, ref_causal = load_model_for(args.reference, flag="--reference",
                                                                trust_remote_code=args.trust_remote_code)
    if not ref_causal:
        raise ValueError(f"--reference {args.reference!r} is not a causal LM: it must score samples left to right")
    return model, tokenizer, reference, reference_tokenizer


def _genppl(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from diffusion import DiffusionSpec
    from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy

    from .. import FREE, SAMPLERS, get_sampler
    from .batches import generate_in_batches

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise ValueError(f"unknown --sampler {args.sampler!r}; valid: {sorted(SAMPLERS)}")
    model, tokenizer, reference, reference_tokenizer = _model_and_reference(args)
    name = args.sampler or DiffusionSpec.of(model).default_sampler
    length = args.length or _default_length(args.model, model)
    rows = []
    for steps in args.sampling_steps:
        start = time.perf_counter()
        outs = list(generate_in_batches(get_sampler(name), model, [FREE] * length, args.num_samples, args.batch_size,
                                        num_steps=steps, generator=torch.Generator().manual_seed(args.seed)))
        seconds = time.perf_counter() - start
        tokens = torch.cat([out.tokens for out in outs])
        quality = generative_perplexity(tokens, reference, sample_tokenizer=tokenizer,
                                        reference_tokenizer=reference_tokenizer)
        rows.append({"steps": steps, "nfe": sum(out.nfe for out in outs), "seconds": round(seconds, 2), **quality,
                     "unigram_entropy": unigram_entropy(tokens)})
    return {"model": args.model, "reference": args.reference, "sampler": name, "length": length,
            "num_samples": args.num_samples, "rows": rows}


def _calls(args: argparse.Namespace) -> dict[str, Any]:
    from diffusion import DiffusionSpec
    from diffusion.evaluation.plots import plot_quality_vs_calls, require_matplotlib

    from ..ardm import read_curve
    from ..sweep import default_entries, sweep

    require_matplotlib()  # no matplotlib: say so before any sampling
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {args.out!r}: the folder {str(out.parent)!r} does not exist")
    model, tokenizer, reference, reference_tokenizer = _model_and_reference(args)
    spec = DiffusionSpec.of(model)
    local = Path(args.model).expanduser().is_dir()
    entries = default_entries(spec, curve=read_curve(args.model) if local else None)
    if args.samplers is not None:
        unknown = sorted(set(args.samplers) - {entry.sampler for entry in entries})
        if unknown:
            raise ValueError(f"--samplers {unknown} are not in this model's set {[e.sampler for e in entries]}")
        entries = [entry for entry in entries if entry.sampler in args.samplers]
    length = args.length or _default_length(args.model, model)
    real_text = None
    if args.real_text:  # before any sampling: a model without a record of its data fails here
        from diffusion.evaluation.held_out import evaluation_data
        from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy

        data = evaluation_data(args.model, tokenizer, length, args.num_samples)
        scored = generative_perplexity(data.blocks, reference, sample_tokenizer=tokenizer,
                                       reference_tokenizer=reference_tokenizer)
        real_text = {"data": data.description, "blocks": len(data.blocks), "gen_ppl": scored["gen_ppl"],
                     "unigram_entropy": unigram_entropy(data.blocks)}
        if not args.json:
            print(f"{'held-out text':<26} {len(data.blocks)} blocks: gen-ppl {real_text['gen_ppl']:9.1f}, unigram "
                  f"entropy {real_text['unigram_entropy']:.3f}", flush=True)

    def show(row: dict[str, Any]) -> None:
        if not args.json:
            print(f"{row['label']:<26} budget {row['budget']:>4}: {row['calls']:7.1f} calls, gen-ppl "
                  f"{row['gen_ppl']:9.1f}, unigram entropy {row['unigram_entropy']:.3f}, {row['seconds']:.1f} s",
                  flush=True)

    rows = sweep(model, reference, entries=entries, budgets=args.calls, length=length, num_samples=args.num_samples,
                 batch_size=args.batch_size, seed=args.seed, sample_tokenizer=tokenizer,
                 reference_tokenizer=reference_tokenizer, on_row=show)
    result = {"model": args.model, "reference": args.reference, "length": length, "num_samples": args.num_samples,
              "seed": args.seed, "rows": rows, "real_text": real_text}
    _write_json_atomically(out.with_name(out.name + ".json"), result)
    references = {} if real_text is None else {"held-out text": (real_text["gen_ppl"], real_text["unigram_entropy"])}
    plot_quality_vs_calls(rows, out.with_name(out.name + ".png"), references=references,
                          title=f"{args.model}: {args.num_samples} samples of {length} tokens per point")
    return result


def _write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


@console_command("ddlm-eval")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "ppl" and args.store_curve and not args.any_order:
        print("ddlm-eval: error: --store-curve stores the curve --any-order N measures: give --any-order",
              file=sys.stderr)
        return 2
    if args.command == "ppl" and args.store_curve and not Path(args.model).expanduser().is_dir():
        print(f"ddlm-eval: error: --store-curve writes into a local model folder; --model {args.model!r} is not one",
              file=sys.stderr)
        return 2
    if args.command == "ppl" and args.valid_fraction is not None and not 0 < args.valid_fraction < 1:
        print(f"ddlm-eval: error: --valid-fraction must be in (0, 1), got {args.valid_fraction}", file=sys.stderr)
        return 2
    for name in ("max_blocks", "num_points", "batch_size", "num_samples", "length", "seq_len", "discrete_time"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"ddlm-eval: error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.command == "genppl" and any(s < 1 for s in args.sampling_steps):
        print(f"ddlm-eval: error: --sampling-steps must all be >= 1, got {args.sampling_steps}", file=sys.stderr)
        return 2
    if args.command == "calls" and any(k < 1 for k in args.calls):
        print(f"ddlm-eval: error: --calls must all be >= 1, got {args.calls}", file=sys.stderr)
        return 2
    run = {"ppl": _ppl, "genppl": _genppl, "calls": _calls}[args.command]
    result = run(args)  # errors end as console_command says
    if args.json:
        print(json.dumps(result))
    elif args.command == "ppl":
        low, high = result["perplexity_ci95"]
        kind = "perplexity" if result["form"] == "autoregressive" else "perplexity bound"
        print(f"{args.model}: {result['nats_per_token']:.4f} nats/token ({result['bits_per_byte']:.4f} bits/byte), "
              f"{kind} {result['perplexity']:.2f} (95% CI {low:.2f}-{high:.2f}), {result['network_calls']} network "
              f"calls, {result['method']} x {result['num_points']}")
        print(f"  data: {result['data']}")
        if "any_order" in result:
            print(f"  any-order AR: {result['any_order']['nats_per_token']:.4f} nats/token")
    elif args.command == "calls":
        print(f"wrote {args.out}.json and {args.out}.png")
    else:
        for row in result["rows"]:
            print(f"{result['sampler']} {row['steps']} steps: gen-ppl {row['gen_ppl']:.1f}, unigram entropy "
                  f"{row['unigram_entropy']:.3f}, {row['nfe']} network calls, {row['seconds']} s")
    return 0



if __name__ == "__main__":
    sys.exit(main())
