"""ddlm.samplers: turn a trained denoiser into text (to be built: see the samplers issue)."""
