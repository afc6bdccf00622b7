"""The model card of an exported folder: YAML metadata, what the model is, and a snippet that loads it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["model_card", "usage_snippet"]


def usage_snippet(location: str, parameterization: str) -> str:
    """Python that loads the model with plain transformers and fills masked positions once."""
    noise = ", total_noise=torch.tensor([1.0])" if parameterization == "score" else ""
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


def model_card(config: Any, *, location: str, train_config: dict | None, evaluation: dict | None,
               license: str = "mit", datasets: list[str] | None = None) -> str:
    """The README.md of a Hub folder: YAML metadata, what the model is, how to use it."""
    meta = ["---", "library_name: transformers", f"license: {license}",
            "tags:", "- ddlm", "- discrete-diffusion", f"- {config.process}-diffusion", "- text-generation"]
    if datasets:
        meta += ["datasets:"] + [f"- {d}" for d in datasets]
    meta += ["pipeline_tag: fill-mask", "---", ""]
    kind = "masked (absorbing) diffusion, MDLM/RADD ELBO" if config.parameterization == "subs" else \
        f"score-entropy discrete diffusion (SEDD), {config.process} process"
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
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
        lines += [""]
    if train_config:
        lines += ["## Training configuration", "", "```json", json.dumps(train_config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(meta + lines)
