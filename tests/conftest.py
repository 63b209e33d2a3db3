"""Shared fixtures: tiny random-initialised Llama (GQA) and GPT-NeoX (partial rotary) models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

torch.set_num_threads(1)


def tiny_model(family: str, seed: int = 0, **overrides):
    if family == "llama":
        config = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            rope_theta=10000.0, tie_word_embeddings=True,
        )
    elif family == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=32768,
            use_parallel_residual=True,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=["llama", "gpt_neox"])
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)
