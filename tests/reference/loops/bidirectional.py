"""Reference loops over a fully bidirectional model: ML-GSAI LLaDA (§1), Dream ``_sample`` (§3) and
Fast-dLLM for LLaDA (§2, no cache / prefix cache / dual cache). Conventions: the package docstring."""

from __future__ import annotations

import torch

from .common import _as_tensor, argmax_and_prob, sched, topk_positions

# ---------------------------------------------------------------------------------- §1 ML-GSAI LLaDA


@torch.no_grad()
def llada_generate(
    model,
    prompt: list[int],
    steps: int,
    gen_length: int,
    block_length: int,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """ML-GSAI LLaDA ``generate`` at temperature 0 (§1).

    Choices: the forward count is one per model call, so CFG (one 2x batch call officially) counts 2 per
    step; LLaDA's hard-coded eos/eot -inf options (§1.7) are NOT applied; softmax in the logits' dtype
    (float32 here, §1.8); ``random`` remasking draws U(0,1) float32 from ``generator``.
    """
    mask_id = model.mask_token_id
    P = len(prompt)
    # §1.1 x = [prompt | gen masks]
    x = _as_tensor(list(prompt) + [mask_id] * gen_length)
    # §1.2 prompt_index computed once (a mask id inside the prompt is not part of it)
    prompt_index = x != mask_id
    # §1.1 asserts; s = steps / num_blocks steps per block
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    s = steps // num_blocks
    nfe = 0
    for b in range(num_blocks):
        block_end = P + (b + 1) * block_length
        # §1.3 schedule from the block's actual mask count, at the start of the block
        block_masks = int((x[P + b * block_length : block_end] == mask_id).sum())
        per_step = sched(block_masks, s)
        # §1.3 exactly s steps per block, one forward each, no early exit
        for i in range(s):
            # §1.4 mask_index over the whole sequence; bidirectional forward over the full sequence
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                # §1.5 unconditional copy: prompt_index positions set to mask
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond = model.logits(x)
                uncond = model.logits(un_x)
                nfe += 2
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model.logits(x)
                nfe += 1
            # §1.6 T=0: x0 = argmax(logits), first index on ties
            x0 = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                # §1.8 conf = softmax(logits)[x0] in the logits' own dtype
                p = torch.softmax(logits, dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, generator=generator, dtype=torch.float32)
            else:
                raise NotImplementedError(remasking)
            # §1.9 -inf at positions >= P + (k+1)B and at non-mask positions
            x0_p[block_end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype))
            # §1.10 commit topk(conf, sched[step]) (deterministic tie rule)
            for j in topk_positions(confidence, per_step[i]):
                x[j] = x0[j]
    return x[P:].tolist(), nfe


# ------------------------------------------------------------------------------------ §3 Dream _sample


def dream_num_transfer(num_masks: int, i: int, steps: int, eps: float = 1e-3) -> int:
    """§3 _sample rule 2: k = int(n * (1 - ts[i+1]/ts[i])) in float32 for i < S-1, else int(n)."""
    ts = torch.linspace(1, eps, steps + 1)  # §3 rule 5, float32
    n = torch.tensor(num_masks) / 1  # (#masks)/batch as float32 (true division of an int64 tensor)
    if i < steps - 1:
        return int(n * (1 - ts[i + 1] / ts[i]))
    return int(n)


@torch.no_grad()
def dream_generate(
    model,
    prompt: list[int],
    steps: int,
    gen_length: int,
    alg: str = "maskgit_plus",
    shift_logits: bool = False,
    eps: float = 1e-3,
) -> tuple[list[int], int]:
    """Dream ``diffusion_generate`` -> ``_sample`` (§3) on the whole row, greedy, alg_temp None.

    ``shift_logits`` implements §3 common rule 3 (position j uses logits of j-1, position 0 keeps its own);
    it is off by default because the shift is a property of the model, not of the loop.
    """
    if alg not in ("maskgit_plus", "topk_margin", "entropy"):
        raise ValueError(alg)
    mask_id = model.mask_token_id
    P = len(prompt)
    # §3.1 x = prompt right-padded with masks to P + max_new_tokens
    x = _as_tensor(list(prompt) + [mask_id] * gen_length)
    # §3.5 ts = linspace(1, eps, S+1) float32
    ts = torch.linspace(1, eps, steps + 1)
    nfe = 0
    # §3 _sample 1: exactly `steps` iterations, one full forward each, no early exit
    for i in range(steps):
        mask_index = x == mask_id
        logits = model.logits(x)  # §3.2 no padding -> "full" bidirectional attention
        nfe += 1
        if shift_logits:  # §3.3
            logits = torch.cat([logits[:1], logits[:-1]], dim=0)
        mask_logits = logits[mask_index]
        # §3.4 T=0: no scaling, no top_p/top_k; probs = softmax in the logits' dtype; x0 = argmax of probs
        probs = torch.softmax(mask_logits, dim=-1)
        x0 = torch.argmax(probs, dim=-1)
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)  # maskgit_plus: max prob
        if alg == "topk_margin":  # top1 - top2
            sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
            confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
        elif alg == "entropy":  # negative entropy: sum p * log(p + 1e-10)
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        # §3 _sample 2: n = #masks / batch (float32); k = int(n (1 - ts[i+1]/ts[i])) or int(n) at the end
        num_mask_token = mask_index.sum() / 1
        t, s = ts[i], ts[i + 1]
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        # §3 _sample 4: full_conf = -inf except at masks; commit topk(k) over the whole row
        full_confidence = torch.full(x.shape, float("-inf"), dtype=logits.dtype)
        full_confidence[mask_index] = confidence.to(logits.dtype)
        if k > 0:
            x_ = torch.full_like(x, mask_id)
            x_[mask_index] = x0
            for j in topk_positions(full_confidence, k):
                x[j] = x_[j]
    return x[P:].tolist(), nfe


