"""Starting from a pretrained model, and block diffusion: held-out bounds at one budget on the built-in corpus.

    python scripts/bench_pretrained.py --steps 1000 --json benchmarks/bench_pretrained.json

Every model has the size of the main job (128 wide, 2 blocks, 4 heads, 32 x 64-token batches, lr 2e-3, bf16 on
CPUs that have it).  With X = Y = ``--steps``:

Conversion (held-out masked-diffusion bound, quadrature with 8 points, 95% interval):
  (a) a masked model trained from scratch for X + Y steps;
  (b) the autoregressive baseline trained X steps, converted (``--init-from``: MASK added, bidirectional attention,
      logit shift) and trained Y steps as a masked model;
  (c) a masked model trained from scratch for Y steps.
Block diffusion (BD3-LM) at block sizes 4, 16 and L (= 64), Y steps from scratch, against the autoregressive
baseline and the masked model (c) of the same budget: the held-out bound (the AR model's exact NLL) and the
generative perplexity of 32 samples of 64 tokens under a reference AR model trained X + Y steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion.adapters import load_denoiser
from diffusion.data import build_blocks, load_texts, load_tokenizer
from diffusion.evaluation.likelihood import evaluate_causal_likelihood, evaluate_likelihood
from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy
from diffusion.training import train
from diffusion.training.config import TrainConfig
from samplers import get_sampler


def _interval(result: dict) -> str:
    low, high = result["nats_ci95"]
    return f"{result['nats_per_token']:.3f} ({low:.3f}-{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/bench-pretrained")
    parser.add_argument("--steps", type=int, default=1000, help="X = Y: steps of each stage")
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="skip training a run whose final model already exists in --output-dir (its time is "
                             "then not measured)")
    parser.add_argument("--smoke", action="store_true", help="toy models and few steps: checks that the script runs")
    args = parser.parse_args()
    root = Path(args.output_dir)
    size = dict(hidden_size=128, num_layers=2, num_heads=4, seq_len=64, batch_size=32)
    if args.smoke:
        size = dict(hidden_size=32, num_layers=1, num_heads=2, seq_len=16, batch_size=4)
        args.steps, args.eval_blocks, args.num_samples = 4, 8, 2
    length, steps = size["seq_len"], args.steps
    common = dict(**size, overwrite=True, lr=2e-3, warmup_steps=min(50, steps), eval_every=0, eval_blocks=8, attention="eager",
                  progress=False, save_every=0)

    def run(slug: str, max_steps: int, **overrides) -> tuple[Path, float | None]:
        if args.reuse and (root / slug / "final").is_dir():
            print(f"reusing {root / slug / 'final'}", flush=True)
            return root / slug / "final", None
        config = TrainConfig(output_dir=str(root / slug), max_steps=max_steps, **{**common, **overrides})
        started = time.perf_counter()
        final = train(config).final_dir
        seconds = time.perf_counter() - started
        print(f"trained {slug} ({max_steps} steps) in {seconds:.0f} s", flush=True)
        return final, seconds

    finals, seconds = {}, {}
    for slug, max_steps, overrides in [
        ("ar-X", steps, {"objective": "autoregressive"}),
        ("ar-X+Y", 2 * steps, {"objective": "autoregressive"}),
        ("masked-X+Y", 2 * steps, {}),
        ("masked-Y", steps, {}),
    ]:
        finals[slug], seconds[slug] = run(slug, max_steps, **overrides)
    finals["ar-X->masked-Y"], seconds["ar-X->masked-Y"] = run("ar-X-to-masked-Y", steps, init_from=str(finals["ar-X"]))
    blocks_sizes = [4, 16, length] if not args.smoke else [4, length]
    for block in blocks_sizes:
        slug = f"bd3-{block}"
        finals[slug], seconds[slug] = run(slug, steps, block_size=block)

    tokenizer = load_tokenizer("builtin")
    held_out = build_blocks(load_texts("builtin:shakespeare")["validation"], tokenizer, length)[: args.eval_blocks]
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(finals["ar-X+Y"]).eval()
    results = {}
    for slug, final in finals.items():
        entry = {"train_seconds": None if seconds[slug] is None else round(seconds[slug], 1)}
        if slug.startswith("ar-X") and "->" not in slug:
            model = AutoModelForCausalLM.from_pretrained(final).eval()
            entry["likelihood"] = evaluate_causal_likelihood(model, held_out, batch_size=32).to_dict()
            if slug == "ar-X":
                torch.manual_seed(0)
                start = torch.full((args.num_samples, 1), tokenizer.eos_token_id)
                tokens = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                                        max_new_tokens=length - 1, min_new_tokens=length - 1,
                                        pad_token_id=tokenizer.eos_token_id)
                entry["samples"] = {**generative_perplexity(tokens, reference), "nfe": length - 1,
                                    "unigram_entropy": unigram_entropy(tokens)}
        else:
            model, _ = load_denoiser(str(final))
            entry["likelihood"] = evaluate_likelihood(model, held_out, method="quadrature", num_points=8,
                                                      batch_size=32, progress=False).to_dict()
            if slug.startswith("bd3") or slug == "masked-Y":
                name = "block" if slug.startswith("bd3") else "ancestral"
                out = get_sampler(name).generate(model, batch_size=args.num_samples, length=length, num_steps=length,
                                                 generator=torch.Generator().manual_seed(0))
                entry["samples"] = {**generative_perplexity(out.tokens, reference), "nfe": out.nfe,
                                    "unigram_entropy": unigram_entropy(out.tokens)}
        results[slug] = entry
        print(f"evaluated {slug}", flush=True)

    print(f"\nX = Y = {steps} steps of {size['batch_size']} x {length} tokens; held-out: {len(held_out)} blocks of "
          "the held-out plays (the first blocks: Macbeth); nats per token (95% interval).\n")
    print("| start | training | held-out bound, nats/token | perplexity bound |\n|---|---|---|---|")
    for label, slug, how in [("(a) from scratch", "masked-X+Y", f"{2 * steps} masked steps"),
                             ("(b) AR baseline, converted", "ar-X->masked-Y", f"{steps} AR + {steps} masked steps"),
                             ("(c) from scratch", "masked-Y", f"{steps} masked steps")]:
        lk = results[slug]["likelihood"]
        print(f"| {label} | {how} | {_interval(lk)} | {lk['perplexity']:.1f} |")
    print("\n| model | held-out NLL or bound, nats/token | gen. perplexity (reference AR, X + Y steps) | "
          "unigram entropy | network calls |\n|---|---|---|---|---|")
    rows = [("AR baseline (exact NLL)", "ar-X")] + [(f"BD3, block {b}", f"bd3-{b}") for b in blocks_sizes] + \
        [("MDLM (masked, one block)", "masked-Y")]
    for label, slug in rows:
        entry = results[slug]
        s = entry["samples"]
        print(f"| {label} | {_interval(entry['likelihood'])} | {s['gen_ppl']:.1f} | {s['unigram_entropy']:.2f} | "
              f"{s['nfe']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"steps": steps, "size": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
