"""Hub-ready folders: a model that describes itself and loads without this toolkit.

``export_for_hub(source, folder)`` takes a training checkpoint (``checkpoints/step-*``: its EMA weights
by default) or a model folder (``final/``) and writes::

    config.json            the DDiT config (process, schedule, parameterisation, mask id) + auto_map
    model.safetensors      the weights
    modeling_ddit.py       the self-contained model code (torch, transformers, einops only)
    sampler_config.json    the sampler defaults
    tokenizer files
    README.md              a model card: YAML metadata, training config, evaluation, a runnable snippet

so that ``AutoModelForMaskedLM.from_pretrained(folder_or_repo, trust_remote_code=True)`` works anywhere.
``push_folder`` uploads such a folder with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from . import modeling_ddit
from .checkpoint import COMPLETE, CheckpointError, load_tensors, save_weights

__all__ = ["DEFAULT_SAMPLER", "export_for_hub", "model_card", "push_folder", "usage_snippet"]

DEFAULT_SAMPLER = {"subs": {"sampler": "ancestral", "num_steps": 128}, "score": {"sampler": "analytic", "num_steps": 128}}
AUTO_MAP = {"AutoConfig": "modeling_ddit.DDiTConfig", "AutoModelForMaskedLM": "modeling_ddit.DDiTModel"}


def _resolve_source(source: Path, use_ema: bool) -> tuple[Path, Path, Path]:
    """(config folder, weights file, tokenizer folder) of a checkpoint or a model folder."""
    if not source.is_dir():
        raise FileNotFoundError(f"source does not exist or is not a folder: {str(source)!r}")
    if (source / "trainer_state.json").is_file():  # a training checkpoint
        if not (source / COMPLETE).is_file():
            raise CheckpointError(f"checkpoint {source} is incomplete (no {COMPLETE} marker)")
        weights_dir = source / ("ema" if use_ema and (source / "ema").is_dir() else "model")
        return source / "model", weights_dir / "model.safetensors", source / "tokenizer"
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(source)!r}: not a model folder or training checkpoint")
    return source, source / "model.safetensors", source


def usage_snippet(location: str, parameterization: str) -> str:
    """Python that loads the model with plain transformers and fills masked positions once."""
    sigma = ", sigma=torch.tensor([1.0])" if parameterization == "score" else ""
    return f'''import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained("{location}", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("{location}", trust_remote_code=True)  # reads config.json's auto_map
ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
x = torch.cat([ids, torch.full((1, 8), tokenizer.mask_token_id)], dim=1)
with torch.no_grad():
    logits = model(input_ids=x{sigma}).logits  # log p(x0 | x_t) or log-scores, shape [1, L, vocab]
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
        "With the ddlm toolkit, draw whole samples: "
        f"`ddlm-generate --model {location} --length 64 --steps 64`.", "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
        lines += [""]
    if train_config:
        lines += ["## Training configuration", "", "```json", json.dumps(train_config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(meta + lines)


def export_for_hub(source: str | Path, folder: str | Path, *, use_ema: bool = True, location: str | None = None,
                   license: str = "mit", datasets: list[str] | None = None) -> Path:
    """Write a Hub-ready folder from a training checkpoint or a model folder; returns the folder.

    ``location`` is what the card's snippet loads (the repo id; default: the folder path).
    """
    source, folder = Path(source), Path(folder)
    config_dir, weights, tokenizer_dir = _resolve_source(source, use_ema)
    config = modeling_ddit.DDiTConfig.from_pretrained(config_dir)
    state = load_tensors(weights)  # refuses anything that is not safetensors
    folder.mkdir(parents=True, exist_ok=True)

    config_dict = config.to_dict()
    config_dict["auto_map"] = AUTO_MAP
    config_dict["architectures"] = ["DDiTModel"]
    config_dict.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    save_weights(state, folder / "model.safetensors")
    shutil.copyfile(modeling_ddit.__file__, folder / "modeling_ddit.py")
    (folder / "sampler_config.json").write_text(json.dumps(DEFAULT_SAMPLER[config.parameterization], indent=2))
    for item in tokenizer_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            shutil.copyfile(item, folder / item.name)

    train_config, evaluation = _run_records(source)
    card = model_card(config, location=location or str(folder), train_config=train_config, evaluation=evaluation,
                      license=license, datasets=datasets)
    (folder / "README.md").write_text(card)
    return folder


def _run_records(source: Path) -> tuple[dict | None, dict | None]:
    """The training config and last held-out evaluation of the run a source came from, when available."""
    run = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    train_config = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").is_file() else None
    evaluation = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval_loss"' in line]
        if evals:
            evaluation = {"held-out loss (nats/token, ELBO bound)": evals[-1]["eval_loss"],
                          "held-out perplexity bound": evals[-1]["eval_ppl_bound"], "step": evals[-1]["step"]}
    return train_config, evaluation


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not an exported model folder (no config.json)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                             commit_message="Upload ddlm model")
    return str(info)
