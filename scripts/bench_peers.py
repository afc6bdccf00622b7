"""ddlm against SEDD's and MDLM's own code, measured in the same run, item by item, with the order alternated.

    python scripts/bench_peers.py --sedd PATH --mdlm PATH [--rounds 3] [--json benchmarks/bench_peers.json]

``--sedd`` is a checkout of https://github.com/louaaron/Score-Entropy-Discrete-Diffusion and ``--mdlm`` one of
https://github.com/kuleshov-group/mdlm (their code stays outside this repository; give either or both).  MDLM's
code also needs ``lightning``, ``torchmetrics``, ``hydra-core`` and ``omegaconf`` installed; SEDD's ``omegaconf``.
flash-attn has no CPU build, so a stand-in module routes their one attention call
(``flash_attn_varlen_qkvpacked_func`` on equal-length sequences) to PyTorch's SDPA.  SEDD's rotary code falls
back to its own PyTorch path when ``flash_attn.layers.rotary`` is missing; MDLM calls flash-attn's rotary kernel
unconditionally, so the stand-in gives it ``apply_rotary_emb_qkv_`` in PyTorch (half-split rotation, in place).
MDLM's package also imports Mamba, causal-conv1d and timm for other models and its LR schedule: placeholders
stand in for those names, none of which the measured code calls.

Items, at the configuration of ``scripts/bench_compare.py`` (hidden 384, 6 blocks, 6 heads, conditioning 128,
sequence 128, batch 8, 4096 tokens + MASK, log-linear noise):

* ``sedd train fp32`` / ``bf16``: median step time of forward + backward + AdamW on an absorbing score model.
  SEDD: its ``losses.get_loss_fn`` on its ``SEDD`` model (dropout 0.1, its default), ``torch.optim.AdamW`` (what its
  ``get_optimizer`` makes).  ddlm: the model ``bench_compare`` times.  ``--settings same`` (the default) gives
  ddlm dropout 0.1 on the attention and MLP outputs too (``attention_dropout=0``, as the peers) and has
  the stand-in attend with the two-matmul form ddlm itself uses while training on a CPU, so both run one
  algorithm; ``--settings defaults`` compares each code as it ships: ddlm without dropout, the peers on the
  fused SDPA kernel, whose backward is slower on a CPU.
* ``mdlm train fp32`` / ``bf16``: the same for the masked ELBO: MDLM's ``Diffusion._loss`` (subs, time-free,
  antithetic times, its defaults) on its ``DIT`` backbone (dropout 0.1).  ddlm: its time-free masked model.
* ``sedd sample euler`` / ``analytic``: 8 x 128 tokens in 128 steps plus the final denoising step, float32.
  SEDD: ``sampling.get_pc_sampler``; ddlm: the ``euler`` and ``analytic`` samplers.
* ``mdlm sample ddpm`` / ``ddpm_cache``: MDLM's ``Diffusion._sample`` with those predictors; ddlm: ``ancestral``
  without and with its exact cache.

bf16 rows wrap the step in CPU autocast (both codes ask for CUDA autocast, a no-op on a CPU).  Every
measurement runs in its own subprocess.  Each item runs ``--rounds`` pairs, ddlm first in odd rounds and the
peer first in even ones, so the machine's drift hits both; the ratio of a round is the peer's time over ddlm's,
and the report gives the median ratio with its range.  The float32 and bf16 matmul rates are measured at the
start, middle and end.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

from bench_common import matmul_rate, profile_calls, time_calls, training_step

SEQ_LEN, BATCH, TOKENS = 128, 8, 4096
SEDD_CONFIG = {"tokens": TOKENS, "graph": {"type": "absorb"},
               "model": {"hidden_size": 384, "cond_dim": 128, "length": SEQ_LEN, "n_blocks": 6, "n_heads": 6,
                         "scale_by_sigma": True, "dropout": 0.1}}
ITEMS = ["sedd train fp32", "sedd train bf16", "mdlm train fp32", "mdlm train bf16", "sedd sample euler",
         "sedd sample analytic", "mdlm sample ddpm", "mdlm sample ddpm_cache"]
OURS_SAMPLERS = {"euler": ("euler", {}), "analytic": ("analytic", {}), "ddpm": ("ancestral", {"cache": False}),
                 "ddpm_cache": ("ancestral", {"cache": True})}


def _flash_attn_stand_in(rotary: bool, matmul_training: bool = True) -> None:
    """Register a ``flash_attn`` module whose ``flash_attn_varlen_qkvpacked_func`` is SDPA (equal lengths only;
    with ``matmul_training``, the two-matmul form under autograd) and, with ``rotary``, whose
    ``layers.rotary.apply_rotary_emb_qkv_`` rotates q and k in place in PyTorch."""
    def varlen_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0,
                         causal: bool = False, **_: Any) -> torch.Tensor:
        total, _, heads, dim = qkv.shape
        lengths = cu_seqlens.diff()
        if not bool((lengths == max_seqlen).all()):
            raise NotImplementedError("the SDPA stand-in handles equal-length sequences only")
        q, k, v = qkv.reshape(total // max_seqlen, max_seqlen, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        if matmul_training and torch.is_grad_enabled() and qkv.requires_grad and not causal:
            # Training on a CPU: the two-matmul form, the one ddlm's own attention uses there (its backward is
            # faster than the fused CPU kernel's), so both sides run the same algorithm.
            probs = torch.softmax(torch.matmul(q * dim**-0.5, k.transpose(-1, -2)), dim=-1)
            out = torch.matmul(torch.nn.functional.dropout(probs, p=dropout_p) if dropout_p > 0 else probs, v)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        return out.transpose(1, 2).reshape(total, heads, dim)

    def apply_rotary_emb_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *_: Any, **__: Any):
        """qkv [B, S, 3, H, D]; cos, sin [S, D / 2]: rotate the two halves of q and k in place."""
        half = cos.shape[-1]
        c, s_ = cos[:, None, :].to(qkv.dtype), sin[:, None, :].to(qkv.dtype)  # [S, 1, D/2]
        for i in (0, 1):
            x1, x2 = qkv[:, :, i, :, :half].clone(), qkv[:, :, i, :, half:2 * half].clone()
            qkv[:, :, i, :, :half] = x1 * c - x2 * s_
            qkv[:, :, i, :, half:2 * half] = x1 * s_ + x2 * c
        return qkv

    package, interface = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.flash_attn_interface")
    interface.flash_attn_varlen_qkvpacked_func = varlen_qkvpacked
    package.flash_attn_interface = interface
    package.__path__ = []  # a package, so that a missing ``flash_attn.layers.rotary`` fails as a missing submodule
    sys.modules.update({"flash_attn": package, "flash_attn.flash_attn_interface": interface})
    for module in (package, interface):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    if rotary:
        layers, rotary_module = types.ModuleType("flash_attn.layers"), types.ModuleType("flash_attn.layers.rotary")
        layers.__path__ = []
        rotary_module.apply_rotary_emb_qkv_ = apply_rotary_emb_qkv_
        layers.rotary, package.layers = rotary_module, layers
        for module in (layers, rotary_module):
            module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        sys.modules.update({"flash_attn.layers": layers, "flash_attn.layers.rotary": rotary_module})


def _placeholders(*names: str) -> None:
    """Modules whose every attribute is an empty class: names other models of a peer's package import."""
    for name in names:
        module = types.ModuleType(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__["__getattr__"] = _placeholder_attribute
        sys.modules[name] = module


def _placeholder_attribute(attribute: str) -> type:
    if attribute.startswith("__"):
        raise AttributeError(attribute)
    return type(attribute, (), {})


def _sedd(checkout: str, same: bool, model_config: dict | None = None) -> tuple[Any, Any, Any, dict]:
    """SEDD's model, graph and noise at the shared configuration (``model_config``: SEDD's ``model`` section
    instead of this benchmark's), and its modules by name."""
    _flash_attn_stand_in(rotary=False, matmul_training=same)
    sys.path.insert(0, checkout)
    import graph_lib
    import losses
    import noise_lib
    import sampling
    from model.transformer import SEDD
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    config = {**SEDD_CONFIG, "model": model_config or SEDD_CONFIG["model"]}
    model = SEDD(OmegaConf.create(config))
    return model, graph_lib.Absorbing(TOKENS), noise_lib.LogLinearNoise(), {"losses": losses, "sampling": sampling}


def _mdlm(checkout: str, same: bool, shape: dict | None = None) -> Any:
    """MDLM's ``Diffusion`` (subs, time-free, its defaults) with a DIT backbone at the shared configuration
    (``shape``: MDLM ``model`` overrides instead, e.g. ``{"hidden_size": 128, "n_blocks": 2, ...}``).  MDLM's
    ``diffusion.py`` is imported as ``mdlm_diffusion``, so ddlm's own ``diffusion`` package can live beside it."""
    _flash_attn_stand_in(rotary=True, matmul_training=same)
    _placeholders("causal_conv1d", "mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface",
                  "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.selective_state_update", "timm", "timm.scheduler")
    sys.path.insert(0, checkout)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    for name, resolver in (("cwd", lambda: checkout), ("device_count", lambda: 1), ("eval", eval),
                           ("div_up", lambda x, y: (x + y - 1) // y)):
        OmegaConf.register_new_resolver(name, resolver, replace=True)
    tokenizer_dir = str(Path(__file__).resolve().parents[1] / "diffusion/data/shakespeare/tokenizer")
    shape = shape or {"hidden_size": 384, "cond_dim": 128, "length": SEQ_LEN, "n_blocks": 6, "n_heads": 6}
    overrides = [f"model.{key}={value}" for key, value in shape.items()] + [
        "training.ema=0", f"loader.global_batch_size={BATCH}", f"eval.gen_ppl_eval_model_name_or_path={tokenizer_dir}"]
    with initialize_config_dir(config_dir=str(Path(checkout).resolve() / "configs"), version_base=None):
        config = compose(config_name="config", overrides=overrides)
    mdlm_diffusion = sys.modules.get("mdlm_diffusion")
    if mdlm_diffusion is None:
        spec = importlib.util.spec_from_file_location("mdlm_diffusion", Path(checkout) / "diffusion.py")
        mdlm_diffusion = importlib.util.module_from_spec(spec)
        sys.modules["mdlm_diffusion"] = mdlm_diffusion
        spec.loader.exec_module(mdlm_diffusion)

    tokenizer = types.SimpleNamespace(vocab_size=TOKENS, mask_token=None, pad_token_id=None)
    torch.manual_seed(0)
    return mdlm_diffusion.Diffusion(config, tokenizer)


def their_training_step(item: str, peer: str, checkout: str, same: bool) -> Callable[[], None]:
    """One training step of ``item`` (forward with the peer's own loss, backward, AdamW) with the peer's code."""
    if peer == "sedd":
        model, graph, noise, modules = _sedd(checkout, same)
        loss_fn = modules["losses"].get_loss_fn(noise, graph, train=True)
        parameters, loss_of = model.parameters(), lambda: loss_fn(model, x0).mean()
    else:
        model = _mdlm(checkout, same)
        model.train()
        parameters, loss_of = model.backbone.parameters(), lambda: model._loss(x0, torch.ones_like(x0)).loss
    x0 = torch.randint(0, TOKENS, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(parameters, lr=3e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=item.endswith("bf16")):
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def our_training_step(item: str, same: bool) -> Callable[[], None]:
    """The same step with ddlm (the model ``scripts/bench_compare.py`` times); with ``same``, dropout 0.1 on the
    attention and MLP outputs and none on the attention probabilities, as both peers train; else ddlm's default,
    no dropout."""
    from bench_compare import BATCH as OUR_BATCH
    from bench_compare import build_model

    model = build_model(item.split()[0], "sdpa", dropout=0.1 if same else 0.0, attention_dropout=0.0)
    x0 = torch.randint(0, 4096, (OUR_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return training_step(model, x0, item.split()[-1])


def theirs(item: str, peer: str, checkout: str, steps: int, same: bool) -> float:
    """Seconds of one ``item`` with the peer's code (median step for training, the whole run for sampling)."""
    if " train " in f" {item} ":
        return statistics.median(time_calls(their_training_step(item, peer, checkout, same), steps))
    if peer == "sedd":
        model, graph, noise, modules = _sedd(checkout, same)
    else:
        model = _mdlm(checkout, same)
    predictor = item.split()[-1]
    model.eval()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        if peer == "sedd":
            modules["sampling"].get_pc_sampler(graph, noise, (BATCH, SEQ_LEN), predictor, 128, denoise=True,
                                               eps=1e-5, device=torch.device("cpu"))(model)
        else:
            model.sampler = predictor
            model._sample(num_steps=128)
    return time.perf_counter() - start


def ours(item: str, steps: int, same: bool) -> float:
    """Seconds of one ``item`` with ddlm (the functions ``scripts/bench_compare.py`` times)."""
    from bench_compare import build_model, generate

    if " train " in f" {item} ":
        return statistics.median(time_calls(our_training_step(item, same), steps))
    model = build_model(item.split()[0], "sdpa").eval()
    sampler, options = OURS_SAMPLERS[item.split()[-1]]
    return generate(model, sampler, options, 128, "fp32")[1]


def _measure(side: str, item: str, args: argparse.Namespace) -> Any:
    """One measurement in a fresh subprocess (its own memory and threads)."""
    peer = item.split()[0]
    command = [sys.executable, __file__, "--single", side, item, f"--{peer}", getattr(args, peer), "--train-steps",
               str(args.train_steps), "--threads", str(args.threads), "--settings", args.settings]
    command += ["--profile"] if args.profile else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    last = out.strip().splitlines()[-1]
    return json.loads(last) if args.profile else float(last)


def profile_report(items: list[str], args: argparse.Namespace) -> None:
    """Profile each training item on both sides and print the operators by self time per step, side by side."""
    report = {}
    for item in [item for item in items if " train " in f" {item} "]:
        sides = {side: _measure(side, item, args) for side in ("ddlm", "peer")}
        totals = {side: rows.pop()["self_ms_per_call"] for side, rows in sides.items()}
        by_op = {side: {r["op"]: r for r in rows} for side, rows in sides.items()}
        ops = sorted(set(by_op["ddlm"]) | set(by_op["peer"]),
                     key=lambda op: -max(by_op[s].get(op, {"self_ms_per_call": 0})["self_ms_per_call"] for s in by_op))
        print(f"\n{item} ({args.settings} settings), self CPU ms per step: ddlm total {totals['ddlm']:.1f}, "
              f"peer total {totals['peer']:.1f}")
        print(f"{'operator':44s} {'ddlm ms':>9s} {'calls':>6s} {'peer ms':>9s} {'calls':>6s}")
        table = []
        for op in ops:
            cells = [by_op[side].get(op) for side in ("ddlm", "peer")]
            text = "".join(f" {c['self_ms_per_call']:9.1f} {c['calls_per_call']:6.0f}" if c else f" {'-':>9s} {'':6s}"
                           for c in cells)
            print(f"{op[:44]:44s}{text}")
            table.append({"op": op, **{side: cell for side, cell in zip(("ddlm", "peer"), cells)}})
        report[item] = {"total_self_ms": totals, "ops": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": args.settings, "threads": args.threads,
                                           "steps": args.train_steps, "profiles": report}, indent=2))
    print(f"wrote {args.json}")


def _rates(size: int) -> dict:
    return {"fp32": matmul_rate(torch.float32, size), "bf16": matmul_rate(torch.bfloat16, size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sedd", help="a checkout of louaaron/Score-Entropy-Discrete-Diffusion")
    parser.add_argument("--mdlm", help="a checkout of kuleshov-group/mdlm")
    parser.add_argument("--items", default=None, help=f"comma-separated, of {ITEMS} (default: every item of the "
                                                       f"peers given)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs per item (default: %(default)s)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--settings", default="same", choices=["same", "defaults"],
                        help="training rows: 'same' (dropout 0.1 on both sides, one attention algorithm) or "
                             "'defaults' (each code's own: ddlm without dropout, the peers on the fused SDPA kernel)")
    parser.add_argument("--json", default="bench_peers.json", help="where to write the results")
    parser.add_argument("--min-ratio", type=float, default=1.2,
                        help="the regression guard: exit 1 when an item's median ratio (reference time / ddlm's) is "
                             "below this (default: %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile the training items' steps on both sides (torch.profiler, "
                             "--train-steps steps each) and list the top operators by self time side by side")
    parser.add_argument("--single", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    marks = {"sedd": "model/transformer.py", "mdlm": "models/dit.py"}
    for peer, mark in marks.items():
        path = getattr(args, peer)
        if path is not None and not (Path(path) / mark).is_file():
            parser.error(f"--{peer} {path!r} is not a checkout of the {peer.upper()} code (no {mark})")
    given = [peer for peer in marks if getattr(args, peer) is not None]
    if not given:
        parser.error("give --sedd, --mdlm or both: the checkouts of the code to compare against")
    items = args.items.split(",") if args.items else [item for item in ITEMS if item.split()[0] in given]
    for item in items:
        if item not in ITEMS:
            parser.error(f"--items: unknown item {item!r}; choose from {ITEMS}")
        if item.split()[0] not in given:
            parser.error(f"--items: {item!r} needs --{item.split()[0]}")
    for name in ("rounds", "train_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.min_ratio > 0:
        parser.error(f"--min-ratio must be > 0, got {args.min_ratio}")
    torch.set_num_threads(args.threads)
    if args.single:
        side, item = args.single
        peer = item.split()[0]
        same = args.settings == "same"
        if args.profile:
            step = (our_training_step(item, same) if side == "ddlm" else
                    their_training_step(item, peer, getattr(args, peer), same))
            print(json.dumps(profile_calls(step, args.train_steps, top=25)))
            return
        print(ours(item, args.train_steps, same) if side == "ddlm" else
              theirs(item, peer, getattr(args, peer), args.train_steps, same))
        return
    if args.profile:
        return profile_report(items, args)

    rates = {"start": _rates(2048)}
    rows = []
    for index, item in enumerate(items):
        if index == len(items) // 2:
            rates["middle"] = _rates(2048)
        pairs = []
        for round_ in range(args.rounds):
            order = ("ddlm", "peer") if round_ % 2 == 0 else ("peer", "ddlm")
            seconds = {side: _measure(side, item, args) for side in order}
            pairs.append(seconds)
            print(f"{item:24s} round {round_ + 1}: ddlm {seconds['ddlm']:.3f} s, peer {seconds['peer']:.3f} s "
                  f"({seconds['peer'] / seconds['ddlm']:.2f}x)", flush=True)
        ratios = [p["peer"] / p["ddlm"] for p in pairs]
        rows.append({"item": item, "pairs": pairs, "ratios": ratios, "median_ratio": statistics.median(ratios),
                     "ratio_range": [min(ratios), max(ratios)],
                     "ddlm_median_s": statistics.median(p["ddlm"] for p in pairs),
                     "peer_median_s": statistics.median(p["peer"] for p in pairs)})
    rates["end"] = _rates(2048)

    print(f"\n{'item':24s} {'ddlm':>14s} {'peer':>14s}  peer / ddlm: median (range)  >= {args.min_ratio}x")
    for row in rows:
        unit = "s/step" if " train " in f" {row['item']} " else "s"
        low, high = row["ratio_range"]
        row["meets_min_ratio"] = row["median_ratio"] >= args.min_ratio
        print(f"{row['item']:24s} {row['ddlm_median_s']:7.3f} {unit:6s} {row['peer_median_s']:7.3f} {unit:6s}  "
              f"{row['median_ratio']:.2f}x ({low:.2f} .. {high:.2f})  {'yes' if row['meets_min_ratio'] else 'NO'}")
    print("matmul GFLOP/s (fp32 / bf16): "
          + ", ".join(f"{k} {v['fp32']:.0f} / {v['bf16']:.0f}" for k, v in rates.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"config": {**SEDD_CONFIG, "batch": BATCH}, "peers": given,
                                           "settings": args.settings, "threads": args.threads,
                                           "rounds": args.rounds, "min_ratio": args.min_ratio,
                                           "matmul_gflops": rates, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    behind = [row["item"] for row in rows if not row["meets_min_ratio"]]
    if behind:  # the regression guard: a row whose median fell below the bar fails the run (after the JSON)
        sys.exit(f"bench_peers: {len(behind)} item(s) below {args.min_ratio}x the reference code: {behind}")


if __name__ == "__main__":
    main()
