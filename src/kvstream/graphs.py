"""Single-token decode steps replayed from a CUDA graph (fixed shapes, no per-step Python in the model).

The cache runs in static mode (`StreamingCache.enable_static`): maintenance happens on the host and
in a few small kernels before each replay; the captured forward only writes the new token at a slot
held in a device tensor and attends over all slots under a mask. On a CPU the same fixed-shape step
runs eagerly (useful to test that the static path gives the same numbers).
"""

from __future__ import annotations

import contextlib

import torch


def decode_context(device: torch.device, static: bool = False):
    """SDPA backends for eager decoding on CUDA: flash / memory-efficient / math, not cuDNN.

    Measured on an H100 (torch 2.11, benchmarks/h100-probe-raw): cuDNN attention builds an execution
    plan per new key length, so an eager step whose cache length changes every step (dense, or a lazy
    sink between events) took 51-74 ms against 16 ms at a fixed length. Fixed-shape (static, CUDA
    graph) steps keep cuDNN, which was the fastest there (4.4 vs 6.5 ms, benchmarks/h100-raw*).
    """
    if device.type != "cuda" or static:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def capture(forward):
    """Warm `forward()` up on a side stream, then capture it in a CUDA graph: (graph, its output buffer)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, out


class StaticDecoder:
    def __init__(self, model, cache, use_graph: bool | None = None):
        self.model, self.cache = model, cache
        device = cache.key_buffer.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        cache.enable_static()
        self.ids = torch.zeros(cache.key_buffer.shape[1], 1, dtype=torch.long, device=device)  # [batch, 1]
        self.graph = None
        self.logits = None

    def _forward(self):
        return self.model(
            self.ids, position_ids=self.cache.static_position, attention_mask=self.cache.static_mask,
            cache=self.cache, logits_to_keep=1,
        ).logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (a [batch] device tensor); returns the [batch, V] logits (a reused buffer)."""
        self.cache.begin_static_step()
        self.ids.copy_(token.reshape(-1, 1))
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            # Repeating this step's forward while capturing is harmless: it writes the same key/value
            # at the same slot.
            self.graph, self.logits = capture(self._forward)
        self.graph.replay()
        return self.logits
