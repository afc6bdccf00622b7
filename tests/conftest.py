"""Test configuration: offline Hugging Face, a private HF_HOME, a fixed thread count."""

import os
import tempfile

# Set before transformers / datasets are imported anywhere: a Hub lookup would otherwise hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="ddlm-test-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
