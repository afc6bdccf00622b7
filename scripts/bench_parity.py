"""Parity at equal tokens: does ddlm learn as much per token as MDLM's and SEDD's own code?

    python scripts/bench_parity.py --mdlm PATH --sedd PATH [--seeds 0 1] [--work DIR]
                                   [--json benchmarks/bench_parity.json] [--plot benchmarks/bench_parity.png]

``--mdlm`` is a checkout of https://github.com/kuleshov-group/mdlm, ``--sedd`` one of
https://github.com/louaaron/Score-Entropy-Discrete-Diffusion (their code stays outside this repository; the stand-ins
for flash-attn, Mamba and timm are those of ``scripts/bench_peers.py``, which also lists the packages their code
needs).  Two comparisons, each over ``--seeds``:

* **masked ELBO**: ddlm's time-free masked model (``ddlm-train``, objective ``masked_elbo``) against MDLM's
  ``Diffusion._loss`` (subs, time-free, antithetic times) on its ``DIT`` backbone;
* **absorbing score entropy**: ddlm's score model (objective ``score_entropy``) against SEDD's ``losses.get_loss_fn``
  on its ``SEDD`` model.

Everything but the code under test is shared: the built-in corpus, tokenizer (4096 + MASK) and blocks, in the
same order for a seed (ddlm's own data pipeline feeds the peers); the shape of README's main job (128 wide,
2 blocks, 4 heads, conditioning 128, 64 tokens, no dropout); batch 32; AdamW at 2e-3 with 50 warm-up steps
and a cosine decay to 0.1 over 1000 steps (ddlm's ``lr_factor`` drives the peers' optimizer); gradient clipping
at 1; bf16 autocast; no EMA.  Each code keeps its own loss and its own reduction (MDLM a mean over tokens, SEDD a
mean over sequences of per-sequence sums, as their training scripts do) and its own initialisation.
``--ddlm-model`` picks ddlm's model: ``normal`` (its default init), ``fan_in`` (the reference DiT code's init and,
for the time-free model, constant modulation) or ``fan_in_clip`` (``fan_in``, and the score model's gradient
clipped at 1/64: with a per-token mean that is what SEDD's clip at 1 of a sum over 64 positions is).

Every checkpoint (steps 250, 500, 750, 1000) of both codes is then scored by **the peer's own loss** in float32 on
the same held-out blocks (the first ``--eval-blocks`` of the held-out plays, ``--eval-draws`` draws of t and of
the noise per block), with the random stream reset before each model, so every model sees the same times and
masks: the comparison is paired and its Monte Carlo noise mostly cancels.  ddlm's models go through a
wrapper that gives them the peer backbone's ``forward(indices, sigma)``.  ddlm's own held-out loss of its runs
(``metrics.jsonl``: 256 blocks, one draw each) is kept beside, as a cross-check of the two evaluators.

Each training run and each scoring runs in its own subprocess (MDLM's ``diffusion.py`` and ddlm's ``diffusion``
package share a name; the peer's is imported under another).  The report: per step, each side's mean over seeds
and the ratio ddlm / peer of the bounds (below 1: ddlm lower).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHAPE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "cond_dim": 128, "seq_len": 64}
BATCH, LR, WARMUP, STEPS, EVAL_EVERY = 32, 2e-3, 50, 1000, 250
OBJECTIVES = {"masked_elbo": "mdlm", "score_entropy": "sedd"}
EVAL_SEED = 1234


MODEL_FLAGS = {  # --ddlm-model: ddlm's model as the run builds it
    "normal": {},
    "fan_in": {"masked_elbo": ["--init-scheme", "fan_in", "--constant-modulation", "true"],
               "score_entropy": ["--init-scheme", "fan_in"]},
    # SEDD's loss is a sum over the 64 positions, ddlm's a mean per token: the same clipping at 1 caps SEDD's
    # gradient 64 times more often.  Clipping ddlm's at 1/64 gives its AdamW SEDD's updates exactly (Adam does not
    # see a constant scale of the loss, apart from its eps).
    "fan_in_clip": {"masked_elbo": ["--init-scheme", "fan_in", "--constant-modulation", "true"],
                    "score_entropy": ["--init-scheme", "fan_in", "--grad-clip", str(1 / 64)]},
}


def ddlm_train_args(objective: str, seed: int, output_dir: Path, model: str = "normal") -> list[str]:
    """``ddlm-train`` arguments of one ddlm run (also what the peers' data pipeline is built from)."""
    return MODEL_FLAGS[model].get(objective, []) + ["--output-dir", str(output_dir), "--overwrite", "true", "--objective", objective, "--seed", str(seed),
            "--hidden-size", str(SHAPE["hidden_size"]), "--num-layers", str(SHAPE["num_layers"]),
            "--num-heads", str(SHAPE["num_heads"]), "--cond-dim", str(SHAPE["cond_dim"]),
            "--seq-len", str(SHAPE["seq_len"]), "--batch-size", str(BATCH), "--lr", str(LR),
            "--warmup-steps", str(WARMUP), "--max-steps", str(STEPS), "--eval-every", str(EVAL_EVERY),
            "--save-every", str(EVAL_EVERY), "--keep-last", str(STEPS // EVAL_EVERY), "--ema-decay", "0",
            "--dropout", "0", "--attention", "eager", "--precision", "bf16", "--num-samples", "0", "--no-plot",
            "--progress", "false"]


# ----- training (one subprocess each) -----------------------------------------------------------------------

def train_ddlm(objective: str, seed: int, run_dir: Path, model: str = "normal") -> dict[int, str]:
    """Train with ddlm's own command; returns the checkpoint model folder of every evaluation step."""
    from diffusion.cli.train import main

    code = main(ddlm_train_args(objective, seed, run_dir, model))
    if code != 0:
        raise RuntimeError(f"ddlm-train exited with {code}")
    found = {int(p.parent.name.split("-")[-1]): str(p) for p in (run_dir / "checkpoints").glob("*/model")}
    return {step: found[step] for step in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)}


def _sedd_model_config() -> dict:
    return {"hidden_size": SHAPE["hidden_size"], "cond_dim": SHAPE["cond_dim"], "length": SHAPE["seq_len"],
            "n_blocks": SHAPE["num_layers"], "n_heads": SHAPE["num_heads"], "scale_by_sigma": True, "dropout": 0.0}


def _peer_model(peer: str, checkout: str) -> tuple[torch.nn.Module, Any]:
    """The peer's trainable module and a function ``x0 -> loss`` with the peer's own objective and reduction."""
    from bench_peers import _mdlm, _sedd

    if peer == "mdlm":
        shape = {"hidden_size": SHAPE["hidden_size"], "cond_dim": SHAPE["cond_dim"], "length": SHAPE["seq_len"],
                 "n_blocks": SHAPE["num_layers"], "n_heads": SHAPE["num_heads"], "dropout": 0.0}
        model = _mdlm(checkout, same=True, shape=shape)
        return model, lambda x0: model._loss(x0, torch.ones_like(x0)).loss
    model, graph, noise, modules = _sedd(checkout, same=True, model_config=_sedd_model_config())
    loss_fn = modules["losses"].get_loss_fn(noise, graph, train=True)
    return model, lambda x0: loss_fn(model, x0).mean()


def train_peer(peer: str, checkout: str, seed: int, run_dir: Path) -> dict[int, str]:
    """Train the peer's model with its own loss on ddlm's blocks for ``seed``, ddlm's LR schedule and optimizer
    settings; saves the trainable weights (safetensors) at every evaluation step and returns their paths."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from diffusion.cli.train import build_parser
    from diffusion.cli.args import dataclass_from_namespace
    from diffusion.training.config import TrainConfig
    from diffusion.training.loop import lr_factor
    from diffusion.training.run_data import load_run_data

    objective = "masked_elbo" if peer == "mdlm" else "score_entropy"
    config = dataclass_from_namespace(TrainConfig, build_parser().parse_args(ddlm_train_args(objective, seed, run_dir)))
    data = load_run_data(config, Accelerator(cpu=True))
    model, loss_of = _peer_model(peer, checkout)
    torch.manual_seed(seed)
    trainable = model.backbone if peer == "mdlm" else model
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model.train()
    run_dir.mkdir(parents=True, exist_ok=True)
    saved, losses, start = {}, [], time.perf_counter()
    for step in range(STEPS):
        x0 = data.global_batch(step * BATCH, BATCH, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
        if (step + 1) % EVAL_EVERY == 0:
            path = run_dir / f"step-{step + 1}.safetensors"
            save_file({k: v.contiguous() for k, v in trainable.state_dict().items()}, str(path))
            saved[step + 1] = str(path)
    return {"checkpoints": saved, "train_s": time.perf_counter() - start, "last_losses": losses[-10:]}


# ----- scoring by the peer's loss (one subprocess per comparison) ------------------------------------------

class _DdlmAsPeerBackbone(torch.nn.Module):
    """A ddlm model behind the peer backbone's call ``forward(indices, sigma) -> [B, L, V]``: a masked model ignores
    sigma (time-free, as MDLM's with ``time_conditioning: False``); a score model takes it as the total noise."""

    def __init__(self, model: torch.nn.Module, needs_sigma: bool) -> None:
        super().__init__()
        self.model, self.needs_sigma = model, needs_sigma

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        noise = sigma.reshape(-1) if self.needs_sigma else None
        return self.model(indices, total_noise=noise).logits.float()


def score_all(peer: str, checkout: str, runs: dict, blocks_from: Path, eval_blocks: int, draws: int) -> dict:
    """Held-out bound (nats/token) of every checkpoint in ``runs`` by the peer's loss, same times and masks for all."""
    from safetensors.torch import load_file

    from diffusion.modeling_ddit import DDiTModel
    from diffusion.training.run_data import load_run_data  # noqa: F401  (ddlm's package first, then the peer's)

    blocks = load_file(str(blocks_from))["blocks"][:eval_blocks]
    if peer == "mdlm":
        model, _ = _peer_model(peer, checkout)
        peer_backbone, loss_fn = model.backbone, None
    else:
        from bench_peers import _sedd

        model, graph, noise, modules = _sedd(checkout, same=True, model_config=_sedd_model_config())
        loss_fn = modules["losses"].get_loss_fn(noise, graph, train=False)

    def bound(net: torch.nn.Module) -> float:
        net.eval()
        torch.manual_seed(EVAL_SEED)
        total, count = 0.0, 0
        with torch.no_grad():
            for _ in range(draws):
                for start in range(0, len(blocks), 64):
                    x0 = blocks[start:start + 64]
                    if peer == "mdlm":
                        model.backbone = net
                        nlls = model._loss(x0, torch.ones_like(x0)).nlls
                        total += float(nlls.double().sum())
                    else:
                        total += float(loss_fn(net, x0).double().sum())
                    count += x0.numel()
        return total / count

    scores: dict = {}
    for side, seeds in runs.items():
        for seed, checkpoints in seeds.items():
            for step, path in checkpoints.items():
                if side == "ddlm":
                    ddlm_model = DDiTModel.from_pretrained(path).float()
                    net = _DdlmAsPeerBackbone(ddlm_model, ddlm_model.config.needs_sigma)
                else:
                    net = peer_backbone if peer == "mdlm" else model
                    net.load_state_dict(load_file(path))
                scores.setdefault(side, {}).setdefault(seed, {})[step] = bound(net)
                print(f"  {peer} scoring: {side} seed {seed} step {step}: {scores[side][seed][step]:.4f}", flush=True)
    return scores


# ----- the driver ------------------------------------------------------------------------------------------

def _subprocess(argv: list[str]) -> Any:
    """Run this script as a worker; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {argv[:4]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ddlm_eval_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    return {row["step"]: row["eval_loss"] for row in rows}


def _summary(scores: dict, seeds: list[int]) -> list[dict]:
    rows = []
    for step in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY):
        ours = [scores["ddlm"][str(s)][str(step)] for s in seeds]
        theirs = [scores["peer"][str(s)][str(step)] for s in seeds]
        rows.append({"step": step, "ddlm": ours, "peer": theirs, "ddlm_mean": sum(ours) / len(ours),
                     "peer_mean": sum(theirs) / len(theirs),
                     "ratio": (sum(ours) / len(ours)) / (sum(theirs) / len(theirs)),
                     "paired_ratios": [o / t for o, t in zip(ours, theirs)]})
    return rows


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["comparisons"]), figsize=(6 * len(report["comparisons"]), 4.2))
    axes = [axes] if len(report["comparisons"]) == 1 else axes
    for ax, (objective, comparison) in zip(axes, report["comparisons"].items()):
        steps = [row["step"] for row in comparison["rows"]]
        for side, colour, label in (("ddlm", "C0", "ddlm"), ("peer", "C3", comparison["peer"] + "'s own code")):
            for k in range(len(report["seeds"])):
                ax.plot(steps, [row[side][k] for row in comparison["rows"]], "o-", color=colour, alpha=0.35 + 0.3 * k,
                        label=f"{label}, seed {report['seeds'][k]}")
        ax.set_title(f"{objective}: held-out bound scored by {comparison['peer']}'s loss")
        ax.set_xlabel(f"optimizer step ({BATCH} x {SHAPE['seq_len']} tokens each)")
        ax.set_ylabel("nats / token (upper bound)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mdlm", help="checkout of kuleshov-group/mdlm")
    parser.add_argument("--sedd", help="checkout of louaaron/Score-Entropy-Discrete-Diffusion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ddlm-model", choices=sorted(MODEL_FLAGS), default="normal",
                        help="ddlm's model: normal (N(0, 0.02) init), fan_in (--init-scheme fan_in, and a masked "
                             "model's --constant-modulation: MDLM's time-free DIT) or fan_in_clip (fan_in, and the "
                             "score model's gradient clipped at 1/64, what SEDD's clip at 1 of a loss summed over 64 "
                             "positions is)")
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--eval-draws", type=int, default=4)
    parser.add_argument("--work", default="runs/parity", help="folder for the runs and checkpoints")
    parser.add_argument("--json", default="benchmarks/bench_parity.json")
    parser.add_argument("--plot", default="benchmarks/bench_parity.png")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.worker:
        kind, *rest = args.worker
        if kind == "ddlm":
            objective, seed, run_dir, model = rest
            result = {"checkpoints": train_ddlm(objective, int(seed), Path(run_dir), model)}
        elif kind == "peer":
            peer, checkout, seed, run_dir = rest
            result = train_peer(peer, checkout, int(seed), Path(run_dir))
        else:
            peer, checkout, runs_json, blocks = rest
            result = score_all(peer, checkout, json.loads(Path(runs_json).read_text()), Path(blocks),
                               args.eval_blocks, args.eval_draws)
        print(json.dumps(result))
        return 0

    checkouts = {"mdlm": args.mdlm, "sedd": args.sedd}
    for peer, path in checkouts.items():
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"--{peer} must be a checkout folder, got {path!r}")
    if not any(checkouts.values()):
        parser.error("give --mdlm PATH and/or --sedd PATH")
    from safetensors.torch import save_file

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"ddlm_model": args.ddlm_model, "shape": SHAPE, "batch": BATCH, "lr": LR, "warmup": WARMUP, "steps": STEPS, "seeds": args.seeds,
                    "eval_blocks": args.eval_blocks, "eval_draws": args.eval_draws, "threads": torch.get_num_threads(),
                    "comparisons": {}}
    for objective, peer in OBJECTIVES.items():
        if checkouts[peer] is None:
            continue
        runs: dict = {"ddlm": {}, "peer": {}}
        timing: dict = {"ddlm": {}, "peer": {}}
        ddlm_own: dict = {}
        for seed in args.seeds:
            run_dir = work / f"ddlm-{args.ddlm_model}-{objective}-{seed}"
            start = time.perf_counter()
            runs["ddlm"][seed] = _subprocess(["--worker", "ddlm", objective, str(seed), str(run_dir),
                                              args.ddlm_model])["checkpoints"]
            timing["ddlm"][seed] = time.perf_counter() - start
            ddlm_own[seed] = _ddlm_eval_losses(run_dir)
            print(f"{objective}: ddlm seed {seed} trained in {timing['ddlm'][seed]:.0f} s", flush=True)
            start = time.perf_counter()
            peer_dir = work / f"{peer}-{seed}"
            if (peer_dir / "result.json").is_file():  # the peer's run does not depend on ddlm: kept from a run before
                out = json.loads((peer_dir / "result.json").read_text())
            else:
                out = _subprocess(["--worker", "peer", peer, checkouts[peer], str(seed), str(peer_dir)])
                (peer_dir / "result.json").write_text(json.dumps(out))
            runs["peer"][seed] = out["checkpoints"]
            timing["peer"][seed] = out["train_s"]
            print(f"{objective}: {peer} seed {seed} trained in {timing['peer'][seed]:.0f} s", flush=True)
        blocks_path = work / "held_out_blocks.safetensors"
        if not blocks_path.exists():
            save_file({"blocks": _held_out_blocks(work).contiguous()}, str(blocks_path))
        runs_path = work / f"runs-{objective}.json"
        runs_path.write_text(json.dumps(runs))
        scores = _subprocess(["--eval-blocks", str(args.eval_blocks), "--eval-draws", str(args.eval_draws),
                              "--worker", "score", peer, checkouts[peer], str(runs_path), str(blocks_path)])
        rows = _summary(scores, args.seeds)
        report["comparisons"][objective] = {"peer": peer, "rows": rows, "wall_s": timing,
                                            "ddlm_own_eval": ddlm_own}
        print(f"\n{objective}: ddlm against {peer}'s own code (held-out bound by {peer}'s loss, nats/token)")
        print(f"{'step':>6} {'ddlm':>18} {peer:>18} {'ratio':>7}")
        for row in rows:
            print(f"{row['step']:>6} {' '.join(f'{v:.3f}' for v in row['ddlm']):>18} "
                  f"{' '.join(f'{v:.3f}' for v in row['peer']):>18} {row['ratio']:>7.4f}")
        Path(args.json).write_text(json.dumps(report, indent=1))
    plot(report, args.plot)
    print(f"\nwrote {args.json} and {args.plot}")
    return 0


def _held_out_blocks(work: Path) -> torch.Tensor:
    """The held-out blocks every run evaluates on (ddlm's own split of the built-in corpus)."""
    from accelerate import Accelerator

    from diffusion.cli.train import build_parser
    from diffusion.cli.args import dataclass_from_namespace
    from diffusion.training.config import TrainConfig
    from diffusion.training.run_data import load_run_data

    config = dataclass_from_namespace(TrainConfig, build_parser().parse_args(
        ddlm_train_args("masked_elbo", 0, work / "blocks")))
    return load_run_data(config, Accelerator(cpu=True)).valid_blocks.long()


if __name__ == "__main__":
    sys.exit(main())
