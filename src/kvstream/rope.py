"""Rotary position embedding: what a model uses, and rotating stored keys by a position delta.

transformers rotates keys before handing them to the cache (rotate_half layout, the first
`rotary_ndims` dims of each head: all of them for Llama, 25% for Pythia). Rotation by p then by d
equals rotation by p + d, so a stored key can be moved to another position by one rotation by the
difference, computed here in float64 (float32 for half-precision caches) and rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstream.errors import KVStreamError

# Model types whose attention rotates q/k with rotate_half over the leading rotary dims and then
# calls cache.update(k, v, layer_idx): checked against transformers 5.24.
SUPPORTED_MODEL_TYPES = ("llama", "gpt_neox", "mistral", "qwen2", "qwen3")
# RoPE variants whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class Rotary:
    inv_freq: torch.Tensor  # float64, [rotary_ndims // 2]
    rotary_ndims: int
    head_dim: int

    @classmethod
    def from_model(cls, model) -> "Rotary":
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KVStreamError(
                f"model_type {model_type!r} is not supported by the streaming cache: it handles RoPE models with the "
                f"rotate_half layout ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        rotary = None
        for module in model.modules():
            if hasattr(module, "inv_freq") and isinstance(getattr(module, "inv_freq"), torch.Tensor):
                rotary = module
                break
        if rotary is None:
            raise KVStreamError(f"model {model_type!r} has no rotary embedding (inv_freq): the cache needs a RoPE model")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise KVStreamError(
                f"rope_type {rope_type!r} changes frequencies with the sequence length; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64)
        rotary_ndims = 2 * inv_freq.numel()
        if rotary_ndims > head_dim or rotary_ndims % 2:
            raise KVStreamError(f"rotary dims {rotary_ndims} do not fit head_dim {head_dim}")
        return cls(inv_freq=inv_freq, rotary_ndims=rotary_ndims, head_dim=head_dim)

    def to(self, device) -> "Rotary":
        return Rotary(self.inv_freq.to(device), self.rotary_ndims, self.head_dim)

    def cos_sin(self, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of delta * inv_freq in float64, duplicated to rotary_ndims (rotate_half layout)."""
        angles = self.inv_freq * float(delta)
        angles = torch.cat([angles, angles])
        return angles.cos(), angles.sin()

    def rotate(self, keys: torch.Tensor, delta: int, work: torch.dtype | None = None) -> torch.Tensor:
        """keys rotated by `delta` positions (last dim = head_dim), same dtype, rounded once.

        work: the arithmetic's dtype; default float64 (float32 for half-precision keys). The naive
        reference of `kvstream bench` passes the cache dtype, as the original implementation did.
        """
        if delta == 0:
            return keys
        return self._rotate_into(keys.clone(), keys, *self.cos_sin(delta), work)

    def rotate_(self, keys: torch.Tensor, delta: int, work: torch.dtype | None = None) -> torch.Tensor:
        """In place: keys rotated by `delta` positions, with the same arithmetic as `rotate` (its only
        temporaries are the rotary dims of `keys`; pass small slices to keep them small). work: as in
        `rotate` (float16: the defect switch fp16_rerotation, kvstream.defects)."""
        if delta == 0:
            return keys
        return self._rotate_into(keys, keys, *self.cos_sin(delta), work)

    def rotate_each(self, keys: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """keys [..., n, head_dim] each rotated by its own delta (deltas: [n] integers), rounded once."""
        angles = deltas.to(self.inv_freq.device, torch.float64)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)  # [n, rotary_ndims]
        return self._rotate_into(keys.clone(), keys, angles.cos(), angles.sin())

    def _rotate_into(self, out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     work: torch.dtype | None = None) -> torch.Tensor:
        """out[..., :rotary_ndims] = keys' rotary dims rotated by the float64 cos/sin (rotate_half layout)."""
        if work is None:
            work = torch.float64 if keys.dtype in (torch.float32, torch.float64) else torch.float32
        cos, sin = cos.to(work), sin.to(work)
        rd = self.rotary_ndims
        x = keys[..., :rd].to(work)
        half = rd // 2
        rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        out[..., :rd] = (x * cos + rotated_half * sin).to(keys.dtype)
        return out
