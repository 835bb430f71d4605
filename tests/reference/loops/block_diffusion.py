"""Reference loops of block diffusion (one block at a time under a block-causal mask): SDAR (§4),
LLaDA2-MoE (§5) and Fast-dLLM v2 (blocks, sub-blocks, block cache). Conventions: the package docstring."""

from __future__ import annotations

import torch

from .common import _as_tensor, argmax_and_prob, block_causal_mask_abs, sched, topk_positions

# ----------------------------------------------------------------------------------------- §4 SDAR


@torch.no_grad()
def sdar_generate(
    model,
    prompt: list[int],
    gen_length: int,
    block_length: int,
    denoising_steps: int,
    remasking: str = "low_confidence_dynamic",
    threshold: float = 0.9,
    clip_to_masks: bool = True,
    stop_token_ids: list[int] | None = None,
) -> tuple[list[int], int]:
    """SDAR ``block_diffusion_generate`` (§4), greedy.

    Greedy = token argmax(logits), confidence = its softmax probability (float32), no division by T
    (the official sampler always uses multinomial, see Cross-cutting). ``clip_to_masks`` (default True,
    the engine's sane behaviour) clips the per-step count k to the block's remaining masks; False keeps
    §4.7 (topk may pick -inf positions and overwrite prompt/decoded tokens of the block with x0).
    ``stop_token_ids``: §4.8 early stop after a block (None = never); undecoded later blocks then stay
    mask ids in the returned list. Returns x[P : P+gen_length] (the block-rounded tail is cut).
    """
    if remasking not in ("low_confidence_static", "low_confidence_dynamic", "sequential"):
        raise ValueError(remasking)
    mask_id = model.mask_token_id
    P, B = len(prompt), block_length
    # §4.1 nb = ceil((P+gen)/B); Ltot = nb*B; block-causal mask; position_ids = arange
    num_blocks = (P + gen_length + B - 1) // B
    total = num_blocks * B
    x = torch.full((total,), mask_id, dtype=torch.long)
    x[:P] = _as_tensor(prompt)
    full_mask = block_causal_mask_abs(total, B)
    nfe = 0
    cache = None
    # §4.2 prefill of the full prompt blocks with the block-causal mask (one store forward)
    prefill_blocks = P // B
    prefill_len = prefill_blocks * B
    if prefill_len > 0:
        _, cache = model.forward(
            x[:prefill_len], torch.arange(prefill_len), full_mask[:prefill_len, :prefill_len]
        )
        nfe += 1
    # §4.3 schedule sched(B, denoising_steps), from B (not from the actual masks)
    per_step = sched(B, denoising_steps)
    for nb in range(prefill_blocks, num_blocks):
        start, end = nb * B, (nb + 1) * B
        cur = x[start:end].clone()
        cur_mask = full_mask[start:end, :end]  # keys = cache (< start) + the block, all visible
        positions = torch.arange(start, end)
        # §4.4 for step in 0..steps (steps + 1 iterations)
        for step in range(denoising_steps + 1):
            mask_index = cur == mask_id
            if int(mask_index.sum()) == 0:
                # store forward: appends the block's final post-RoPE K/V to the cache, then break
                _, cache = model.forward(cur, positions, cur_mask, cache)
                nfe += 1
                break
            # denoising forward, K/V not stored
            logits, _ = model.forward(cur, positions, cur_mask, cache)
            nfe += 1
            # greedy sampler: x0 = argmax, x0_p = softmax(logits)[x0] (float32)
            x0, x0_p = argmax_and_prob(logits, torch.float32)
            if step >= len(per_step):
                raise IndexError("SDAR schedule index out of range (official IndexError)")
            n = per_step[step]
            if clip_to_masks:  # engine behaviour: never more than the remaining masks
                n = min(n, int(mask_index.sum()))
            transfer = torch.zeros(B, dtype=torch.bool)
            if remasking == "sequential":
                # §4.6 commit [first_mask, first_mask + n), clipped to the block
                first = int(mask_index.nonzero()[0, 0])
                transfer[first : first + n] = True
            else:
                # conf = -inf at non-masks
                confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
                if remasking == "low_confidence_static":
                    transfer[topk_positions(confidence, n)] = True  # §4.6 static: topk(conf, n)
                else:
                    # §4.6 dynamic: H = {conf > thr} (strict); if |H| >= n commit H, else topk(conf, n)
                    high = confidence > threshold
                    if int(high.sum()) >= n:
                        transfer = high
                    else:
                        transfer[topk_positions(confidence, n)] = True
            cur[transfer] = x0[transfer]
        x[start:end] = cur
        # §4.8 stop id anywhere in x[P:] -> break
        if stop_token_ids is not None and any(int(t) in set(stop_token_ids) for t in x[P:].tolist()):
            break
    return x[P : P + gen_length].tolist(), nfe


