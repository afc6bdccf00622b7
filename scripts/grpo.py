"""``ddlm-rl`` as a file, for launchers that take a script: ``torchrun --nproc_per_node 2 scripts/grpo.py ...``."""

import sys

from rl.cli import main

if __name__ == "__main__":
    sys.exit(main())
