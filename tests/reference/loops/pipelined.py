"""Reference loops that decode several blocks at once: D2F pipelined decoding and Diffulex MultiBD (the
same rules on absolute blocks). Conventions: the package docstring."""

from __future__ import annotations

import torch

from ..plain_models import block_causal_mask
from .common import _as_tensor, argmax_and_prob, block_causal_mask_abs, topk_positions

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
