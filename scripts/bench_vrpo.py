"""VRPO benchmark: the variance of the DPO loss estimate with and without VRPO's levers, at equal network calls.

    python scripts/bench_vrpo.py [--json benchmarks/bench_vrpo.json] [--smoke]

Setting (the sorting task of :mod:`rl.tasks`): a small model after its supervised warm-up is the reference; the same
model after ``--dpo-steps`` DPO steps on the task's preference pairs is the policy, so that policy and reference
differ as they do during a run.  On ``--pairs`` fixed held-out pairs, every setting estimates the batch's DPO loss
``--repeats`` times with fresh masks; reported: the loss's mean and variance across repeats, the mean variance of a
pair's margin, and the variance ratio against the plain estimate.  Every setting spends the same calls:
``--budget`` per ELBO estimate, four estimates per pair (policy and reference, chosen and rejected).

- plain: ``one_time`` (one t, ``budget`` masks) and independent masks for the reference;
- + times: ``monte_carlo`` (``budget`` times, one mask each: VRPO's allocation);
- + antithetic: the reference scored under the policy's times and masks;
- VRPO: both; and VRPO with ``stratified`` or Gauss-Legendre ``quadrature`` times;
- VRPO's first lever, the budget: half and twice the calls (these rows spend other numbers of calls).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time

import torch

SETTINGS = {  # name: (estimator, antithetic, budget as a multiple of --budget)
    "plain (one time, independent)": ("one_time", False, 1),
    "+ times (monte_carlo)": ("monte_carlo", False, 1),
    "+ antithetic (one time)": ("one_time", True, 1),
    "VRPO (monte_carlo, antithetic)": ("monte_carlo", True, 1),
    "VRPO, stratified times": ("stratified", True, 1),
    "VRPO, quadrature times": ("quadrature", True, 1),
    "VRPO, half the budget": ("monte_carlo", True, 0.5),
    "VRPO, twice the budget": ("monte_carlo", True, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=4, help="network calls per ELBO estimate")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1024)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--dpo-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/bench_vrpo.json")
    parser.add_argument("--smoke", action="store_true", help="a few steps and repeats (checks that the script runs)")
    args = parser.parse_args()
    if args.smoke:
        args.sft_steps, args.dpo_steps, args.repeats, args.pairs = 5, 2, 3, 4
    torch.set_num_threads(args.threads)

    from diffusion import DDiTConfig, DDiTModel
    from diffusion.data.preferences import encode_preferences
    from rl import DPOConfig, DPOTrainer, dpo_loss
    from diffusion.estimators import get_estimator
    from rl.sft import supervised_warmup
    from rl.tasks import SortTask, char_tokenizer

    task, tokenizer = SortTask(5), char_tokenizer()
    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 cond_dim=16, max_position_embeddings=12, mask_token_id=tokenizer.mask_token_id))
    supervised_warmup(model, lambda g: task.sft_batch(tokenizer, 64, g), steps=args.sft_steps, progress=False)
    reference = copy.deepcopy(model).eval()
    rows = task.preference_records(2000, torch.Generator().manual_seed(1))
    held_out = task.preference_records(args.pairs, torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as folder:
        config = DPOConfig(output_dir=folder, max_steps=args.dpo_steps, pairs_per_step=8, completion_length=6,
                           lr=1e-3, beta=0.5, num_points=args.budget, save_every=0, progress=False)
        DPOTrainer(model, tokenizer, config, rows).train()
    examples = encode_preferences(held_out, tokenizer, answer_length=6, format="auto")
    results = {}
    header = f"{'setting':32} {'calls':>5} {'mean loss':>10} {'var(loss)':>11} {'var(margin)':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, (estimator, antithetic, scale) in SETTINGS.items():
        budget = max(1, int(args.budget * scale))
        start = time.perf_counter()
        setting = dataclasses.replace(config, estimator=estimator, antithetic=antithetic)
        trainer = DPOTrainer(model, tokenizer, setting, rows)
        trainer.reference = reference  # the warm-up model, not a copy of the policy
        ids = list(range(len(examples)))
        losses, margins = [], []
        estimate = get_estimator(estimator, trainer.estimator.mask_id, num_points=budget)
        with torch.no_grad():
            for r in range(args.repeats):
                policy, ref = trainer.log_likelihoods(examples, r, ids, "eval", estimate)
                loss, margin = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=config.beta)
                losses.append(float(loss))
                margins.append(margin.double())
        losses_t, margins_t = torch.tensor(losses, dtype=torch.float64), torch.stack(margins)
        results[name] = {"estimator": estimator, "antithetic": antithetic, "calls_per_pair": 4 * budget,
                         "mean_loss": float(losses_t.mean()), "loss_variance": float(losses_t.var()),
                         "margin_variance": float(margins_t.var(dim=0).mean()),
                         "seconds": time.perf_counter() - start}
    plain = results["plain (one time, independent)"]["loss_variance"]
    for name, row in results.items():
        row["variance_ratio"] = row["loss_variance"] / plain
        print(f"{name:32} {row['calls_per_pair']:5d} {row['mean_loss']:10.4f} {row['loss_variance']:11.2e} {row['margin_variance']:12.4f} "
              f"{row['variance_ratio']:7.3f}")
    out = {"budget": args.budget, "pairs": args.pairs, "repeats": args.repeats, "dpo_steps": args.dpo_steps,
           "sft_steps": args.sft_steps, "settings": results}
    if not args.smoke:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
