"""Reference decoding loops (ground truth for the engine's parity tests).

Each loop takes a ``PlainModel`` (tests/reference/plain_models.py), one prompt (list[int]) and the loop's
parameters, and returns ``(generated_token_ids, num_forwards)`` with the prompt excluded. Batch size 1,
greedy (temperature 0). Rule numbers "§n.m" refer to /work/shared/ALGORITHMS.md.

Conventions shared by all loops (interpretation choices, also stated at each use):

* Tie rule for every top-k / "most confident": higher confidence first, then LOWER position first
  (``torch.topk`` leaves ties unspecified; the engine uses the same deterministic rule). Positions with
  confidence -inf are ordered the same way (lowest position first).
* ``argmax`` returns the first (lowest) index on ties, as torch documents.
* ``num_forwards`` counts one per model call (a CFG step = 2 calls; SDAR's prefill and per-block "store"
  forwards are counted).

The loops live in one module per family: ``bidirectional`` (LLaDA, Dream, Fast-dLLM), ``block_diffusion``
(SDAR, LLaDA2-MoE, Fast-dLLM v2) and ``pipelined`` (D2F, MultiBD); ``common`` holds the shared helpers.
"""

from __future__ import annotations

from .bidirectional import dream_generate, dream_num_transfer, fast_dllm_generate, llada_generate
from .block_diffusion import fast_dllm_v2_generate, llada2_generate, sdar_generate
from .common import argmax_and_prob, block_causal_mask_abs, ranked_positions, sched, topk_positions
from .pipelined import d2f_generate, multi_bd_generate

__all__ = [
    "argmax_and_prob",
    "block_causal_mask_abs",
    "d2f_generate",
    "dream_generate",
    "dream_num_transfer",
    "fast_dllm_generate",
    "fast_dllm_v2_generate",
    "llada2_generate",
    "llada_generate",
    "multi_bd_generate",
    "ranked_positions",
    "sched",
    "sdar_generate",
    "topk_positions",
]
