"""ddlm.rl: GRPO-family fine-tuning of diffusion LMs (to be built: see the RL issue)."""
