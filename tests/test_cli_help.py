"""Every command's --help states the default each option really takes (argparse renders it from the parser)."""

import argparse

import pytest

from diffusion.cli.push import main as push_main  # noqa: F401  (the module builds its parser inside main)


def _parsers():
    from diffusion.cli.convert import _parser as convert_parser
    from diffusion.cli.sft import _parser as sft_parser
    from diffusion.cli.train import build_parser
    from rl.cli import _parser as rl_parser
    from rl.dpo_cli import _parser as dpo_parser
    from samplers.cli.evaluate import _parser as eval_parser
    from samplers.cli.generate import _parser as generate_parser

    evaluate = eval_parser()
    subcommands = next(a for a in evaluate._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"ddlm-train": (build_parser(), []), "ddlm-generate": (generate_parser(), ["--model", "m"]),
            "ddlm-eval ppl": (subcommands["ppl"], ["--model", "m"]),
            "ddlm-eval genppl": (subcommands["genppl"], ["--model", "m", "--reference", "r"]),
            "ddlm-eval calls": (subcommands["calls"], ["--model", "m", "--reference", "r"]),
            "ddlm-rl": (rl_parser(), []), "ddlm-dpo": (dpo_parser(), []), "ddlm-sft": (sft_parser(), ["--model", "m"]),
            "ddlm-convert": (convert_parser(), ["--model", "m", "--output-dir", "o"])}


@pytest.mark.parametrize("name", ["ddlm-train", "ddlm-generate", "ddlm-eval ppl", "ddlm-eval genppl", "ddlm-eval calls", "ddlm-rl",
                                  "ddlm-dpo", "ddlm-sft", "ddlm-convert"])
def test_help_shows_the_default_that_parsing_gives(name):
    parser, required = _parsers()[name]
    parsed = vars(parser.parse_args(required))
    checked = 0
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or not action.option_strings or action.nargs == 0:
            continue  # --help and on/off switches
        if action.required:
            continue  # no default to show
        text = action.help % {**vars(action), "prog": parser.prog}
        assert "(default: " in text, (name, action.dest, text)
        shown = text.rsplit("(default: ", 1)[1].rstrip(")")
        value = parsed[action.dest]
        if value == []:  # a repeatable option that starts empty
            assert shown.startswith("none"), (name, action.dest, text)
        elif value is not None:  # a concrete default must be the one printed
            assert shown in (repr(value), str(value)), (name, action.dest, shown, value)
        else:  # None stands for a rule, which the help must spell out
            assert shown not in ("None", "'None'") or "None:" in text, (name, action.dest, text)
        checked += 1
    assert checked >= 5


def test_ddlm_rl_fills_its_derived_defaults_as_its_help_says(tmp_path, monkeypatch):
    from rl.cli import _new_run_folder, _parser

    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args([])
    assert (args.max_steps, args.lr, args.completion_length, args.output_dir) == (150, 1e-3, None, None)
    assert _new_run_folder() == "runs/rl"
    (tmp_path / "runs/rl").mkdir(parents=True)
    (tmp_path / "runs/rl-2").mkdir()
    assert _new_run_folder() == "runs/rl-3"  # never an existing folder
