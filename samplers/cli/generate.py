"""Generate text with a trained diffusion LM (``ddlm-generate``).

    ddlm-generate --model runs/shakespeare/final --prompt "HAMLET:" --length 64 --sampling-steps 64
    ddlm-generate --model runs/shakespeare/final --prompt "To be" --suffix "question." --sampler remask --json

The sampler and the number of steps default to the model folder's ``sampler_config.json`` (written by
``ddlm-push``), else to the model's default sampler and 64 steps; flags override both.  On a terminal the
masked canvas is shown filling in step by step (masked positions as ``_``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

DEFAULT_STEPS = 64


def _parser() -> argparse.ArgumentParser:
    from .. import SAMPLERS

    p = argparse.ArgumentParser(prog="ddlm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local model folder (with its tokenizer) or a Hub id")
    p.add_argument("--prompt", default=None, help="text the sample starts with (never changed)")
    p.add_argument("--suffix", default=None, help="text the sample ends with (never changed)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate between prompt and suffix")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help=f"sampling steps (default: the model's sampler_config.json, else {DEFAULT_STEPS})")
    p.add_argument("--sampler", default=None, help=f"one of {sorted(SAMPLERS)} (default: the model's "
                   "sampler_config.json, else ancestral for masked models and analytic for score models)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (samplers that take one)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (samplers that sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: keep the smallest set with this mass, in (0, 1]")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length (remask, threshold)")
    p.add_argument("--threshold", type=float, default=None, help="confidence threshold (threshold sampler)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="mask id of an outside model whose config and tokenizer name none")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _sampling_defaults(args: argparse.Namespace, spec: Any) -> tuple[str, int]:
    """The sampler and steps: flags, else the model folder's ``sampler_config.json``, else the defaults."""
    from diffusion.hub import SAMPLER_CONFIG, read_sampler_config

    if os.path.isdir(os.path.expanduser(args.model)):
        shipped = read_sampler_config(os.path.expanduser(args.model)) or {}
    else:  # a Hub id: its sampler_config.json if the repository has one
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            shipped = read_sampler_config(os.path.dirname(hf_hub_download(args.model, SAMPLER_CONFIG))) or {}
        except EntryNotFoundError:  # none shipped (or, offline, none cached)
            shipped = {}
    sampler = args.sampler or shipped.get("sampler") or spec.default_sampler
    steps = args.sampling_steps or shipped.get("num_steps") or DEFAULT_STEPS
    return sampler, steps


def _fail(message: str) -> int:
    print(f"ddlm-generate: error: {message}", file=sys.stderr)
    return 2


def _load(model_id: str, trust_remote_code: bool, mask_token_id: int | None) -> tuple[Any, Any]:
    from transformers.utils import logging as hf_logging

    from diffusion import load_denoiser

    hf_logging.disable_progress_bar()  # stderr is for our one-line errors
    looks_local = model_id.startswith((".", "/", "~")) or os.path.exists(model_id)
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise FileNotFoundError(f"--model folder does not exist: {model_id!r}")
    try:
        return load_denoiser(os.path.expanduser(model_id), trust_remote_code=trust_remote_code,
                             mask_token_id=mask_token_id)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"could not load --model {model_id!r} (no such folder, or the Hub is unreachable): {first}") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ValueError(f"--model {model_id!r} needs its own code to run; read it, then pass --trust-remote-code") from err
        raise


def _live_view(tokenizer: Any, mask_id: int | None) -> Any:
    def show(step: int, x: torch.Tensor) -> None:
        pieces = ["_" if tok == mask_id else tokenizer.decode([tok]) for tok in x[0].tolist()]
        sys.stdout.write("\033[H\033[J" + f"step {step + 1}\n" + "".join(pieces) + "\n")
        sys.stdout.flush()

    return show


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from diffusion import DiffusionSpec
    from .. import FREE, SAMPLERS, get_sampler

    # --- validate what needs no model ---
    if args.prompt is not None and not args.prompt.strip():
        return _fail("--prompt is empty (leave it out for unconditional samples)")
    if args.suffix is not None and not args.suffix.strip():
        return _fail("--suffix is empty (leave it out for no suffix)")
    for name in ("length", "sampling_steps", "num_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from ..base import check_filters

    try:  # sampling options that need no model: checked before anything is loaded
        check_filters(1.0 if args.temperature is None else args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        return _fail(f"{err} (--temperature / --top-k / --top-p)")
    if args.block_length is not None and args.block_length < 1:
        return _fail(f"--block-length must be >= 1, got {args.block_length}")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        return _fail(f"unknown --sampler {args.sampler!r}; valid: {sorted(SAMPLERS)}")
    try:
        model, tokenizer = _load(args.model, args.trust_remote_code, args.mask_token_id)
        config = model.config
        sampler_name, steps = _sampling_defaults(args, DiffusionSpec.from_config(config))
        options = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                                     ("block_length", args.block_length),
                                     ("threshold", args.threshold)) if v is not None}
        try:
            sampler = get_sampler(sampler_name, **options)
        except TypeError:
            return _fail(f"sampler {sampler_name!r} does not take {sorted(options)}")
        prefix = tokenizer(args.prompt, add_special_tokens=False)["input_ids"] if args.prompt else []
        suffix = tokenizer(args.suffix, add_special_tokens=False)["input_ids"] if args.suffix else []
        row = prefix + [FREE] * args.length + suffix
        canvas = torch.tensor([row] * args.num_samples, dtype=torch.long)
        live = sys.stdout.isatty() and not args.json
        start = time.perf_counter()
        out = sampler.generate(model, canvas=canvas, num_steps=steps,
                               generator=torch.Generator().manual_seed(args.seed),
                               callback=_live_view(tokenizer, config.mask_token_id) if live else None)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))

    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out.tokens.tolist()]
    if args.json:
        print(json.dumps({"model": args.model, "sampler": sampler_name, "sampling_steps": steps, "nfe": out.nfe,
                          "seconds": round(seconds, 3), "seed": args.seed,
                          "samples": [{"text": t, "tokens": tok} for t, tok in zip(texts, out.tokens.tolist())]}))
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---\n{text}")
        print(f"({sampler_name}, {steps} steps, {out.nfe} network calls, {seconds:.2f} s)")
    return 0



if __name__ == "__main__":
    sys.exit(main())
