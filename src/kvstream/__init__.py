"""kvstream: streaming KV caches (attention sinks, lazy pruning, slack, max-drop) for transformers models."""

__version__ = "0.1.0"
