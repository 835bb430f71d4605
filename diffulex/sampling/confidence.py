"""Device side of sampling: logits → top-1 token and its confidence, per sampled position.

Only these two small vectors cross to the host. Confidence kinds (``SampleSpec.policy``):
  * ``probability`` — softmax probability of the chosen token (LLaDA low_confidence, Dream maskgit_plus)
  * ``margin``      — top-1 minus top-2 probability (Dream topk_margin)
  * ``entropy``     — Σ p·log(p + 1e-10), the negative entropy (Dream entropy; higher = more certain)
  * ``random``      — uniform in [0, 1) (LLaDA random remasking)
The mask token itself is never a valid prediction: its logit is set to −inf first (dInfer's rule; a
model that predicted the mask id would otherwise re-decode the same position forever).
Temperature > 0 uses the Gumbel-max trick in float64 (ML-GSAI LLaDA): argmax(exp(l) / (−log u)^T).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffulex.step import SampleSpec

_SOFTMAX_DTYPES = {"logits": None, "float64": torch.float64}


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Dream's order: top-p first, then top-k; removed entries get the dtype's minimum."""
    fill = torch.finfo(logits.dtype).min
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, sorted_idx, remove), fill)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, fill)
    return logits


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def _confidence(probs: torch.Tensor, token_ids: torch.Tensor, policy: str) -> torch.Tensor:
    if policy == "probability":
        return probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    if policy == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if policy == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    raise ValueError(f"unknown confidence policy {policy!r}")


def sample_tokens(
    logits: torch.Tensor, spec: SampleSpec, mask_token_id: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token ids ``[N]`` (int64) and confidences ``[N]`` (float64) for logits ``[N, vocab]``.

    ``seed`` drives the noise of temperature sampling and random confidences (unused when greedy).
    """
    if logits.shape[0] == 0:
        empty = logits.new_zeros(0)
        return empty.long(), empty.double()
    logits = logits.clone()
    if 0 <= mask_token_id < logits.shape[-1]:
        logits[:, mask_token_id] = float("-inf")
    logits = _filter_top_k_top_p(logits, spec.top_k, spec.top_p)
    if spec.temperature > 0:
        noise = torch.rand(
            logits.shape,
            dtype=torch.float64,
            device=logits.device,
            generator=_generator(logits.device, seed),
        )
        noisy = logits.double().exp() / (-torch.log(noise)) ** spec.temperature
        token_ids = noisy.argmax(dim=-1)
    else:
        token_ids = logits.argmax(dim=-1)
    if spec.policy == "random":
        rand = torch.rand(
            logits.shape[0],
            dtype=torch.float32,
            device=logits.device,
            generator=_generator(logits.device, seed ^ 0x5EED),
        )
        return token_ids, rand.double()
    dtype = _SOFTMAX_DTYPES.get(spec.softmax_dtype, "bad")
    if dtype == "bad":
        raise ValueError(f"softmax_dtype must be 'logits' or 'float64', got {spec.softmax_dtype!r}")
    probs = torch.softmax(logits if dtype is None else logits.to(dtype), dim=-1)
    return token_ids, _confidence(probs, token_ids, spec.policy).double()


SampleFn = Callable[[torch.Tensor, SampleSpec, int, int], tuple[torch.Tensor, torch.Tensor]]
