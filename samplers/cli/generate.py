"""Generate text with a trained diffusion LM (``ddlm-generate``).

    ddlm-generate --model runs/shakespeare/final --prompt "HAMLET:" --length 64 --sampling-steps 64
    ddlm-generate --model runs/shakespeare/final --prompt "To be" --suffix "question." --sampler remask --json
    ddlm-generate --model runs/bd3/final --prompt "HAMLET:" --max-length 256     # stops at EOS (block models)
    ddlm-generate --model runs/sft/final --chat --prompt "ROMEO: What light?" --sampler remask --block-length 16 --max-length 64

The sampler and the number of steps default to the model folder's ``sampler_config.json`` (written by
``ddlm-push``), else to the model's default sampler and 64 steps; flags override both.  On a terminal the
masked canvas is shown filling in step by step (masked positions as ``_``).

A causal LM (the autoregressive baseline of ``ddlm-train --objective autoregressive``, or any Hugging Face one)
is sampled left to right, one network call per token, with the same prompt, length, temperature, top-k/top-p,
seed and JSON output (``ddlm-generate --model runs/ar/final --prompt "HAMLET:"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any

import torch

from diffusion.cli.errors import console_command

from diffusion.weights import load_weights_checked

from ..guidance import GuidedDenoiser
from .batches import batch_sizes, generate_in_batches

DEFAULT_STEPS = 64


def _parser() -> Any:
    from diffusion.cli.args import ArgumentParser

    from .. import SAMPLERS

    p = ArgumentParser(prog="ddlm-generate", description=__doc__)
    p.add_argument("--model", required=True, help="a local model folder (with its tokenizer) or a Hub id")
    p.add_argument("--prompt", default=None, help="text the sample starts with, never changed (default: none)")
    p.add_argument("--chat", action="store_true",
                   help="format --prompt as a user turn with the tokenizer's chat template (an instruction-tuned model)")
    p.add_argument("--suffix", default=None, help="text the sample ends with, never changed; joined with a space "
                                                   "unless it starts with whitespace or punctuation (default: none)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate between prompt and suffix "
                                                          "(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="generate up to this many tokens, stopping at EOS, instead of --length exactly: block-diffusion "
                        "models, or the remask and threshold samplers with --block-length (default: off)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help=f"sampling steps (default: the model's sampler_config.json, else {DEFAULT_STEPS})")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), metavar="SAMPLER",
                   help=f"one of {sorted(SAMPLERS)} (default: the model's sampler_config.json, else ancestral for "
                        "masked models and analytic for score models)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per network call: memory grows with it, not with --num-samples; text output is "
                        "printed batch by batch; the same --seed and --batch-size repeat the samples (default: "
                        "%(default)s)"),
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 is greedy (default: the sampler's, 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus: keep the smallest set with this mass, in (0, 1] (default: all)")
    p.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block length, remask and threshold samplers (default: one block)")
    p.add_argument("--threshold", type=float, default=None, help="confidence threshold of the threshold sampler "
                                                                 "(default: the sampler's, 0.9)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight w toward --prompt/--suffix, masked models: 0 is the plain "
                        "conditional model, w > 0 leans further toward the prompt; each step then runs the model on "
                        "twice the rows (samplers/guidance.py) (default: off)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="any other hyper-parameter of the sampler by its Python name, repeatable; VALUE is read as "
                        "JSON (numbers, true/false/null, \"text\") or else kept as text, e.g. --option schedule=loop "
                        "--option eta=0.02 (default: none)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="mask id of an outside model whose config and tokenizer name none (default: read from them)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _sampling_defaults(args: argparse.Namespace, location: str, spec: Any) -> tuple[str, int]:
    """The sampler and steps: flags, else the model folder's ``sampler_config.json``, else the defaults."""
    from diffusion.hub import SAMPLER_CONFIG, read_sampler_config

    if os.path.isdir(location):
        shipped = read_sampler_config(location) or {}
    else:  # a Hub id: its sampler_config.json if the repository has one
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            shipped = read_sampler_config(os.path.dirname(hf_hub_download(location, SAMPLER_CONFIG))) or {}
        except EntryNotFoundError:  # none shipped (or, offline, none cached)
            shipped = {}
    sampler = args.sampler or shipped.get("sampler") or spec.default_sampler
    steps = args.sampling_steps or shipped.get("num_steps") or DEFAULT_STEPS
    return sampler, steps