# ------------------------------------------------------------------------------------ §5 LLaDA2-MoE


@torch.no_grad()
def llada2_generate(
    model,
    prompt: list[int],
    gen_length: int,
    block_length: int,
    steps: int,
    threshold: float,
    minimal_topk: int = 1,
) -> tuple[list[int], int]:
    """LLaDA2-MoE ``generate`` (dllm d8cc1190, §5), greedy, rules 1-4.

    Greedy = token argmax(logits), confidence = its softmax probability (float32) instead of the official
    ``multinomial`` (Cross-cutting). ``model`` is anything with ``logits(ids, attn_mask)``; the Bool
    block-causal mask stands for the official additive 0/-inf mask. The eos rules (§5.5-7) are NOT
    modelled: the output is x[P : P+gen_length] (ignore_eos semantics).
    """
    mask_id = model.mask_token_id
    P, B = len(prompt), block_length
    # §5.1 steps = min(steps, gen // minimal_topk), per block; nb = ceil((P+gen)/B); Ltot = nb*B
    steps = min(steps, gen_length // minimal_topk)
    num_blocks = (P + gen_length + B - 1) // B
    total = num_blocks * B
    x = torch.full((total,), mask_id, dtype=torch.long)
    x[:P] = _as_tensor(prompt)
    full_mask = block_causal_mask_abs(total, B)
    # §5.4 schedule sched(B, steps), from B
    per_step = sched(B, steps)
    nfe = 0
    # §5.2 blocks floor(P/B) .. nb-1, no prefill, no cache
    for k in range(P // B, num_blocks):
        start, end = k * B, (k + 1) * B
        # §5.3 for step in range(steps)
        for step in range(steps):
            mask_index = x[start:end] == mask_id
            if int(mask_index.sum()) == 0:
                break  # block done: no forward
            # §5.2 window x[:(k+1)B] recomputed under the block-causal mask; the last B logits are used
            logits = model.logits(x[:end], full_mask[:end, :end])[start:end]
            nfe += 1
            x0, x0_p = argmax_and_prob(logits, torch.float32)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
            # §5.4 n = sched[step]; H = {masks with conf > thr} (strict). |H| >= n: commit H (may exceed n,
            # or be empty when n = 0); else topk(conf, min(n, #masks)) (tie rule: package docstring)
            n = per_step[step]
            transfer = torch.zeros(B, dtype=torch.bool)
            high = (confidence > threshold) & mask_index
            if int(high.sum()) >= n:
                transfer = high
            else:
                transfer[topk_positions(confidence, min(n, int(mask_index.sum())))] = True
            cur = x[start:end]
            cur[transfer] = x0[transfer]
    return x[P : P + gen_length].tolist(), nfe


# ------------------------------------------------------------------------------------ Fast-dLLM v2


def _shift_rows(logits: torch.Tensor) -> torch.Tensor:
    """Token shift inside the forwarded window: row j takes the logits of row j-1; row 0 keeps its own."""
    return torch.cat((logits[:1], logits[:-1]), dim=0)


def _first_stop_is_final(x: list[int], start: int, stop_token: int | None, mask_id: int) -> bool:
    """``generate``'s stop rule: a stop token in x[start:] with no mask between ``start`` and it."""
    if stop_token is None or stop_token not in x[start:]:
        return False
    first = x.index(stop_token, start)
    return mask_id not in x[start:first]


def _block_cache_past(cache, block_kv, lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys/values a sub-block call sees besides its own: the stored blocks, then the
    block cache without the sub-block's range ``[lo, hi)`` (block-relative)."""
    past = []
    for layer, (block_k, block_v) in enumerate(block_kv):
        keys, values = [block_k[:lo], block_k[hi:]], [block_v[:lo], block_v[hi:]]
        if cache is not None:
            keys.insert(0, cache[layer][0])
            values.insert(0, cache[layer][1])
        past.append((torch.cat(keys), torch.cat(values)))
    return past


@torch.no_grad()
def fast_dllm_v2_generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    block_size: int = 32,
    small_block_size: int = 8,
    threshold: float = 0.9,
    use_block_cache: bool = False,
    stop_token: int | None = None,
) -> tuple[list[int], int]:
    """Fast-dLLM v2 ``batch_sample`` (NVlabs/Fast-dLLM v2/generation_functions.py) and the checkpoint's
    ``generate``, batch 1, temperature 0 (rules: docs/strategies.md, section ``fast_dllm_v2``).

    Returns (every token after the prompt, model calls). Without ``stop_token`` the loop runs its
    ``max_new_tokens // block_size`` blocks and the final store forward's next token: nb·B + 1 − P % B
    tokens. With it, ``generate``'s rule: stop (before the next forward) once a stop token is decoded
    with no mask before it in the current block; tokens after that stay as they are (masks included).

    Choices: a prompt of exactly one block is prefilled like any P >= B (the official ``P > B`` test
    drops such a prompt altogether); the tie rule of the package docstring. The block cache is kept per
    layer as the block's K/V; a sub-block call attends to [stored blocks | the block's K/V outside the
    sub-block | its own fresh K/V] — the official in-place write of the fresh sub-block K/V into the
    block cache is always overwritten again before it is read, so only this set of keys matters.
    """
    mask_id = model.mask_token_id
    B, S = block_size, small_block_size
    if B % S != 0:
        raise ValueError("small_block_size must divide block_size")
    P = len(prompt)
    x = list(prompt)
    nfe = 0
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    cache_len = 0
    if P >= B:  # prefill the full prompt blocks, block-causal, K/V kept
        n = P // B * B
        logits, cache = model.forward(_as_tensor(x[:n]), torch.arange(n), block_causal_mask_abs(n, B))
        nfe += 1
        cache_len = n
        if P % B == 0:  # the next token from the last row (raw row n-1 predicts position n)
            x.append(int(torch.argmax(logits[-1])))

    def block_forward(ids: list[int], start: int, past) -> tuple[torch.Tensor, list]:
        """ids at positions start.. over ``past``: every key visible (the current block sees all)."""
        past_len = 0 if past is None else past[0][0].shape[0]
        visible = torch.ones(len(ids), past_len + len(ids), dtype=torch.bool)
        return model.forward(_as_tensor(ids), torch.arange(start, start + len(ids)), visible, past)

    for _ in range(max_new_tokens // B):
        if stop_token is not None and stop_token in x[P:]:
            break
        block_input_len = len(x)  # ``prompt_length`` of generate's stop rule
        x += [mask_id] * (B - len(x) % B)
        bs, be = len(x) - B, len(x)
        assert bs == cache_len
        block_kv = None  # the block cache (use_block_cache), recomputed by full block calls
        block_calls = 0
        while True:
            if _first_stop_is_final(x, block_input_len, stop_token, mask_id):
                break
            if mask_id not in x[bs:be]:  # store forward: K/V appended, next token from the last row
                logits, cache = block_forward(x[bs:be], bs, cache)
                nfe += 1
                cache_len = be
                x.append(int(torch.argmax(logits[-1])))
                break
            for k in range(B // S):
                ss, se = bs + k * S, bs + (k + 1) * S
                while True:
                    in_sub = torch.tensor([t == mask_id for t in x[ss:se]])
                    if not bool(in_sub.any()):
                        break
                    if _first_stop_is_final(x, block_input_len, stop_token, mask_id):
                        break
                    if use_block_cache and (block_kv is None or x[ss] == mask_id):
                        logits, kv = block_forward(x[bs:be], bs, cache)
                        block_kv = [(k_[cache_len:], v_[cache_len:]) for k_, v_ in kv]
                        logits = _shift_rows(logits)[ss - bs : se - bs]
                    elif use_block_cache:
                        past = _block_cache_past(cache, block_kv, ss - bs, se - bs)
                        logits, _ = block_forward(x[ss:se], ss, past)
                        logits = _shift_rows(logits)
                    else:
                        logits, _ = block_forward(x[bs:be], bs, cache)
                        logits = _shift_rows(logits)[ss - bs : se - bs]
                    nfe += 1
                    block_calls += 1
                    if block_calls > B * B:  # the official loop would spin forever
                        raise RuntimeError("no progress (model keeps predicting the mask id?)")
                    # sample_with_top_p at T=0: p = softmax(logits) in the logits' dtype, x1 = argmax(p)
                    probs = torch.softmax(logits, dim=-1)
                    x1 = torch.argmax(probs, dim=-1)
                    conf = torch.gather(probs, -1, x1.unsqueeze(-1)).squeeze(-1)
                    conf = torch.where(in_sub, conf, torch.tensor(float("-inf")))
                    unmask = conf > threshold  # strictly above
                    unmask[int(torch.argmax(conf))] = True  # and always the most probable one
                    unmask &= in_sub
                    for j in unmask.nonzero().flatten().tolist():
                        x[ss + j] = int(x1[j])
    return x[P:], nfe
