"""Data: the built-in corpus, loading documents from any source, the tokenizer, packing into blocks.

    from diffusion.data import load_texts, load_tokenizer, build_blocks
    texts = load_texts("builtin:shakespeare")            # {"train": [...], "validation": [...]}
    blocks = build_blocks(texts["validation"], load_tokenizer("builtin"), 128)   # LongTensor[n, 128]
"""

from .corpus import BUILTIN_CORPORA, builtin_corpus, builtin_tokenizer_path
from .loading import load_texts
from .packing import BlockBatches, StreamingBlockBatches, build_blocks, pack
from .tokenizer import MASK_TOKEN, load_tokenizer

__all__ = [
    "BUILTIN_CORPORA",
    "MASK_TOKEN",
    "BlockBatches",
    "StreamingBlockBatches",
    "build_blocks",
    "builtin_corpus",
    "builtin_tokenizer_path",
    "load_texts",
    "load_tokenizer",
    "pack",
]
