"""lm-evaluation-harness's own command line with the ``ddlm`` model registered and ddlm's tasks on the path
(``ddlm-lm-eval``; needs the optional extra ``ddlm[eval]``).

    ddlm-lm-eval --model ddlm --model_args pretrained=runs/shakespeare/final --tasks ddlm_next_line,ddlm_next_word
    ddlm-lm-eval --model ddlm --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,num_points=16 --tasks hellaswag
    ddlm-lm-eval --model hf --model_args pretrained=runs/ar/final --tasks ddlm_next_line   # a causal LM, as usual

Every flag is lm-eval's (``ddlm-lm-eval --help``); ``--model_args`` of ``ddlm`` are documented in
:mod:`samplers.harness`.  The tasks shipped in ``diffusion/data/lm_eval_tasks`` (``ddlm_next_line``,
``ddlm_next_word``) are added to ``--include_path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import diffusion.data

TASKS = Path(diffusion.data.__file__).resolve().parent / "lm_eval_tasks"


def main(argv: list[str] | None = None) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("ddlm-lm-eval: error: lm-evaluation-harness is not installed: pip install 'ddlm[eval]'",
              file=sys.stderr)
        return 2
    from .. import harness  # noqa: F401  (registers --model ddlm)

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: ddlm-lm-eval [lm-eval's arguments]\n\n{__doc__.strip()}\n\nlm-eval's own help follows.\n")
        args = ["--help"]
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args.insert(0, "run")
    if args and args[0] in ("run", "ls", "validate") and "--include_path" not in args:
        args += ["--include_path", str(TASKS)]
    saved = sys.argv
    sys.argv = ["ddlm-lm-eval", *args]
    try:
        cli_evaluate()
    except ValueError as error:  # a bad model argument or request: one line, as every ddlm command
        if "--debug" in args:
            raise
        print(f"ddlm-lm-eval: error: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