def sampler_options(pairs: list[str], taken: set[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as keyword arguments: VALUE as JSON if it parses, else the text itself."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option takes KEY=VALUE with KEY a Python name, got --option {pair!r}")
        if key in taken or key in options:
            raise ValueError(f"--option {pair!r} sets {key!r}, which is already set (by its own flag or an earlier "
                             "--option)")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def _fail(message: str) -> int:
    print(f"ddlm-generate: error: {message}", file=sys.stderr)
    return 2


def prompt_tokens(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """The prompt's tokens; with ``chat``, the chat template of one user turn and the generation prompt."""
    if not chat:
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template, and this model's has none")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


def suffix_tokens(tokenizer: Any, suffix: str) -> list[int]:
    """The suffix's tokens; a suffix that starts with a letter or digit is joined with a space, as a word."""
    text = suffix if not suffix[:1].isalnum() else " " + suffix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _LiveView:
    """The first sample's canvas, redrawn in place below what the terminal already shows (masked as ``_``)."""

    def __init__(self, tokenizer: Any, mask_id: int | None) -> None:
        self.tokenizer, self.mask_id, self.lines = tokenizer, mask_id, 0

    def __call__(self, step: int, x: torch.Tensor) -> None:
        pieces = ["_" if tok == self.mask_id else self.tokenizer.decode([tok]) for tok in x[0].tolist()]
        text = f"step {step + 1}\n" + "".join(pieces)
        width = max(1, shutil.get_terminal_size().columns)
        up = f"\033[{self.lines}F\033[J" if self.lines else ""  # back to the frame's first line, clear below
        sys.stdout.write(up + text + "\n")
        sys.stdout.flush()
        self.lines = sum(max(1, -(-len(line) // width)) for line in text.split("\n"))

    def clear(self) -> None:
        if self.lines:
            sys.stdout.write(f"\033[{self.lines}F\033[J")
            sys.stdout.flush()


class _Printer:
    """Samples as they come: text batch by batch (numbered across batches), or one JSON object at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.count, self.kept = args, 0, []

    def add(self, texts: list[str], rows: list[list[int]]) -> None:
        if self.args.json:
            self.kept.extend({"text": t, "tokens": tok} for t, tok in zip(texts, rows))
        else:
            for text in texts:
                print(f"--- sample {self.count + 1} ---\n{text}", flush=True)
                self.count += 1

    def close(self, sampler: str, steps: int, temperature: float | None, nfe: int, seconds: float) -> None:
        args = self.args
        if args.json:
            print(json.dumps({"model": args.model, "sampler": sampler, "sampling_steps": steps,
                              "temperature": temperature, "nfe": nfe, "seconds": round(seconds, 3), "seed": args.seed,
                              "samples": self.kept}))
            return
        how = f", temperature {temperature:g}" + (" (greedy)" if temperature == 0 else "") \
            if temperature is not None else ""
        print(f"({sampler}, {steps} steps{how}, {nfe} network calls, {seconds:.2f} s)")


def _generate_autoregressive(args: argparse.Namespace) -> int:
    """A causal LM, left to right: ``--length`` new tokens (or up to ``--max-length``, stopping at EOS)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from diffusion.locate import locate_model

    from ..autoregressive import sample_autoregressive

    diffusion_only = [f"--{name.replace('_', '-')}" for name in ("suffix", "sampler", "sampling_steps", "block_length",
                                                                  "threshold", "mask_token_id", "guidance")
                      if getattr(args, name) is not None]
    location = locate_model(args.model)
    if diffusion_only:
        kind = (AutoConfig.from_pretrained(location, trust_remote_code=args.trust_remote_code).architectures or ["?"])[0]
        raise ValueError(f"--model {args.model!r} is a causal LM ({kind}), sampled left to right: "
                         f"{' '.join(diffusion_only)} are for diffusion models")
    model = load_weights_checked(AutoModelForCausalLM, location, trust_remote_code=args.trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=args.trust_remote_code)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"--model {args.model!r}: its tokenizer has no EOS token, which a causal LM needs to pad, to "
                         "stop at and to start an unprompted sample from")
    prefix = prompt_tokens(tokenizer, args.prompt, args.chat) if args.prompt else [eos]  # no prompt: a new document
    new_tokens = args.max_length or args.length
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and len(prefix) + new_tokens > context:
        raise ValueError(f"prompt ({len(prefix)} tokens) + {new_tokens} new tokens is beyond the model's context of "
                         f"{context}")
    temperature = 1.0 if args.temperature is None else args.temperature
    keep = len(prefix) if args.prompt else 0  # the EOS a prompt-less sample starts from is not part of it
    printer, calls, start = _Printer(args), 0, time.perf_counter()
    for index, size in enumerate(batch_sizes(args.num_samples, args.batch_size)):
        tokens, lengths = sample_autoregressive(  # one seeded stream across the batches
            model, torch.tensor([prefix] * size), new_tokens, seed=args.seed if index == 0 else None, eos_id=eos,
            temperature=temperature, top_k=args.top_k, top_p=args.top_p, stop_at_eos=args.max_length is not None)
        rows = [row[len(prefix) - keep : len(prefix) + n] for row, n in zip(tokens.tolist(), lengths.tolist())]
        printer.add([tokenizer.decode(row, skip_special_tokens=True) for row in rows], rows)
        calls += int(lengths.max())
    printer.close("autoregressive", new_tokens, temperature, calls, time.perf_counter() - start)
    return 0


@console_command("ddlm-generate")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from diffusion import DiffusionSpec
    from diffusion.cli.loading import is_plain_causal_lm, load_denoiser_for
    from diffusion.locate import locate_model

    from .. import FREE, get_sampler
    from ..base import LengthWarning, check_filters

    # --- validate everything that needs no model, before loading it ---
    if args.prompt is not None and not args.prompt.strip():
        return _fail("--prompt is empty (leave it out for unconditional samples)")
    if args.suffix is not None and not args.suffix.strip():
        return _fail("--suffix is empty (leave it out for no suffix)")
    if args.chat and args.prompt is None:
        return _fail("--chat formats --prompt as a user turn: give --prompt")
    if args.guidance is not None and args.prompt is None and args.suffix is None:
        return _fail("--guidance leans toward a prompt: give --prompt (or --suffix)")
    if args.guidance is not None and not math.isfinite(args.guidance):
        return _fail(f"--guidance must be a finite number, got {args.guidance}")
    if args.max_length is not None and args.suffix is not None:
        return _fail("--max-length stops at EOS, so it cannot end at a --suffix: use --length with --suffix")
    for name in ("length", "max_length", "sampling_steps", "num_samples", "batch_size", "block_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        check_filters(1.0 if args.temperature is None else args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        return _fail(f"{err} (--temperature / --top-k / --top-p)")
    options = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                                 ("block_length", args.block_length), ("threshold", args.threshold)) if v is not None}
    if args.max_length is not None:
        options["stop_at_eos"] = True
    options.update(sampler_options(args.options, set(options)))

    def build_sampler(name: str) -> Any:
        from ..ardm import read_curve

        planned = {"curve": read_curve(args.model)} if name == "ardm" and os.path.isdir(args.model) else {}
        try:
            return get_sampler(name, **options, **planned)
        except TypeError as err:
            if args.max_length is not None:
                raise ValueError(f"--max-length needs a sampler that stops at EOS (block; remask or threshold with "
                                 f"--block-length), and {name!r} does not") from err
            raise ValueError(f"sampler {name!r} does not take {sorted(options)}") from err

    if is_plain_causal_lm(args.model, trust_remote_code=args.trust_remote_code):
        return _generate_autoregressive(args)
    if args.sampler is not None:
        build_sampler(args.sampler)  # its options are checked now; the model comes next
    model, tokenizer = load_denoiser_for(args.model, trust_remote_code=args.trust_remote_code,
                                         mask_token_id=args.mask_token_id)
    config = model.config
    sampler_name, steps = _sampling_defaults(args, locate_model(args.model), DiffusionSpec.from_config(config))
    sampler = build_sampler(sampler_name)
    prefix = prompt_tokens(tokenizer, args.prompt, args.chat) if args.prompt else []
    suffix = suffix_tokens(tokenizer, args.suffix) if args.suffix else []
    row = prefix + [FREE] * (args.max_length or args.length) + suffix
    fixed = DiffusionSpec.from_config(config).chain_steps(len(row))
    if sampler_name == "glauber" and fixed and args.sampling_steps is None:
        steps = fixed
    if args.guidance is not None:
        if not DiffusionSpec.from_config(config).masked:
            raise ValueError(f"--guidance needs a masked (subs) model; --model {args.model!r} is not one")
        model = GuidedDenoiser(model, torch.tensor([token != FREE for token in row]), args.guidance)
    live = _LiveView(tokenizer, config.mask_token_id) if sys.stdout.isatty() and not args.json else None
    printer, nfe, start = _Printer(args), 0, time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LengthWarning)
        batches = generate_in_batches(sampler, model, row, args.num_samples, args.batch_size, num_steps=steps,
                                      generator=torch.Generator().manual_seed(args.seed), callback=live)
        for out in batches:
            if live is not None:
                live.clear()
                live = None
            rows = out.tokens.tolist()
            if out.lengths is not None:  # stopped at EOS: each sample ends at its own length
                rows = [tokens[:length] for tokens, length in zip(rows, out.lengths.tolist())]
            printer.add([tokenizer.decode(tokens, skip_special_tokens=True) for tokens in rows], rows)
            nfe += out.nfe
    seconds = time.perf_counter() - start
    for warning in caught:
        if issubclass(warning.category, LengthWarning):
            print(f"ddlm-generate: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    printer.close(sampler_name, steps, getattr(sampler, "temperature", None), nfe, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