# ------------------------------------------------------------------------------------ §2 Fast-dLLM


def _fast_dllm_transfer(
    window: torch.Tensor,
    logits: torch.Tensor,
    mask_index: torch.Tensor,
    k: int | None,
    threshold: float | None,
) -> None:
    """§2 get_transfer_index at T=0, writing the committed tokens into ``window`` in place."""
    # x0 = argmax(logits); p = softmax(logits.float64); conf = p[x0], -inf outside mask_index
    x0, x0_p = argmax_and_prob(logits, torch.float64)
    x0 = torch.where(mask_index, x0, window)
    confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
    if threshold is None:
        selected = topk_positions(confidence, k)  # commit topk(conf, k)
    else:
        # k_all = #masked; order = topk(conf, k_all); rank 0 ALWAYS committed; any other rank is dropped
        # if conf < threshold (so conf >= threshold is kept). No cap, no schedule.
        order = topk_positions(confidence, int(mask_index.sum()))
        selected = order[:1] + [j for j in order[1:] if confidence[j].item() >= threshold]
    for j in selected:
        window[j] = x0[j]


@torch.no_grad()
def fast_dllm_generate(
    model,
    prompt: list[int],
    steps: int,
    gen_length: int,
    block_length: int,
    threshold: float | None = None,
    cache: str = "none",
    max_steps_per_block: int = 100_000,
) -> tuple[list[int], int]:
    """Fast-dLLM LLaDA ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (§2).

    The model attends fully bidirectionally (§2 Model). Caches are post-RoPE here; the official pre-RoPE
    cache roped at absolute key positions 0..Lk-1 with queries at their absolute positions is the same
    math. Dual cache: the official model writes the fresh block K/V in place into the full-length cache;
    here the past is [prefix | stale suffix] and the fresh block keys are appended after it, which is the
    same attention (all keys visible, softmax is order-independent). ``max_steps_per_block`` is only a
    guard against a model that keeps predicting the mask id in threshold mode (officially unbounded).
    """
    if cache not in ("none", "prefix", "dual"):
        raise ValueError(cache)
    mask_id = model.mask_token_id
    P = len(prompt)
    x = _as_tensor(list(prompt) + [mask_id] * gen_length)
    L = x.shape[0]
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    s = steps // num_blocks
    nfe = 0

    def k_for(per_step: list[int], i: int) -> int | None:
        if threshold is not None:
            return None  # threshold mode: no schedule
        if i >= len(per_step):
            # the official code indexes num_transfer_tokens[:, i] out of range here
            raise IndexError(f"Fast-dLLM schedule index {i} out of range for {len(per_step)} steps")
        return per_step[i]

    for b in range(num_blocks):
        bs = P + b * block_length
        be = bs + block_length
        # §2 generate 1: per block sched(#masks, s)
        per_step = sched(int((x[bs:be] == mask_id).sum()), s)

        if cache == "none":
            i = 0
            while True:
                # forward full x; clear mask_index after block end; commit sched[i] (or threshold rule)
                nfe += 1
                mask_index = x == mask_id
                logits = model.logits(x)
                mask_index[be:] = False
                _fast_dllm_transfer(x, logits, mask_index, k_for(per_step, i), threshold)
                i += 1
                # break once the block has no masks (so NFE/block = min(s, #masks) without threshold)
                if int((x[bs:be] == mask_id).sum()) == 0:
                    break
                if i > max_steps_per_block:
                    raise RuntimeError("no progress (model keeps predicting the mask id?)")
            continue

        # prefix / dual, step 0: one full forward on the whole x with use_cache (nfe + 1)
        positions = torch.arange(L)
        logits, kv = model.forward(x, positions, torch.ones(L, L, dtype=torch.bool))
        mask_index = x == mask_id
        mask_index[be:] = False
        _fast_dllm_transfer(x, logits, mask_index, k_for(per_step, 0), threshold)
        nfe += 1
        if cache == "prefix":
            # K/V cut to positions < block_start (the prefix as it attended at block start)
            past = [(k[:bs], v[:bs]) for k, v in kv]
        else:
            # dual: keep all L positions; the block rows are replaced by fresh K/V at every later call
            past = [(torch.cat((k[:bs], k[be:])), torch.cat((v[:bs], v[be:]))) for k, v in kv]
        i = 1
        while True:
            # the loop always runs >= 1 forward (a block finished at step 0 still costs an empty forward)
            nfe += 1
            if cache == "prefix":
                # input x[block_start:] = current block + ALL future blocks; keys = prefix + fresh K/V
                window = x[bs:]
                q_pos = torch.arange(bs, L)
                n_keys = bs + window.shape[0]
                logits, _ = model.forward(
                    window, q_pos, torch.ones(window.shape[0], n_keys, dtype=torch.bool), past
                )
                mask_index = window == mask_id
                mask_index[block_length:] = False  # transfers only in the first B positions
            else:
                # input = the block only, at RoPE positions bs..be-1; attends over all L keys
                window = x[bs:be]
                q_pos = torch.arange(bs, be)
                logits, _ = model.forward(window, q_pos, torch.ones(block_length, L, dtype=torch.bool), past)
                mask_index = window == mask_id
            # the new cache is discarded (the prefix/stale suffix stay as computed at block start)
            _fast_dllm_transfer(window, logits, mask_index, k_for(per_step, i), threshold)  # writes into x
            if int((x[bs:be] == mask_id).sum()) == 0:
                break
            i += 1
            if i > max_steps_per_block:
                raise RuntimeError("no progress (model keeps predicting the mask id?)")
    return x[P:].tolist(), nfe
