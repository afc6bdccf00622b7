"""The command-line side of the ``diffusion`` layer: dataclass-generated arguments, ``ddlm-train``'s training
half and ``ddlm-push``.  Commands that sample live in :mod:`samplers.cli`, ``ddlm-rl`` in :mod:`rl.cli`."""

from .args import add_dataclass_arguments, dataclass_from_namespace

__all__ = ["add_dataclass_arguments", "dataclass_from_namespace"]
