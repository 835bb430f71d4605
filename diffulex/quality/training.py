"""Training data layout and the two diffusion objectives of the bundled tiny models.

Every training row is ``[chat prompt | answer, end-of-turn, <|endoftext|> ...]`` at positions 0, 1, ...
(as the engine lays out ``prompt + generation region``); only response positions are ever masked. Each
batch gets one generation length drawn from ``GEN_LENGTHS`` (the evaluation uses 16, ``diffulex
generate`` 64 by default; ``choose_gen_length``), so it is only as long as the longest prompt plus that
length; positions past a row's region are padding no query attends to.

* LLaDA (masked diffusion SFT, bidirectional): t ~ U(0, 1) per row, each response token masked with
  probability ``p = (1 - eps) t + eps``, cross-entropy on masked tokens weighted ``1 / p``, divided by
  the number of response tokens. At inference ``vanilla`` forwards ``prompt + region`` bidirectionally:
  the same view, partially masked.
* SDAR (block diffusion): blocks are absolute (``position // block_size``), as in ``block_diffusion``;
  the region ends at the block boundary after ``prompt + gen``; a prompt that ends mid-block shares its
  last block with the first response tokens, which are masked while the prompt tokens stay. Two streams
  are concatenated, ``[x_t ; x_0]`` at the same positions: a noisy token sees the noisy tokens of its own
  block and the clean tokens of earlier blocks; a clean token sees clean tokens of its block and earlier
  ones (block-causal). That is exactly the engine's view while it denoises a block over the K/V of the
  clean, block-causally computed blocks before it. t is drawn per block; loss as for LLaDA.
* Optionally (``TrainOptions.d2f_fraction``), a share of LLaDA's batches uses D2F's pipelined layout
  (``d2f_batch``), so that the same model also serves ``d2f``/``multi_bd``'s block-causal attention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffulex.quality.checkpoint import (
    END_OF_TEXT,
    END_OF_TURN,
    SDAR_BLOCK_SIZE,
    encode_prompts,
)
from diffulex.quality.tasks import Example

GEN_LENGTHS = (16, 32, 64)
GEN_WEIGHTS = (0.6, 0.25, 0.15)
MASK_EPS = 1e-3
D2F_BLOCK_SIZE = 4  # the block size ``d2f``/``multi_bd`` are evaluated with


@dataclass
class TokenizedRows:
    """Training rows as one tensor: ``sequences [N, max_len]`` (prompt, answer, end-of-turn, then
    ``<|endoftext|>`` to the end of the row) and ``prompt_lens [N]``."""

    sequences: torch.Tensor
    prompt_lens: torch.Tensor
    mask_token_id: int
    max_prompt_len: int

    @property
    def device(self) -> torch.device:
        return self.sequences.device

    def to(self, device: torch.device) -> TokenizedRows:
        return TokenizedRows(
            self.sequences.to(device), self.prompt_lens.to(device), self.mask_token_id, self.max_prompt_len
        )


@dataclass
class Batch:
    """One training batch: model inputs, and the targets/masks/weights of the first ``logits_rows``."""

    input_ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, L]
    visible: torch.Tensor  # [B, L, L] bool
    targets: torch.Tensor  # [B, R]
    masked: torch.Tensor  # [B, R] bool: the loss positions
    weights: torch.Tensor  # [B, R] float: 1 / p_mask
    num_response_tokens: torch.Tensor  # scalar: the loss normaliser
    logits_rows: int
    valid: torch.Tensor  # [B, R] bool: positions inside prompt + region (the rest is padding)


def tokenize_rows(
    examples: list[Example], tokenizer: Any, family: str, mask_token_id: int, seed: int
) -> TokenizedRows:
    """Tokenize training rows; a multi-answer row trains one of its valid answers (seeded choice).

    Each distinct prompt and answer is tokenized once (a large suite repeats them: 10^6 rows hold far
    fewer distinct strings, and the tokenizer's per-string cost set the pace), and the rows are filled
    in one NumPy array."""
    rng = random.Random(f"{seed}:targets")
    targets = [example.answers[rng.randrange(len(example.answers))] for example in examples]
    questions = [example.prompt for example in examples]
    distinct_prompts, distinct_answers = list(dict.fromkeys(questions)), list(dict.fromkeys(targets))
    prompt_ids = dict(zip(distinct_prompts, encode_prompts(tokenizer, distinct_prompts)))
    answer_ids = dict(
        zip(distinct_answers, tokenizer(distinct_answers, add_special_tokens=False)["input_ids"])
    )
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids([END_OF_TURN[family], END_OF_TEXT])
    too_long = [answer for answer, ids in answer_ids.items() if len(ids) + 1 > min(GEN_LENGTHS)]
    if too_long:
        raise ValueError(f"answer {too_long[0]!r} does not fit the shortest generation length")
    max_prompt_len = max(len(ids) for ids in prompt_ids.values())
    max_len = _round16(max_prompt_len + max(GEN_LENGTHS) + SDAR_BLOCK_SIZE)
    sequences = np.full((len(examples), max_len), end_of_text, dtype=np.int64)
    for row, (question, target) in enumerate(zip(questions, targets)):
        tokens = [*prompt_ids[question], *answer_ids[target], end_of_turn]
        sequences[row, : len(tokens)] = tokens
    prompt_lens = torch.tensor([len(prompt_ids[question]) for question in questions], dtype=torch.long)
    return TokenizedRows(torch.from_numpy(sequences), prompt_lens, mask_token_id, max_prompt_len)


def _round16(length: int) -> int:
    return -(-length // 16) * 16  # a multiple of 16 keeps attention kernels on their fast path


def choose_gen_length(rng: random.Random) -> int:
    """A batch's generation length (one per batch: three static shapes, little padding)."""
    return rng.choices(GEN_LENGTHS, weights=GEN_WEIGHTS)[0]


@dataclass
class _Sampled:
    """The rows a batch draws: clean tokens ``x0 [B, L]``, positions ``[B, L]``, prompt lengths ``[B, 1]``."""

    x0: torch.Tensor
    positions: torch.Tensor
    prompt_lens: torch.Tensor


def _sample_rows(rows: TokenizedRows, batch_size: int, generator: torch.Generator, gen_len: int) -> _Sampled:
    """Random rows, cut to the longest prompt plus ``gen_len`` (and a block of slack for SDAR's region
    end), rounded up to a multiple of 16, with their positions and prompt lengths."""
    if gen_len not in GEN_LENGTHS:
        raise ValueError(f"gen_len must be one of {GEN_LENGTHS}, got {gen_len}")
    index = torch.randint(rows.sequences.shape[0], (batch_size,), generator=generator, device=rows.device)
    length = _round16(rows.max_prompt_len + gen_len + SDAR_BLOCK_SIZE)
    positions = torch.arange(length, device=rows.device).expand(batch_size, length)
    return _Sampled(rows.sequences[index, :length], positions, rows.prompt_lens[index].unsqueeze(1))


def _mask_probability(t: torch.Tensor) -> torch.Tensor:
    return (1 - MASK_EPS) * t + MASK_EPS


def llada_batch(rows: TokenizedRows, batch_size: int, generator: torch.Generator, gen_len: int) -> Batch:
    """Masked-diffusion SFT batch: bidirectional over ``prompt + region``, one t per row."""
    sampled = _sample_rows(rows, batch_size, generator, gen_len)
    x0, positions, prompt_lens = sampled.x0, sampled.positions, sampled.prompt_lens
    device, length = x0.device, x0.shape[1]
    valid = positions < prompt_lens + gen_len
    response = (positions >= prompt_lens) & valid
    p_mask = _mask_probability(torch.rand(batch_size, 1, generator=generator, device=device))
    masked = response & (torch.rand(batch_size, length, generator=generator, device=device) < p_mask)
    eye = torch.eye(length, dtype=torch.bool, device=device)
    visible = valid.unsqueeze(1) | eye  # padding keys hidden; a padding query sees itself (no NaN)
    return Batch(
        input_ids=torch.where(masked, rows.mask_token_id, x0),
        positions=positions,
        visible=visible,
        targets=x0,
        masked=masked,
        weights=(1.0 / p_mask).expand(batch_size, length),
        num_response_tokens=response.sum(),
        logits_rows=length,
        valid=valid,
    )


def block_diffusion_visibility(blocks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, 2L, 2L]`` visibility of the two-stream ``[x_t ; x_0]`` layout (see module docstring)."""
    query_blocks, key_blocks = blocks.unsqueeze(-1), blocks.unsqueeze(-2)  # [B, L, 1], [B, 1, L]
    keys = valid.unsqueeze(1)
    noisy_to_noisy = (key_blocks == query_blocks) & keys
    noisy_to_clean = (key_blocks < query_blocks) & keys
    clean_to_clean = (key_blocks <= query_blocks) & keys
    top = torch.cat((noisy_to_noisy, noisy_to_clean), dim=2)
    bottom = torch.cat((torch.zeros_like(clean_to_clean), clean_to_clean), dim=2)
    visible = torch.cat((top, bottom), dim=1)
    eye = torch.eye(visible.shape[-1], dtype=torch.bool, device=visible.device)
    return visible | eye  # padding queries see themselves (no NaN); real queries already do


def sdar_batch(
    rows: TokenizedRows,
    batch_size: int,
    generator: torch.Generator,
    gen_len: int,
    block_size: int = SDAR_BLOCK_SIZE,
) -> Batch:
    """Block-diffusion batch: two streams, absolute blocks, one t per block."""
    sampled = _sample_rows(rows, batch_size, generator, gen_len)
    x0, positions, prompt_lens = sampled.x0, sampled.positions, sampled.prompt_lens
    device, length = x0.device, x0.shape[1]
    region_end = (prompt_lens + gen_len + block_size - 1) // block_size * block_size
    valid = positions < region_end
    response = (positions >= prompt_lens) & valid
    blocks = positions // block_size
    num_blocks = -(-length // block_size)
    t = torch.rand(batch_size, num_blocks, generator=generator, device=device)
    p_mask = torch.gather(_mask_probability(t), 1, blocks)
    masked = response & (torch.rand(batch_size, length, generator=generator, device=device) < p_mask)
    x_t = torch.where(masked, rows.mask_token_id, x0)
    return Batch(
        input_ids=torch.cat((x_t, x0), dim=1),
        positions=torch.cat((positions, positions), dim=1),
        visible=block_diffusion_visibility(blocks, valid),
        targets=x0,
        masked=masked,
        weights=1.0 / p_mask,
        num_response_tokens=response.sum(),
        logits_rows=length,
        valid=valid,
    )


def d2f_batch(
    rows: TokenizedRows,
    batch_size: int,
    generator: torch.Generator,
    gen_len: int,
    block_size: int = D2F_BLOCK_SIZE,
) -> Batch:
    """Optional LLaDA batch in D2F's pipelined layout: the prompt is block 0, the region blocks of
    ``block_size`` follow it; one stream, block-causal (a block sees the prompt, earlier blocks and itself);
    mask ratios increase block by block (sorted t), as earlier blocks are further decoded when ``d2f`` or
    ``multi_bd`` denoise several blocks at once. Trains the attention pattern those strategies use."""
    sampled = _sample_rows(rows, batch_size, generator, gen_len)
    x0, positions, prompt_lens = sampled.x0, sampled.positions, sampled.prompt_lens
    device, length = x0.device, x0.shape[1]
    valid = positions < prompt_lens + gen_len
    response = (positions >= prompt_lens) & valid
    blocks = torch.where(response, (positions - prompt_lens) // block_size + 1, 0)
    blocks = torch.where(valid, blocks, length)  # padding: a block of its own after every real one
    t = torch.rand(batch_size, -(-max(GEN_LENGTHS) // block_size) + 1, generator=generator, device=device)
    p_mask = torch.gather(_mask_probability(t.sort(dim=1).values), 1, blocks.clamp(max=t.shape[1] - 1))
    masked = response & (torch.rand(batch_size, length, generator=generator, device=device) < p_mask)
    eye = torch.eye(length, dtype=torch.bool, device=device)
    visible = ((blocks.unsqueeze(-2) <= blocks.unsqueeze(-1)) & valid.unsqueeze(1)) | eye
    return Batch(
        input_ids=torch.where(masked, rows.mask_token_id, x0),
        positions=positions,
        visible=visible,
        targets=x0,
        masked=masked,
        weights=1.0 / p_mask,
        num_response_tokens=response.sum(),
        logits_rows=length,
        valid=valid,
    )


BATCH_BUILDERS = {"llada": llada_batch, "sdar": sdar_batch, "llada_d2f": d2f_batch}


def diffusion_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over masked positions of ``CE / p_mask``, divided by the batch's response tokens.

    The cross-entropy is taken at every row and zeroed where nothing is masked, instead of selecting the
    masked rows first: a boolean selection has a data-dependent size, which makes the host wait for the
    device every step (on the GPU that sync, not the arithmetic, set the pace of the tiny models)."""
    rows, length = batch.masked.shape
    losses = F.cross_entropy(
        logits[:, :length].reshape(rows * length, -1).float(), batch.targets.reshape(-1), reduction="none"
    ).view(rows, length)
    weights = torch.where(batch.masked, batch.weights, 0.0)
    return (losses * weights).sum() / batch.num_response_tokens.clamp(min=1)


__all__ = [
    "BATCH_BUILDERS",
    "GEN_LENGTHS",
    "Batch",
    "TokenizedRows",
    "block_diffusion_visibility",
    "choose_gen_length",
    "d2f_batch",
    "diffusion_loss",
    "llada_batch",
    "sdar_batch",
    "tokenize_rows",
]
