"""Loading a model folder's weights so that a folder whose weights do not belong to its config is refused.

``from_pretrained`` builds the model its ``config.json`` describes, then fills it from the weights; tensors the
weights lack stay randomly initialised (with a log line, which is easy to miss), tensors of the wrong shape
raise a long error, a truncated ``model.safetensors`` raises from deep inside the reader, and NaN weights load
silently.
:func:`load_weights_checked` turns each of these into one ``ValueError`` naming the folder: a model that is
partly random must never generate text or get a perplexity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .cli.errors import first_line

__all__ = ["load_weights_checked", "nonfinite_tensors"]


def nonfinite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (this process's shard of a sharded one)."""
    bad = []
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def load_weights_checked(auto_class: Any, name_or_path: str, **from_pretrained: Any) -> Any:
    """``auto_class.from_pretrained(name_or_path, **from_pretrained)``, refused unless every tensor of the model
    came from the weights and every weight was used.

    Raises:
        ValueError: the weights file is corrupt or truncated, a tensor's shape disagrees with the config, or the
            config's architecture (``model_type``, sizes) does not match the weights (missing or unused tensors).
    """
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' own load report: the error below says it in one line
    try:
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True,
                                                 ignore_mismatched_sizes=True, **from_pretrained)
    except SafetensorError as err:
        raise ValueError(f"{name_or_path!r}: its weights file is corrupt or truncated ({first_line(err)})") from err
    except ValueError as err:  # DDiTModel's own strict loading says it already
        raise ValueError(f"{name_or_path!r}: {first_line(err)}") from err
    finally:
        hf_logging.set_verbosity(level)
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched or unexpected:
        kind = getattr(model.config, "model_type", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's tensors are not in the weights (e.g. {sorted(missing)[0]!r})")
        if mismatched:
            first = mismatched[0]
            name = first[0] if isinstance(first, (tuple, list)) else first
            parts.append(f"{len(mismatched)} have another shape than the config gives (e.g. {name!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights are unused (e.g. {sorted(unexpected)[0]!r})")
        raise ValueError(f"{name_or_path!r}: its config.json (model_type {kind!r}) does not describe its weights: "
                         + "; ".join(parts))
    bad = nonfinite_tensors(model.named_parameters())
    if bad:
        raise ValueError(f"{name_or_path!r}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]!r})")
    return model
