"""Serve the web page that shows a diffusion LM writing (``ddlm-demo``; needs ``pip install 'ddlm[demo]'``).

    ddlm-demo runs/shakespeare/final                       # http://127.0.0.1:7860
    ddlm-demo runs/shakespeare/final runs/sft/final --port 8000

Only the models named here can be chosen on the page.  The server listens on 127.0.0.1 (this machine only)
unless --host says otherwise (``--host 0.0.0.0`` opens it to the network).
"""

from __future__ import annotations

import os
import sys

from diffusion.cli.errors import console_command


def _parser():
    from diffusion.cli.args import ArgumentParser

    p = ArgumentParser(prog="ddlm-demo", description=__doc__)
    p.add_argument("models", nargs="+", help="model folders or Hub ids the page may use")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
    return p


@console_command("ddlm-demo")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    from diffusion.locate import locate_model

    located = [locate_model(name, flag="MODEL") for name in args.models]  # a missing folder: one line, exit 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the demo needs Gradio: pip install 'ddlm[demo]'") from None
    from .page import DemoModels, build_app

    models = DemoModels(located, trust_remote_code=args.trust_remote_code)
    models.get(models.allowed[0])  # the first model loads now: a broken one fails here, not on the page
    print(f"ddlm-demo: serving {len(models.allowed)} model(s) on http://{args.host}:{args.port}", flush=True)
    build_app(models).queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                                     quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
