"""Hub-ready folders: a model that describes itself and loads without this toolkit.

``export_for_hub(source, folder)`` takes a training checkpoint (``checkpoints/step-*``: its EMA weights
by default) or a model folder (``final/``) and writes::

    config.json            the DDiT config (process, schedule, parameterisation, mask id) + auto_map
    model.safetensors      the weights
    modeling_ddit.py       the model code (torch, transformers, einops only), with the one file it imports:
    dropout.py             the CPU dropout it uses (diffusion/dropout.py)
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

from .. import dropout, modeling_ddit
from ..spec import DiffusionSpec
from ..training.checkpoint import COMPLETE, CheckpointError, load_tensors, save_weights
from ..adapters import CONVERTED_FILE, DenoiserConfig
from .card import converted_card, model_card

__all__ = ["SAMPLER_CONFIG", "export_for_hub", "push_folder", "read_sampler_config"]

SAMPLER_CONFIG = "sampler_config.json"  # {"sampler": name, "num_steps": n}: the sampling defaults of the model
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
    if (source / "train_config.json").is_file() or (source / "checkpoints").is_dir():
        steps = sorted(source.glob("checkpoints/step-*"))
        newest = f" or a checkpoint such as {str(steps[-1])!r}" if steps else ""
        raise FileNotFoundError(f"{str(source)!r} is a training run folder: pass its model {str(source / 'final')!r}"
                                f"{newest}")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(source)!r}: not a model folder or training checkpoint")
    return source, source / "model.safetensors", source


def export_for_hub(source: str | Path, folder: str | Path, *, use_ema: bool = True, location: str | None = None,
                   license: str = "mit", datasets: list[str] | None = None) -> Path:
    """Write a Hub-ready folder from a training checkpoint or a model folder; returns the folder.

    ``location`` is what the card's snippet loads (the repo id; default: the folder path).
    """
    source, folder = Path(source), Path(folder)
    config_dir, weights, tokenizer_dir = _resolve_source(source, use_ema)
    if (config_dir / CONVERTED_FILE).is_file():
        return _export_converted(source, config_dir, weights, tokenizer_dir, folder, location=location,
                                 license=license, datasets=datasets)
    _check_ddit(source, config_dir)
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
    shutil.copyfile(dropout.__file__, folder / "dropout.py")  # modeling_ddit.py imports it (``from .dropout``)
    spec = DiffusionSpec.from_config(config)
    sampler = {"sampler": spec.default_sampler, "num_steps": spec.default_sampling_steps}
    (folder / SAMPLER_CONFIG).write_text(json.dumps(sampler, indent=2))
    _copy_tokenizer(tokenizer_dir, folder)

    train_config, evaluation = _run_records(source)
    card = model_card(config, location=location or str(folder), train_config=train_config, evaluation=evaluation,
                      license=license, datasets=datasets)
    (folder / "README.md").write_text(card)
    return folder


def _check_ddit(source: Path, config_dir: Path) -> None:
    """ValueError unless ``config_dir`` holds a ddit config: the card, the code and the auto_map written here are
    ddit's, so any other model would be published under a label it cannot be loaded by."""
    try:
        model_type = json.loads((config_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(source)!r}: config.json cannot be read ({err})") from err
    if model_type != "ddit":
        raise ValueError(f"{str(source)!r} is a {model_type!r} model, not a ddit model or a ddlm-convert folder: "
                         "ddlm-push publishes only those; upload other folders as they are with `hf upload`")


def _copy_tokenizer(tokenizer_dir: Path, folder: Path) -> None:
    for item in tokenizer_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json", "vocab.json", "merges.txt",
                                                               "chat_template.jinja"):
            shutil.copyfile(item, folder / item.name)


def _export_converted(source: Path, config_dir: Path, weights: Path, tokenizer_dir: Path, folder: Path, *,
                      location: str | None, license: str, datasets: list[str] | None) -> Path:
    """A converted causal LM: its own architecture's files, the conversion record, the sampler defaults, a card."""
    from ..adapters import read_converted

    record = read_converted(str(config_dir))
    state = load_tensors(weights)  # refuses anything that is not safetensors
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", CONVERTED_FILE):
        if (config_dir / name).is_file():
            shutil.copyfile(config_dir / name, folder / name)
    save_weights(state, folder / "model.safetensors")
    config = json.loads((config_dir / "config.json").read_text())
    block = record["block_size"] if record["attention"] == "block" else None
    spec = DiffusionSpec.from_config(DenoiserConfig(vocab_size=config["vocab_size"], mask_token_id=record["mask_token_id"],
                                                    max_position_embeddings=1, attention=record["attention"],
                                                    attention_block_size=block))
    sampler = {"sampler": spec.default_sampler, "num_steps": spec.default_sampling_steps}
    (folder / SAMPLER_CONFIG).write_text(json.dumps(sampler, indent=2))
    _copy_tokenizer(tokenizer_dir, folder)
    train_config, evaluation = _run_records(source)
    card = converted_card(config, record, location=location or str(folder), train_config=train_config,
                          evaluation=evaluation, license=license, datasets=datasets)
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


def read_sampler_config(folder: str | Path) -> dict[str, Any] | None:
    """The ``{"sampler", "num_steps"}`` defaults an exported folder ships, or None when it ships none.

    A file that exists but is not such an object is a ``ValueError`` naming it.
    """
    path = Path(folder) / SAMPLER_CONFIG
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not (isinstance(values, dict) and isinstance(values.get("sampler"), str)
            and isinstance(values.get("num_steps"), int) and values["num_steps"] >= 1):
        raise ValueError(f"{path} must hold {{\"sampler\": name, \"num_steps\": n >= 1}}, got {values!r}")
    return values


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
