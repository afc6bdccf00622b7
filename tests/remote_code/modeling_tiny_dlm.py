"""Stand-ins for remote-code diffusion LMs (LLaDA and Dream), small enough for a CPU test.

They reproduce what the adapters rely on, not the real architectures: the ``model_type`` and class names,
``forward(input_ids, attention_mask) -> .logits [B, L, V]``, a bidirectional encoder, the mask id in the
config (LLaDA) or only in the generation config (Dream), and Dream's alignment (the output at position i
is trained to predict token i + 1, as in the AR model Dream starts from).  The tests save them with
``save_pretrained`` so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads this file
through the real remote-code path.
"""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class _TinyConfig(PretrainedConfig):
    def __init__(self, vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                 max_position_embeddings=128, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class LLaDAConfig(_TinyConfig):
    model_type = "llada"

    def __init__(self, mask_token_id=None, **kwargs):
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


class DreamConfig(_TinyConfig):
    model_type = "Dream"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class _Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        layer = nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads, 2 * config.hidden_size,
                                           dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, config.num_hidden_layers, enable_nested_tensor=False)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embed(input_ids) + self.position(positions)
        padding = None if attention_mask is None else attention_mask == 0
        return self.head(self.layers(hidden, src_key_padding_mask=padding))


class _TinyModel(PreTrainedModel):
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = _Encoder(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.5)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.encoder(input_ids, attention_mask))


class LLaDAModelLM(_TinyModel):
    config_class = LLaDAConfig


class DreamModel(_TinyModel):
    config_class = DreamConfig
