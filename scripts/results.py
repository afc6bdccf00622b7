"""The results table: every objective at one budget on one corpus.

    python scripts/results.py --max-steps 1000 --json results.json

Trains on the built-in Shakespeare corpus, with the same data, width, depth, batch and steps, every diffusion model
with README's main-job recipe by default (``--init-scheme fan_in``, constant modulation for the time-free ones, 200
warm-up steps; the AR baseline, which scores the samples, keeps 50 warm-up steps and its own init):
- an absorbing score-entropy model (SEDD),
- a uniform score-entropy model (SEDD),
- a masked-ELBO model (MDLM/RADD, time-free),
- ARDM (the order-agnostic objective),
- D3PM (absorbing, T = 1000 discrete steps, hybrid lambda 0.01),
- a uniform x0 model with its continuous ELBO (UDLM's and Duo's loss), and Duo (its curriculum for half the steps,
  then that ELBO),
- a Glauber model (4 sweeps; a classifier with no likelihood bound, sampled by its heat-bath chain),
- a Discrete Markov Bridge (a score model that learns its rate matrix from the absorbing start),
- the autoregressive baseline (LLaMA-style).

It then prints one table and writes JSON. The table holds:
- the held-out perplexity bound with its 95% interval (negative ELBO, Gauss-Legendre 8 points; the AR
  model's exact perplexity; for D3PM also its own T-step bound L_vb, every step once per block);
- the generative perplexity of 32 samples under the AR baseline, at a few step counts;
- the samples' unigram entropy and the network calls.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion import DDiTModel
from diffusion.cli.args import parse_bool
from diffusion.modeling_ddit import INIT_SCHEMES
from diffusion.data import build_blocks, load_texts, load_tokenizer
from diffusion.evaluation.likelihood import evaluate_causal_likelihood, evaluate_likelihood
from diffusion.training.config import TrainConfig
from diffusion.training import train

from bench_common import sample_record

MODELS = {  # label: (run folder, TrainConfig overrides)
    "absorbing, score entropy": ("absorbing-score_entropy", {"objective": "score_entropy", "process": "absorbing"}),
    "uniform, score entropy": ("uniform-score_entropy", {"objective": "score_entropy", "process": "uniform",
                                                         "lr": 1e-3}),
    "masked ELBO (time-free)": ("absorbing-masked_elbo", {"objective": "masked_elbo", "process": "absorbing"}),
    "ARDM": ("ardm", {"objective": "ardm"}),
    "D3PM absorbing, T=1000, lambda 0.01": ("d3pm", {"objective": "masked_elbo", "discrete_time": 1000,
                                                     "hybrid_lambda": 0.01}),
    "uniform x0, continuous ELBO (UDLM/Duo loss)": ("uniform-x0", {"objective": "score_entropy", "process": "uniform",
                                                                    "parameterization": "x0", "lr": 1e-3}),
    "Duo (curriculum for half the steps, then the ELBO)": ("duo", {"objective": "duo", "process": "uniform",
                                                                  "lr": 1e-3}),
    "Glauber, 4 sweeps": ("glauber", {"objective": "glauber", "glauber_sweeps": 4}),
    "Discrete Markov Bridge (learnt rates)": ("bridge", {"objective": "score_entropy", "process": "bridge"}),
    "autoregressive baseline": ("autoregressive", {"objective": "autoregressive"}),
}


def recipe(overrides: dict, args: argparse.Namespace) -> dict:
    """One row's TrainConfig overrides under the command line's recipe. The AR baseline keeps the earlier
    recipe (50 warm-up steps, its own initialisation): it scores every sample, here and elsewhere in README."""
    if overrides.get("objective") == "autoregressive":
        return {**overrides, "warmup_steps": min(50, args.max_steps)}
    row = {**overrides, "warmup_steps": min(args.warmup_steps, args.max_steps), "init_scheme": args.init_scheme}
    probe = TrainConfig(output_dir="-", **row)
    if args.constant_modulation and not probe.resolved_time_conditioning:
        row["constant_modulation"] = True
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/results")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--warmup-steps", type=int, default=200, help="linear LR warm-up steps of every diffusion "
                        "model (the AR baseline, the table's scorer, keeps 50 so gen-ppl stays comparable)")
    parser.add_argument("--init-scheme", default="fan_in", choices=list(INIT_SCHEMES),
                        help="initialisation of every diffusion model (ddlm-train --init-scheme)")
    parser.add_argument("--constant-modulation", type=parse_bool, default=True, metavar="{true,false}",
                        help="time-free models keep adaLN-zero modulations fed a constant (ddlm-train "
                             "--constant-modulation); time-conditioned models are left as they are")
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[64, 256], help="sampling steps for gen-ppl")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS), metavar="MODEL",
                        help=f"train and score only these (the AR baseline is always trained: it scores the "
                             f"samples); default: all of {sorted(MODELS)}")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="toy models and few steps: checks that the script runs")
    args = parser.parse_args()
    root = Path(args.output_dir)
    size = dict(hidden_size=128, num_layers=2, num_heads=4, seq_len=64, batch_size=32)
    if args.smoke:
        size = dict(hidden_size=32, num_layers=1, num_heads=2, seq_len=32, batch_size=4)
        args.max_steps, args.sampling_steps, args.num_samples, args.eval_blocks = 4, [2], 2, 8
    seq_len = size["seq_len"]
    common = dict(**size, overwrite=True, lr=2e-3, max_steps=args.max_steps, eval_every=args.max_steps, eval_blocks=min(256, args.eval_blocks), attention="eager",
                  progress=False, save_every=args.max_steps)
    finals, seconds = {}, {}
    chosen = {label: MODELS[label] for label in MODELS
              if args.models is None or label in args.models or label == "autoregressive baseline"}
    for label, (slug, overrides) in chosen.items():
        config = TrainConfig(output_dir=str(root / slug), **{**common, **recipe(overrides, args)})
        start = time.perf_counter()
        finals[label] = train(config).final_dir
        seconds[label] = time.perf_counter() - start
        print(f"trained {label} in {seconds[label]:.0f} s", flush=True)

    tokenizer = load_tokenizer("builtin")
    blocks = build_blocks(load_texts("builtin:shakespeare")["validation"], tokenizer, seq_len)[: args.eval_blocks]
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(finals["autoregressive baseline"]).eval()
    rows = []
    for label, final in finals.items():
        row = {"model": label, "train_seconds": round(seconds[label], 1)}
        if label == "autoregressive baseline":
            row["likelihood"] = evaluate_causal_likelihood(reference, blocks, batch_size=32).to_dict()
            rows.append(row)
            continue
        model = DDiTModel.from_pretrained(final).eval()
        sweeps = getattr(model.config, "glauber_sweeps", None)
        row["likelihood"] = None if sweeps else evaluate_likelihood(
            model, blocks, method="quadrature", num_points=8, batch_size=32, progress=False).to_dict()
        if model.config.process == "bridge":  # what matrix learning made of the absorbing start
            rates = torch.nn.functional.softplus(model.bridge_rates.weights.detach().double())
            leak = rates[:-1]
            row["learnt_rates"] = {"into_mask": float(rates[-1]),
                                   "leak_mean": float(leak.mean()), "leak_max": float(leak.max()),
                                   "leak_start": model.bridge_rates.leak}
        steps_trained = MODELS[label][1].get("discrete_time")
        if steps_trained:  # a D3PM model: also its own T-step bound L_vb (T calls per block; --smoke: T = 4)
            row["discrete_time_likelihood"] = evaluate_likelihood(
                model, blocks, batch_size=32, progress=False, discrete_time=4 if args.smoke else steps_trained).to_dict()
        name = "glauber" if sweeps else "ancestral" if model.config.parameterization == "subs" else "analytic"
        row["samples"] = []
        for steps in ([sweeps * seq_len] if sweeps else args.sampling_steps):  # a Glauber chain has its own steps
            row["samples"].append(sample_record(name, model, reference, args.num_samples, seq_len, steps))
        rows.append(row)
        print(f"evaluated {label}", flush=True)

    print(f"\nBudget: {args.max_steps} steps x {size['batch_size']} blocks x {seq_len} tokens, hidden "
          f"{size['hidden_size']}, {size['num_layers']} layers, {size['num_heads']} heads; "
          f"held-out: {len(blocks)} blocks of the held-out plays (the first blocks: Macbeth).\n")
    print("| model | held-out ppl (95% CI) | " + " | ".join(f"gen-ppl / entropy @ {s} steps" for s in args.sampling_steps) + " |")
    print("|---|---|" + "---|" * len(args.sampling_steps))
    for row in rows:
        lk = row["likelihood"]
        if lk is None:
            cells = ["- (a classifier: no bound)"]
        else:
            bound = "" if lk["form"] == "autoregressive" else "<= "
            cells = [f"{bound}{lk['perplexity']:.1f} ({lk['perplexity_ci95'][0]:.1f}-{lk['perplexity_ci95'][1]:.1f})"]
            vb = row.get("discrete_time_likelihood")
            if vb is not None:
                cells[0] += (f"; its L_vb (T = {vb['num_points']}) <= {vb['perplexity']:.1f} "
                             f"({vb['perplexity_ci95'][0]:.1f}-{vb['perplexity_ci95'][1]:.1f})")
        by_steps = {s["steps"]: s for s in row.get("samples", [])}
        for steps in args.sampling_steps:
            s = by_steps.get(steps)
            cells.append("-" if s is None else f"{s['gen_ppl']:.0f} / {s['unigram_entropy']:.2f} ({s['nfe']} calls)")
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"max_steps": args.max_steps, "warmup_steps": args.warmup_steps,
                                               "init_scheme": args.init_scheme,
                                               "constant_modulation": args.constant_modulation,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
