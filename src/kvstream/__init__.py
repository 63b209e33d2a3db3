"""kvstream: streaming KV caches (attention sinks, lazy pruning, slack, max-drop) for transformers models.

    from kvstream import Policy, StreamingCache
    cache = StreamingCache(model, Policy("sink", n_sink=4, window_size=252, compress_every=32))
    model.generate(ids, past_key_values=cache, max_new_tokens=500)
"""

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, cache_lengths

__version__ = "0.1.0"
__all__ = ["KVStreamError", "Policy", "StreamingCache", "cache_lengths"]


def __getattr__(name):  # StreamingCache pulls in torch and transformers: import it on first use
    if name == "StreamingCache":
        from kvstream.cache import StreamingCache

        return StreamingCache
    raise AttributeError(name)
