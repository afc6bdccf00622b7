"""The model card of an exported folder: YAML metadata, what the model is, and a snippet that loads it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["converted_card", "model_card", "usage_snippet"]


def usage_snippet(location: str, parameterization: str) -> str:
    """Python that loads the model with plain transformers and fills masked positions once."""
    noise = ", total_noise=torch.tensor([1.0])" if parameterization != "subs" else ""
    return f'''import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained("{location}", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("{location}", trust_remote_code=True)  # reads config.json's auto_map
ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
x = torch.cat([ids, torch.full((1, 8), tokenizer.mask_token_id)], dim=1)
with torch.no_grad():
    logits = model(input_ids=x{noise}).logits  # log p(x0 | x_t) or log-scores, shape [1, L, vocab]
print(tokenizer.decode(logits[0, ids.shape[1]:].argmax(-1)))
'''


def _meta(license: str, datasets: list[str] | None, extra_tags: list[str]) -> list[str]:
    meta = ["---", "library_name: transformers", f"license: {license}", "tags:", "- ddlm", "- discrete-diffusion",
            *[f"- {tag}" for tag in extra_tags], "- text-generation"]
    if datasets:
        meta += ["datasets:"] + [f"- {d}" for d in datasets]
    return meta + ["pipeline_tag: fill-mask", "---", ""]


def _records(train_config: dict | None, evaluation: dict | None) -> list[str]:
    lines = []
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
        lines += [""]
    if train_config:
        lines += ["## Training configuration", "", "```json", json.dumps(train_config, indent=2, sort_keys=True), "```", ""]
    return lines


def converted_card(config: dict, record: dict, *, location: str, train_config: dict | None, evaluation: dict | None,
                   license: str = "mit", datasets: list[str] | None = None) -> str:
    """The README.md of a causal LM converted into a masked-diffusion denoiser (``ddlm_denoiser.json``)."""
    architecture = ", ".join(config.get("architectures") or [config.get("model_type", "causal LM")])
    attention = record["attention"] + (f" (block size {record['block_size']})" if record["attention"] == "block" else "")
    lines = [
        "# A masked-diffusion LM converted from a causal LM (ddlm)", "",
        f"A `{architecture}` trained as a masked-diffusion denoiser: mask id {record['mask_token_id']}, attention "
        f"{attention} (imposed through a 4-D attention mask), logit shift {'on' if record['shift_logits'] else 'off'} "
        "(the output at position i-1 predicts token i). The weights load with the model's own architecture; "
        "`ddlm_denoiser.json` tells the ddlm toolkit how to run it as a denoiser.", "",
        "## Usage", "",
        "```python", "from diffusion.adapters import load_denoiser", "from samplers import get_sampler", "",
        f'model, tokenizer = load_denoiser("{location}")',
        f"out = get_sampler({'block' if record['attention'] == 'block' else 'ancestral'!r})"
        ".generate(model, batch_size=1, length=64, num_steps=64)",
        "print(tokenizer.decode(out.tokens[0]))", "```", "",
        f"or `ddlm-generate --model {location} --length 64`.", "",
    ]
    return "\n".join(_meta(license, datasets, ["absorbing-diffusion", "converted-from-causal-lm"]) + lines
                     + _records(train_config, evaluation))


def model_card(config: Any, *, location: str, train_config: dict | None, evaluation: dict | None,
               license: str = "mit", datasets: list[str] | None = None) -> str:
    """The README.md of a Hub folder: YAML metadata, what the model is, how to use it."""
    meta = _meta(license, datasets, [f"{config.process}-diffusion"])
    kind = {"subs": "masked (absorbing) diffusion, MDLM/RADD ELBO",
            "x0": f"an x0-parameterised {config.process} process (the continuous ELBO, or D3PM's discrete-time L_vb)",
            }.get(config.parameterization, f"score-entropy discrete diffusion (SEDD), {config.process} process")
    lines = [
        "# A discrete diffusion language model (ddlm)", "",
        f"A DDiT denoiser trained with {kind}: {config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.vocab_size} token states (mask id {config.mask_token_id}), schedule `{config.schedule}` "
        f"{json.dumps(config.schedule_kwargs)}, time conditioning {'on' if config.time_conditioning else 'off'}.", "",
        "## Usage", "",
        "Plain `transformers` (the model code ships in this repository, hence `trust_remote_code=True`):", "",
        "```python", usage_snippet(location, config.parameterization).rstrip(), "```", "",
        "With the ddlm toolkit, draw whole samples (the sampler and steps of `sampler_config.json`): "
        f"`ddlm-generate --model {location} --length 64`.", "",
    ]
    return "\n".join(meta + lines + _records(train_config, evaluation))
