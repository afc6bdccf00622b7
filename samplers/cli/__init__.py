"""Console commands that sample: ``ddlm-train`` (trains, then prints samples), ``ddlm-generate``, ``ddlm-eval``."""
