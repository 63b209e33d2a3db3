"""Tiny random models: the one source of their shape, their byte tokenizer, and a builder.

`TINY_ARCHITECTURES` is the shape shared by every tiny model (the `embedded:tiny-*` models of
`kvstream prepare-model`, the test fixtures in tests/conftest.py, the `tiny-llama` bench shape);
each user adds what it needs on top (vocabulary, positions, token ids). `tiny_config` is the
embedded models' full config: the shape plus the byte tokenizer's vocabulary. transformers and
tokenizers are imported lazily.
"""

from __future__ import annotations

from typing import Any

from kvstream.errors import KVStreamError

# Llama: grouped-query attention (4 query heads over 2 key-value heads), full rotary.
# GPT-NeoX: partial rotary (4 of 16 head dimensions), parallel residual.
TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, rope_theta=10000.0),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     rotary_pct=0.25, rotary_emb_base=10000.0, use_parallel_residual=True),
}
_FAMILY_ALIASES = {"llama": "llama", "tiny-llama": "llama",
                   "gpt_neox": "gpt_neox", "gpt-neox": "gpt_neox", "tiny-gpt-neox": "gpt_neox"}

EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 bytes + <|endoftext|>
# What the byte tokenizer adds to the shape in the embedded:tiny-* models.
BYTE_VOCAB_CONFIG: dict[str, Any] = dict(vocab_size=BYTE_VOCAB_SIZE, max_position_embeddings=4096,
                                         bos_token_id=BYTE_VOCAB_SIZE - 1, eos_token_id=BYTE_VOCAB_SIZE - 1,
                                         pad_token_id=BYTE_VOCAB_SIZE - 1, tie_word_embeddings=False)


def tiny_family(family: str) -> str:
    """"llama" or "gpt_neox" for a family name or alias (tiny-llama, gpt-neox, tiny-gpt-neox)."""
    if family not in _FAMILY_ALIASES:
        raise KVStreamError(f"tiny_config family must be 'llama' or 'gpt_neox' (got {family!r})")
    return _FAMILY_ALIASES[family]


def architecture_config(family: str, **kwargs):
    """A transformers config of the tiny shape of `family`, with `kwargs` added or overriding."""
    from transformers import GPTNeoXConfig, LlamaConfig

    family = tiny_family(family)
    config_class = LlamaConfig if family == "llama" else GPTNeoXConfig
    return config_class(**{**TINY_ARCHITECTURES[family], **kwargs})


def tiny_config(family: str = "llama", **overrides):
    """The config of an embedded tiny model (2 layers, hidden 64, 4 heads, vocab 257, 4096 positions).

    llama: grouped-query attention with 2 key-value heads, full rotary.
    gpt_neox: partial rotary (rotary_pct 0.25, i.e. 4 of 16 head dims), parallel residual.
    Keyword overrides are passed to the config (e.g. attn_implementation="eager", vocab_size=...).
    """
    return architecture_config(family, **{**BYTE_VOCAB_CONFIG, **overrides})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer(model_max_length: int = 4096):
    """A byte-level tokenizer that needs no download: token id = UTF-8 byte value (0..255), plus
    <|endoftext|> = 256 as bos/eos/pad. Decoding is the exact inverse of encoding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[EOS_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def build_tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """(model, tokenizer): a seeded random tiny model (deterministic on CPU) and the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.to(torch.float32).eval()
    return model, byte_tokenizer(config.max_position_embeddings)
