"""Shared fixtures: tiny random-initialised Llama (GQA) and GPT-NeoX (partial rotary) models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvstream.tiny import architecture_config

torch.set_num_threads(1)


# The fixtures take the tiny shape of kvstream.tiny with their own vocabulary (tests feed random
# ids, no tokenizer), 32768 positions and (gpt_neox) a smaller MLP.
_FIXTURE_CONFIG = {
    "llama": dict(vocab_size=128, max_position_embeddings=32768, tie_word_embeddings=True),
    "gpt_neox": dict(vocab_size=128, max_position_embeddings=32768, intermediate_size=128),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    if family not in _FIXTURE_CONFIG:
        raise ValueError(family)
    config = architecture_config(family, **_FIXTURE_CONFIG[family])
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
