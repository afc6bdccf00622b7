"""Loading the model a command names, with every failure as one line that names the flag and the path."""

from __future__ import annotations

from typing import Any

from ..locate import locate_model
from ..weights import load_weights_checked
from .errors import first_line

__all__ = ["is_causal_lm", "is_plain_causal_lm", "load_denoiser_for", "load_model_for"]


def _config_for(name: str, flag: str, trust_remote_code: bool) -> tuple[str, Any]:
    """(location, config): a clear error when the location is wrong or unreachable."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    import diffusion  # noqa: F401  (registers the ddit Auto classes)

    hf_logging.disable_progress_bar()  # stderr is for our one-line messages
    location = locate_model(name, flag=flag)
    try:
        return location, AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(f"could not load {flag} {name!r} (no such folder, or the Hub is unreachable): "
                                f"{first_line(err)}") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ValueError(f"{flag} {name!r} needs its own code to run; read it, then pass --trust-remote-code") from err
        raise ValueError(f"{flag} {name!r}: {first_line(err)}") from err


def is_causal_lm(config: Any) -> bool:
    """Whether a config describes a causal LM (an autoregressive baseline, LLaMA, GPT-2, ...)."""
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def is_plain_causal_lm(name: str, *, flag: str = "--model", trust_remote_code: bool = False) -> bool:
    """Whether ``name`` is a causal LM as it is (an AR baseline), not one converted into a denoiser."""
    from ..adapters import read_converted

    location, config = _config_for(name, flag, trust_remote_code)
    return is_causal_lm(config) and read_converted(location) is None


def load_denoiser_for(name: str, *, flag: str = "--model", trust_remote_code: bool = False,
                      mask_token_id: int | None = None) -> tuple[Any, Any]:
    """:func:`diffusion.adapters.load_denoiser` for a command: ``(denoiser, tokenizer)`` or one-line errors."""
    from ..adapters import load_denoiser

    location, _ = _config_for(name, flag, trust_remote_code)
    try:
        return load_denoiser(location, trust_remote_code=trust_remote_code, mask_token_id=mask_token_id)
    except OSError as err:
        raise FileNotFoundError(f"could not load {flag} {name!r}: {first_line(err)}") from err
    except ValueError as err:
        raise ValueError(f"{flag} {first_line(err)}") from err


def load_model_for(name: str, *, flag: str = "--model", trust_remote_code: bool = False) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, is_causal)``: a causal LM as it is, anything else as a denoiser."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters import read_converted

    location, config = _config_for(name, flag, trust_remote_code)
    if is_causal_lm(config) and read_converted(location) is None:  # a converted causal LM is a denoiser
        model = load_weights_checked(AutoModelForCausalLM, location, trust_remote_code=trust_remote_code).eval()
        return model, AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code), True
    model, tokenizer = load_denoiser_for(name, flag=flag, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer, False
