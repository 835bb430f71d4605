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
"""

from __future__ import annotations

import torch

from .plain_models import block_causal_mask

# --------------------------------------------------------------------------------------------- helpers


def sched(n: int, s: int) -> list[int]:
    """ALGORITHMS.md notation: s entries equal to n // s, +1 added to the FIRST n % s entries."""
    base, rem = divmod(int(n), int(s))
    return [base + 1 if i < rem else base for i in range(s)]


def ranked_positions(conf: torch.Tensor) -> list[int]:
    """All positions of a 1-D confidence tensor, best first: higher conf first, then lower position."""
    values = conf.tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def topk_positions(conf: torch.Tensor, k: int) -> list[int]:
    """Deterministic torch.topk(conf, k).indices (tie rule: see module docstring)."""
    return ranked_positions(conf)[: int(k)]


def argmax_and_prob(logits: torch.Tensor, softmax_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = argmax(logits) (first index on ties); p = softmax(logits in softmax_dtype)[x0]."""
    x0 = torch.argmax(logits, dim=-1)
    p = torch.softmax(logits.to(softmax_dtype), dim=-1)
    return x0, torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


def _as_tensor(tokens) -> torch.Tensor:
    return torch.as_tensor(list(tokens), dtype=torch.long)


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


def block_causal_mask_abs(length: int, block_size: int) -> torch.Tensor:
    """Block-causal mask over absolute blocks (block id = position // block_size)."""
    return block_causal_mask(torch.arange(length) // block_size)


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
            # or be empty when n = 0); else topk(conf, min(n, #masks)) (tie rule: module docstring)
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


# ------------------------------------------------------------------------------------ D2F pipelined


@torch.no_grad()
def d2f_generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    block_size: int,
    block_add_threshold: float,
    decoded_token_threshold: float,
    skip_threshold: float,
    stop_adding_after_eos: bool = True,
    eos_token_id: int | None = None,
    max_steps: int = 10_000,
) -> tuple[list[int], int]:
    """D2F pipelined decoding (D2F-eval/eval_llada.py ``_generate_block_single``; REFERENCE.md), greedy.

    Without a KV cache: every step is ONE full forward over prompt + all added blocks under the D2F mask
    (prompt = block 0 sees itself bidirectionally; generated block k sees block 0, blocks < k and itself).
    The official block-causal cache is exact, so this is the same computation. Choices: EOS detection uses
    ``eos_token_id`` (official: hard-coded 126081) and only when ``stop_adding_after_eos`` (official:
    always); "decoded fraction" uses the official per-block ``mask_count`` counter (decremented by the
    number of commits); confidence = max softmax probability ("default" sampling_strategy), float32.
    """
    mask_id = model.mask_token_id
    P = len(prompt)
    assert P > 0, "D2F needs a non-empty prompt (block 0)"
    tokens = list(prompt)
    # block states: block 0 = prompt (own length, counted as decoded, complete, never active)
    blocks = [{"start": 0, "end": P, "total": P, "mask_count": 0, "active": False, "complete": True}]
    max_blocks = max_new_tokens // block_size
    eos_detected = False
    nfe = 0

    def fraction(blk) -> float:
        return (blk["total"] - blk["mask_count"]) / blk["total"]

    for _step in range(max_steps):  # official safety check: stop after 10000 steps
        # add at most one block before the forward: fewer than max_new_tokens // block_size generated blocks,
        # no EOS committed, and the newest block's decoded fraction >= block_add_threshold
        if len(blocks) - 1 < max_blocks and not eos_detected:
            if fraction(blocks[-1]) >= block_add_threshold:
                start = len(tokens)
                tokens += [mask_id] * block_size
                blocks.append(
                    {
                        "start": start,
                        "end": start + block_size,
                        "total": block_size,
                        "mask_count": block_size,
                        "active": True,
                        "complete": False,
                    }
                )
        # "complete" flags: block b+1 becomes complete once block b's fraction >= decoded_token_threshold;
        # never reset; block 1 is complete at once (the prompt's fraction is 1)
        for b in range(len(blocks) - 1):
            if fraction(blocks[b]) >= decoded_token_threshold:
                blocks[b + 1]["complete"] = True
        # end: no active block left, i.e. every added block is decoded (a block stays active until it and
        # all earlier blocks are decoded) and none could be added above
        if not any(blk["active"] for blk in blocks):
            break
        # one full forward with the D2F block mask
        block_ids = torch.zeros(len(tokens), dtype=torch.long)
        for b, blk in enumerate(blocks):
            block_ids[blk["start"] : blk["end"]] = b
        x = _as_tensor(tokens)
        logits = model.logits(x, block_causal_mask(block_ids))
        nfe += 1
        finished: list[int] = []
        for b, blk in enumerate(blocks):
            if not blk["active"]:
                continue
            rel = [p for p in range(blk["start"], blk["end"]) if tokens[p] == mask_id]
            if not rel:
                finished.append(b)
                continue
            probs = torch.softmax(logits[rel], dim=-1)
            x0 = torch.argmax(probs, dim=-1)
            conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
            # commit every masked position with conf strictly > skip_threshold
            chosen = [i for i in range(len(rel)) if conf[i].item() > skip_threshold]
            if blk["complete"] and not chosen:
                # complete block with none passing: its single most confident position (lowest on ties)
                chosen = topk_positions(conf, 1)
            # (an incomplete block with none passing commits nothing)
            for i in chosen:
                tokens[rel[i]] = int(x0[i])
            blk["mask_count"] -= len(chosen)
            if stop_adding_after_eos and eos_token_id is not None:
                if any(int(x0[i]) == eos_token_id for i in chosen):
                    eos_detected = True
            if all(tokens[p] != mask_id for p in range(blk["start"], blk["end"])):
                finished.append(b)
        # deactivate finished blocks in order, only when every earlier block is no longer active
        for b in finished:
            if blocks[b]["active"] and not any(blocks[e]["active"] for e in range(b)):
                blocks[b]["active"] = False
    return tokens[P:], nfe


# ------------------------------------------------------------------------------------ MultiBD


@torch.no_grad()
def multi_bd_generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    block_size: int,
    buffer_size: int,
    block_add_threshold: float,
    decoded_token_threshold: float,
    threshold: float,
    eos_token_id: int | None = None,
    stop_adding_after_eos: bool = True,
    max_steps: int = 100_000,
) -> tuple[list[int], int]:
    """Diffulex MultiBD: the D2F pipelined rules on ABSOLUTE blocks (block id = position // block_size).

    * The prompt's full blocks are context (block-causal among themselves). A partial last prompt block
      is the first running block (prompt tokens fixed and counted as decoded).
    * A block counts toward ``buffer_size`` until its K/V are stored: that happens in the first forward
      after it and all earlier blocks are fully decoded (the Block Buffer keeps a complete block for that
      one forward, so every step has the same shape). When every buffered block is decoded but more can
      still be added, that forward only stores (no block fits before it).
    * Before each forward, at most one block is added: buffer has room, newest block's decoded fraction
      >= block_add_threshold, current length < ceil((P + max_new_tokens) / B) * B, and (if
      stop_adding_after_eos) no EOS committed yet.
    * Fully active: the first running block at once; another once its predecessor's decoded fraction
      >= decoded_token_threshold (sticky). Commit masked positions with conf strictly > threshold; a fully
      active block with none passing commits its single most confident position (lowest on ties).
    * Each step is one full forward (block-causal over absolute blocks) over everything; the loop ends when
      all blocks are decoded and none can be added. Output = tokens after the prompt, cut to max_new_tokens.

    Choices: decoded fraction = (#positions of the block whose token != mask id) / B; confidence = softmax
    probability of argmax(logits) in float32; EOS = a committed token equal to ``eos_token_id``.
    """
    mask_id = model.mask_token_id
    P, B = len(prompt), block_size
    end_len = -(-(P + max_new_tokens) // B) * B  # block-rounded end of prompt + max_new_tokens
    tokens = list(prompt)
    first_running = P // B  # first non-context block (the partial prompt block, or the first added one)
    if P % B:
        tokens += [mask_id] * (B - P % B)  # the partial prompt block is running from the start
    fully_active: dict[int, bool] = {}
    eos_committed = False
    nfe = 0

    def n_blocks() -> int:
        return len(tokens) // B

    def fraction(b: int) -> float:
        return sum(1 for t in tokens[b * B : (b + 1) * B] if t != mask_id) / B

    cached_upto = first_running  # blocks below this index have their K/V stored

    def leading_decoded_end() -> int:
        # end (block index) of the run of fully decoded blocks starting at cached_upto
        b = cached_upto
        while b < n_blocks() and fraction(b) == 1.0:
            b += 1
        return b

    for _step in range(max_steps):
        # add (before the forward)
        newest_fraction = fraction(n_blocks() - 1) if n_blocks() > 0 else 1.0
        can_add = len(tokens) < end_len and not (stop_adding_after_eos and eos_committed)
        if n_blocks() - cached_upto < buffer_size and newest_fraction >= block_add_threshold and can_add:
            tokens += [mask_id] * B
        # fully-active flags (sticky)
        for b in range(first_running, n_blocks()):
            if b == first_running or fraction(b - 1) >= decoded_token_threshold:
                fully_active[b] = True
        # end: every running block decoded and nothing more can ever be added
        if all(t != mask_id for t in tokens[first_running * B :]) and not can_add:
            break
        store_upto = leading_decoded_end()  # stored by this forward
        logits = model.logits(_as_tensor(tokens), block_causal_mask_abs(len(tokens), B))
        nfe += 1
        cached_upto = store_upto
        for b in range(first_running, n_blocks()):
            rel = [p for p in range(b * B, (b + 1) * B) if tokens[p] == mask_id]
            if not rel:
                continue
            x0, conf = argmax_and_prob(logits[rel], torch.float32)
            chosen = [i for i in range(len(rel)) if conf[i].item() > threshold]  # strictly >
            if not chosen and fully_active.get(b, False):
                chosen = topk_positions(conf, 1)
            for i in chosen:
                tokens[rel[i]] = int(x0[i])
                if eos_token_id is not None and int(x0[i]) == eos_token_id:
                    eos_committed = True
    else:
        raise RuntimeError("multi_bd_generate: no termination within max_steps")
    return tokens[P : P + max_new_tokens], nfe


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
    drops such a prompt altogether); the tie rule of the module docstring. The block cache is kept per
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
