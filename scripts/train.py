"""``ddlm-train`` as a file, for launchers that take a script: ``accelerate launch scripts/train.py ...``."""

import sys

from samplers.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
