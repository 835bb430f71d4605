"""Shared neural-network layers: attention over the paged cache, linear, norms, RoPE, MLP."""
