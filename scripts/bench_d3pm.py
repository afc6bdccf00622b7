"""D3PM's three transition families side by side on a small vocabulary: absorbing, uniform and nearest-neighbour.

    python scripts/bench_d3pm.py [--vocab 512 --max-steps 1000 --json benchmarks/bench_d3pm.json]

A nearest-neighbour process multiplies every row by a K x K eigenvector matrix, which at the built-in 4096 tokens
does not fit the results table's budget on a CPU; this table uses a byte-level BPE of ``--vocab`` tokens trained on
the built-in corpus instead, with the results table's model and budget otherwise (hidden 128, 2 layers, 4 heads,
1000 steps x 32 blocks x 64 tokens).  It trains, in order:

- the autoregressive baseline (``--tokenizer train:VOCAB``): it scores the samples, and its input embeddings give
  the nearest-neighbour graph (D3PM used BERT's; here the only embeddings of this tokenizer are the baseline's);
- D3PM absorbing (``masked_elbo --discrete-time T``), uniform and nearest-neighbour (x0 models, ``score_entropy
  --parameterization x0 --discrete-time T``), all with the hybrid loss (lambda 0.01), on the baseline's tokenizer.

Per model: the continuous-time bound (8 Gauss-Legendre points) on ``--eval-blocks`` held-out blocks and on their
first ``--vb-blocks``, the model's own T-step bound L_vb on those first blocks (every step once per block; T calls
a block, hence fewer blocks), and the generative perplexity
and unigram entropy of ``--num-samples`` samples drawn by the ``d3pm`` sampler at each of ``--sampling-steps``.
Nats per token are comparable within this table only (another tokenizer than the results table's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import sample_record

MODELS = {  # label: (run folder, TrainConfig overrides)
    "D3PM absorbing": ("absorbing", {"objective": "masked_elbo"}),
    "D3PM uniform": ("uniform", {"objective": "score_entropy", "process": "uniform", "parameterization": "x0",
                                 "lr": 1e-3}),
    "D3PM nearest-neighbour": ("nearest-neighbour", {"objective": "score_entropy", "process": "nearest_neighbour",
                                                     "parameterization": "x0", "lr": 1e-3}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/d3pm")
    parser.add_argument("--vocab", type=int, default=512, help="size of the byte-level BPE trained on the corpus")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--discrete-time", type=int, default=1000, help="T of the three D3PM chains")
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--vb-blocks", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="toy models and few steps: checks that the script runs")
    args = parser.parse_args()
    for name in ("vocab", "max_steps", "discrete_time", "neighbours", "num_samples", "eval_blocks", "vb_blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    from transformers import AutoModelForCausalLM

    from diffusion import DDiTModel
    from diffusion.data import build_blocks, load_texts, load_tokenizer
    from diffusion.evaluation.likelihood import evaluate_causal_likelihood, evaluate_likelihood
    from diffusion.training import train
    from diffusion.training.config import TrainConfig

    root = Path(args.output_dir)
    size = dict(hidden_size=128, num_layers=2, num_heads=4, seq_len=64, batch_size=32)
    if args.smoke:
        size = dict(hidden_size=32, num_layers=1, num_heads=2, seq_len=32, batch_size=4)
        args.max_steps, args.sampling_steps, args.num_samples, args.eval_blocks, args.vb_blocks = 4, [4], 2, 8, 4
        args.discrete_time = 8
    common = dict(**size, overwrite=True, lr=2e-3, max_steps=args.max_steps, warmup_steps=min(50, args.max_steps),
                  eval_every=args.max_steps, eval_blocks=min(256, args.eval_blocks), attention="eager",
                  progress=False, save_every=args.max_steps)
    start = time.perf_counter()
    reference_dir = train(TrainConfig(output_dir=str(root / "autoregressive"), objective="autoregressive",
                                      tokenizer=f"train:{args.vocab}", **common)).final_dir
    seconds = {"autoregressive baseline": time.perf_counter() - start}
    d3pm = dict(discrete_time=args.discrete_time, hybrid_lambda=0.01, tokenizer=str(reference_dir))
    finals = {}
    for label, (slug, overrides) in MODELS.items():
        extra = {"transition_embeddings": str(reference_dir), "neighbours": args.neighbours} \
            if overrides.get("process") == "nearest_neighbour" else {}
        start = time.perf_counter()
        finals[label] = train(TrainConfig(output_dir=str(root / slug), **{**common, **d3pm, **overrides, **extra}))\
            .final_dir
        seconds[label] = time.perf_counter() - start
        print(f"trained {label} in {seconds[label]:.0f} s", flush=True)

    tokenizer = load_tokenizer(str(reference_dir))
    blocks = build_blocks(load_texts("builtin:shakespeare")["validation"], tokenizer, size["seq_len"])[: args.eval_blocks]
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    exact = evaluate_causal_likelihood(reference, blocks, batch_size=32).to_dict()
    rows = []
    for label, final in finals.items():
        model = DDiTModel.from_pretrained(final).eval()
        row = {"model": label, "train_seconds": round(seconds[label], 1),
               "likelihood": evaluate_likelihood(model, blocks, method="quadrature", num_points=8, batch_size=32,
                                                 progress=False).to_dict(),
               "likelihood_vb_blocks": evaluate_likelihood(model, blocks[: args.vb_blocks], method="quadrature",
                                                           num_points=8, batch_size=32, progress=False).to_dict(),
               "discrete_time_likelihood": evaluate_likelihood(model, blocks[: args.vb_blocks], batch_size=32,
                                                               progress=False,
                                                               discrete_time=args.discrete_time).to_dict(),
               "samples": []}
        for steps in args.sampling_steps:
            row["samples"].append(sample_record("d3pm", model, reference, args.num_samples, size["seq_len"], steps))
        rows.append(row)
        print(f"evaluated {label}", flush=True)

    print(f"\nTokenizer: byte-level BPE of {len(tokenizer) - 1} tokens + MASK; budget {args.max_steps} steps x "
          f"{size['batch_size']} blocks x {size['seq_len']} tokens; T = {args.discrete_time}, lambda 0.01; "
          f"{len(blocks)} held-out blocks ({args.vb_blocks} for L_vb).\n")
    print(f"| model | bound, {len(blocks)} blocks | bound, first {args.vb_blocks} | own L_vb, first {args.vb_blocks} | "
          + " | ".join(f"gen-ppl / entropy @ {s} steps" for s in args.sampling_steps) + " | train s |")
    print("|---|---|---|---|" + "---|" * len(args.sampling_steps) + "---|")
    for row in rows:
        cells = [f"{lk['nats_per_token']:.3f} ({lk['nats_ci95'][0]:.3f}-{lk['nats_ci95'][1]:.3f})"
                 for lk in (row["likelihood"], row["likelihood_vb_blocks"], row["discrete_time_likelihood"])]
        cells += [f"{s['gen_ppl']:.0f} / {s['unigram_entropy']:.2f}" for s in row["samples"]]
        print(f"| {row['model']} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    print(f"| autoregressive baseline (exact) | {exact['nats_per_token']:.3f} ({exact['nats_ci95'][0]:.3f}-"
          f"{exact['nats_ci95'][1]:.3f}) | - | - | " + "- | " * len(args.sampling_steps)
          + f"{seconds['autoregressive baseline']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"vocab": args.vocab, "max_steps": args.max_steps,
                                               "discrete_time": args.discrete_time, "rows": rows,
                                               "autoregressive": {"likelihood": exact,
                                                                  "train_seconds": seconds["autoregressive baseline"]}},
                                              indent=2))


if __name__ == "__main__":
    main()
