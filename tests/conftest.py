"""Test configuration: offline Hugging Face, a private HF_HOME, a fixed thread count per worker."""

import os
import tempfile

# Set before transformers / datasets are imported anywhere: a Hub lookup would otherwise hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="ddlm-test-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Each pytest-xdist worker gets its share of the cores (and so do the commands it starts): two workers with two
# spinning OpenMP threads each on two cores run slower than two workers with one thread each.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
THREADS = min(2, THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small ddit model folder with the built-in tokenizer, as a run's ``final/`` holds one."""
    from diffusion import DDiTConfig, DDiTModel
    from diffusion.data import load_tokenizer

    folder = tmp_path_factory.mktemp("model") / "final"
    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         cond_dim=16, max_position_embeddings=32, mask_token_id=tokenizer.mask_token_id)
              ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
