"""Publish a trained model (``ddlm-push``): write a Hub-ready folder, then upload it.

    ddlm-push runs/shakespeare/checkpoints/step-00001000 --out hub/shakespeare --dry-run
    ddlm-push runs/shakespeare/final --repo-id you/ddlm-shakespeare --private

The token comes from the usual places (``HF_TOKEN``, ``huggingface-cli login``).
"""

from __future__ import annotations

import sys
import tempfile

from .errors import console_command, one_line


@console_command("ddlm-push")
def main(argv: list[str] | None = None) -> int:
    from .args import ArgumentParser

    parser = ArgumentParser(prog="ddlm-push", description=__doc__)
    parser.add_argument("source", help="a training checkpoint (checkpoints/step-*) or a model folder (final/)")
    parser.add_argument("--out", default=None, help="where to write the Hub folder (default: a temporary folder)")
    parser.add_argument("--repo-id", default=None, help="Hub repository, e.g. you/ddlm-shakespeare")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to upload to")
    parser.add_argument("--no-ema", action="store_true", help="publish the raw weights instead of the EMA weights")
    parser.add_argument("--license", default="mit", help="licence in the model card metadata (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="write the folder only; make no request")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.repo_id:
        parser.error("--repo-id is required unless --dry-run")
    if args.dry_run and not args.out:
        parser.error("--dry-run needs --out (the folder to write)")

    from ..hub import export_for_hub, push_folder

    out = args.out or tempfile.mkdtemp(prefix="ddlm-push-")
    folder = export_for_hub(args.source, out, use_ema=not args.no_ema, location=args.repo_id, license=args.license)
    print(f"wrote {folder}")
    if args.dry_run:
        return 0
    try:
        print(push_folder(folder, args.repo_id, private=args.private, revision=args.revision))
    except Exception as err:  # noqa: BLE001  (network and auth errors: one line, not a traceback)
        if args.debug:
            raise
        print(f"ddlm-push: error: upload to {args.repo_id!r} failed: {type(err).__name__}: {one_line(err)}",
              file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
