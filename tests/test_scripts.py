"""scripts/ holds thin runnable files: none may share a name with a package it imports (it would shadow it)."""

from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_no_script_shadows_a_package():
    names = {p.stem for p in SCRIPTS.glob("*.py")}
    assert not names & {"diffusion", "samplers", "rl", "torch", "transformers", "datasets", "accelerate"}, names
