"""Sanity tests of the reference models and loops themselves (CPU, tiny random checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reference import loops as L
from tests.reference.plain_models import DEFAULT_MASK_TOKEN_ID, PlainModel, block_causal_mask
from tests.reference.tiny_plain_ckpt import EOS_ID, MASK_ID, VOCAB, write_tiny_llada, write_tiny_sdar

PROMPT = [5, 6, 7, 8, 9]  # P = 5: ends mid-block for block sizes 2 and 4


class Recorder:
    """Wraps a PlainModel and records every model call (inputs, positions, past length, logits)."""

    def __init__(self, model: PlainModel):
        self.model = model
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, input_ids, positions, attn_mask, past=None):
        logits, kv = self.model.forward(input_ids, positions, attn_mask, past)
        self.calls.append(
            {
                "ids": torch.as_tensor(input_ids).clone(),
                "positions": torch.as_tensor(positions).clone(),
                "past_len": 0 if past is None else past[0][0].shape[0],
                "logits": logits,
            }
        )
        return logits, kv

    def logits(self, input_ids, attn_mask=None):
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return self.forward(ids, torch.arange(ids.shape[0]), attn_mask)[0]


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return PlainModel(write_tiny_llada(tmp_path_factory.mktemp("llada")))


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    return PlainModel(write_tiny_sdar(tmp_path_factory.mktemp("sdar")))


@pytest.fixture(scope="module", params=["llada", "sdar"])
def model(request, llada, sdar):
    return {"llada": llada, "sdar": sdar}[request.param]


# ----------------------------------------------------------------------------------- models


def test_block_causal_mask():
    m = block_causal_mask(torch.tensor([0, 0, 1, 1, 2]))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_attributes(llada, sdar):
    for m in (llada, sdar):
        assert m.mask_token_id == MASK_ID
        assert m.eos_token_id == EOS_ID
        assert m.vocab_size == VOCAB
        assert m.num_layers == 2
    assert llada.family == "llada" and sdar.family == "sdar"
    assert sdar.head_dim == 16 and sdar.num_kv_heads == 2


def test_default_mask_id_when_config_has_none(tmp_path):
    for family, writer in (("llada", write_tiny_llada), ("sdar", write_tiny_sdar)):
        path = writer(tmp_path / family)
        cfg = json.loads((path / "config.json").read_text())
        del cfg["mask_token_id"]
        (path / "config.json").write_text(json.dumps(cfg))
        assert PlainModel(path).mask_token_id == DEFAULT_MASK_TOKEN_ID[family]


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_sharded_equals_single_file(tmp_path, family):
    writer = write_tiny_llada if family == "llada" else write_tiny_sdar
    one = PlainModel(writer(tmp_path / "one", seed=3))
    sharded_path = writer(tmp_path / "sharded", seed=3, shards=3)
    assert (sharded_path / "model.safetensors.index.json").exists()
    sharded = PlainModel(sharded_path)
    ids = torch.tensor([1, 2, 3, MASK_ID, MASK_ID, 4])
    assert torch.equal(one.logits(ids), sharded.logits(ids))


def test_tied_sdar_loads(tmp_path):
    m = PlainModel(write_tiny_sdar(tmp_path / "tied", tie=True))
    assert m.head is m.embed
    assert m.logits(torch.tensor([1, 2, 3])).shape == (3, VOCAB)


def test_unknown_tensor_names_are_rejected(tmp_path):
    path = write_tiny_llada(tmp_path / "bad")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.transformer.blocks.0.att_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="not understood"):
        PlainModel(path)


def _split_forward(model, ids, mask, cut):
    """forward(ids[:cut]) then forward(ids[cut:], past) with the matching rows of ``mask``."""
    first, kv = model.forward(ids[:cut], torch.arange(cut), mask[:cut, :cut])
    second, kv2 = model.forward(ids[cut:], torch.arange(cut, ids.shape[0]), mask[cut:, :], past=kv)
    return torch.cat([first, second]), kv2


@pytest.mark.parametrize("kind", ["causal", "block_causal"])
def test_kv_cache_forward_equals_full_forward(model, kind):
    ids = torch.tensor([3, 14, 15, 9, 26, 5, MASK_ID, MASK_ID, 35, 8, MASK_ID, 7])
    n = ids.shape[0]
    if kind == "causal":
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
        cuts = [1, 5, 11]
    else:
        mask = block_causal_mask(torch.arange(n) // 4)
        cuts = [4, 8]
    full, full_kv = model.forward(ids, torch.arange(n), mask)
    assert torch.equal(full, model.logits(ids, mask))
    for cut in cuts:
        split, kv = _split_forward(model, ids, mask, cut)
        torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)
        assert len(kv) == model.num_layers
        for (k, v), (fk, fv) in zip(kv, full_kv):
            assert k.shape == (n, model.num_kv_heads, model.head_dim)
            torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)


def test_dual_cache_style_forward_equals_full_forward(model):
    """Recomputing a block against [prefix | suffix] K/V of the same sequence reproduces the full forward."""
    ids = torch.tensor([3, 14, 15, 9, 26, 5, MASK_ID, MASK_ID, 35, 8, MASK_ID, 7])
    n, bs, be = ids.shape[0], 4, 8
    full, kv = model.forward(ids, torch.arange(n), None)
    past = [(torch.cat((k[:bs], k[be:])), torch.cat((v[:bs], v[be:]))) for k, v in kv]
    block, _ = model.forward(ids[bs:be], torch.arange(bs, be), torch.ones(be - bs, n, dtype=torch.bool), past)
    torch.testing.assert_close(block, full[bs:be], atol=1e-5, rtol=1e-5)


def test_bidirectional_attention_sees_the_future(model):
    ids = torch.tensor([3, 14, 15, 9])
    a = model.logits(ids)
    b = model.logits(torch.tensor([3, 14, 15, 10]))
    assert not torch.allclose(a[0], b[0])  # position 0 depends on position 3 without a mask
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    torch.testing.assert_close(
        model.logits(ids, causal)[:3], model.logits(torch.tensor([3, 14, 15, 10]), causal)[:3]
    )


# -------------------------------------------------------------------------------------- helpers


def test_sched_and_topk_tie_rule():
    assert L.sched(10, 4) == [3, 3, 2, 2]
    assert L.sched(3, 5) == [1, 1, 1, 0, 0]
    assert sum(L.sched(37, 6)) == 37
    conf = torch.tensor([0.5, 0.9, 0.5, float("-inf"), 0.9, float("-inf")])
    assert L.topk_positions(conf, 6) == [1, 4, 0, 2, 3, 5]


def _simulate_dream_schedule(n: int, steps: int) -> list[int]:
    out = []
    for i in range(steps):
        k = L.dream_num_transfer(n, i, steps)
        out.append(k)
        n -= k
    return out


def test_dream_schedule_examples():
    # ALGORITHMS.md §3 _sample rule 3
    assert _simulate_dream_schedule(16, 16) == [0] + [1] * 14 + [2]
    assert _simulate_dream_schedule(16, 8) == [1, 2, 2, 2, 2, 2, 2, 3]


def _commits_per_call(rec: Recorder, mask_id: int) -> list[int]:
    """Tokens unmasked between successive full-sequence calls (same window)."""
    masks = [int((c["ids"] == mask_id).sum()) for c in rec.calls]
    return [a - b for a, b in zip(masks, masks[1:])]


# ----------------------------------------------------------------------------------------- LLaDA


@pytest.mark.parametrize("steps,gen,block", [(8, 8, 4), (4, 8, 8), (12, 12, 4), (6, 8, 4)])
def test_llada_forwards_schedule_and_no_mask_left(llada, steps, gen, block):
    rec = Recorder(llada)
    out, nfe = L.llada_generate(rec, PROMPT, steps, gen, block)
    assert nfe == steps == len(rec.calls)
    assert len(out) == gen and MASK_ID not in out
    s = steps // (gen // block)
    expected = []
    for _ in range(gen // block):
        expected += L.sched(block, s)
    # commits of step i are visible in the input of call i+1 (the last step's commits in the output)
    commits = _commits_per_call(rec, MASK_ID) + [int((rec.calls[-1]["ids"] == MASK_ID).sum())]
    assert commits == expected
    # blocks are done left to right: at the start of block b, earlier blocks have no masks
    for b in range(gen // block):
        ids = rec.calls[b * s]["ids"]
        assert MASK_ID not in ids[: len(PROMPT) + b * block].tolist()


def test_llada_cfg_counts_two_calls_per_step(llada):
    out0, nfe0 = L.llada_generate(llada, PROMPT, 8, 8, 4)
    out1, nfe1 = L.llada_generate(llada, PROMPT, 8, 8, 4, cfg_scale=0.0)
    assert (out0, nfe0) == (out1, nfe1)
    rec = Recorder(llada)
    out, nfe = L.llada_generate(rec, PROMPT, 8, 8, 4, cfg_scale=1.5)
    assert nfe == 16 == len(rec.calls) and MASK_ID not in out
    # every second call is the unconditional copy: prompt positions masked
    assert rec.calls[1]["ids"][: len(PROMPT)].tolist() == [MASK_ID] * len(PROMPT)


def test_llada_random_remasking_runs(llada):
    out, nfe = L.llada_generate(
        llada, PROMPT, 8, 8, 4, remasking="random", generator=torch.Generator().manual_seed(0)
    )
    assert nfe == 8 and MASK_ID not in out


# ----------------------------------------------------------------------------------------- Dream


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("shift", [False, True])
def test_dream_forwards_and_schedule(llada, alg, shift):
    rec = Recorder(llada)
    out, nfe = L.dream_generate(rec, PROMPT, 8, 16, alg=alg, shift_logits=shift)
    assert nfe == 8 == len(rec.calls)
    assert len(out) == 16 and MASK_ID not in out
    commits = _commits_per_call(rec, MASK_ID) + [int((rec.calls[-1]["ids"] == MASK_ID).sum())]
    assert commits == [1, 2, 2, 2, 2, 2, 2, 3]


# -------------------------------------------------------------------------------------- Fast-dLLM


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_fast_dllm_threshold_above_one_commits_one_token_per_forward(llada, cache):
    rec = Recorder(llada)
    out, nfe = L.fast_dllm_generate(rec, PROMPT, 12, 12, 4, threshold=1.01, cache=cache)
    assert nfe == 12 == len(rec.calls)
    assert MASK_ID not in out
    if cache == "none":
        assert _commits_per_call(rec, MASK_ID) == [1] * 11


@pytest.mark.parametrize("cache,per_block", [("none", 1), ("prefix", 2), ("dual", 2)])
def test_fast_dllm_threshold_zero_commits_the_block_at_once(llada, cache, per_block):
    # threshold 0: every masked rank is kept; prefix/dual still pay the (empty) loop forward
    out, nfe = L.fast_dllm_generate(llada, PROMPT, 6, 12, 4, threshold=0.0, cache=cache)
    assert nfe == 3 * per_block and MASK_ID not in out


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("steps", [6, 12, 24])
def test_fast_dllm_schedule_nfe(llada, cache, steps):
    out, nfe = L.fast_dllm_generate(llada, PROMPT, steps, 12, 4, cache=cache)
    s = steps // 3
    assert nfe == 3 * min(s, 4) and MASK_ID not in out


def test_fast_dllm_prefix_cache_needs_two_steps(llada):
    with pytest.raises(IndexError):
        L.fast_dllm_generate(llada, PROMPT, 3, 12, 4, cache="prefix")


def test_fast_dllm_single_block_caches(llada):
    """block_length == gen_length: prefix == dual, and their first step equals the no-cache first step."""
    results = {}
    recs = {}
    for cache in ("none", "prefix", "dual"):
        recs[cache] = Recorder(llada)
        results[cache] = L.fast_dllm_generate(recs[cache], PROMPT, 8, 8, 8, cache=cache)
    assert results["prefix"] == results["dual"]
    P = len(PROMPT)
    after_first = recs["none"].calls[1]["ids"][P:]
    assert torch.equal(recs["prefix"].calls[1]["ids"], after_first)  # prefix input = x[block_start:]
    assert torch.equal(recs["dual"].calls[1]["ids"], after_first)
    # first forward identical in all modes
    for cache in ("prefix", "dual"):
        torch.testing.assert_close(recs[cache].calls[0]["logits"], recs["none"].calls[0]["logits"])
    # cached calls: prefix queries start at the block, past = prompt K/V
    assert recs["prefix"].calls[1]["past_len"] == P and recs["prefix"].calls[1]["positions"][0] == P


def test_fast_dllm_prefix_queries_future_blocks(llada):
    rec = Recorder(llada)
    L.fast_dllm_generate(rec, PROMPT, 6, 12, 4, cache="prefix")
    P = len(PROMPT)
    # second call of block 0: x[P:] (12 tokens) over the P-token prefix; dual would send only 4
    assert rec.calls[1]["ids"].shape[0] == 12 and rec.calls[1]["past_len"] == P
    rec = Recorder(llada)
    L.fast_dllm_generate(rec, PROMPT, 6, 12, 4, cache="dual")
    assert rec.calls[1]["ids"].shape[0] == 4 and rec.calls[1]["past_len"] == P + 12 - 4


# ------------------------------------------------------------------------------------------ SDAR


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8]])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sdar_forward_count_static(sdar, prompt, steps):
    B, gen = 4, 8
    out, nfe = L.sdar_generate(sdar, prompt, gen, B, steps, "low_confidence_static")
    P = len(prompt)
    num_blocks = -(-(P + gen) // B)
    prefill = 1 if P // B > 0 else 0
    expected = prefill
    for b in range(P // B, num_blocks):
        masks = min(B, (b + 1) * B - P)
        cum, n_steps = 0, 0
        for k in L.sched(B, steps):  # clipped schedule: finishes once the block's masks are used up
            if cum >= masks:
                break
            cum += k
            n_steps += 1
        expected += n_steps + 1  # + the store forward
    assert nfe == expected
    assert len(out) == gen and MASK_ID not in out


def test_sdar_forward_count_full_prompt_blocks(sdar):
    # P multiple of B: prefill + blocks x (steps + 1)
    out, nfe = L.sdar_generate(sdar, [5, 6, 7, 8, 9, 10, 11, 12], 12, 4, 4, "low_confidence_static")
    assert nfe == 1 + 3 * (4 + 1)


def test_sdar_dynamic_with_unreachable_threshold_equals_static(sdar):
    a = L.sdar_generate(sdar, PROMPT, 12, 4, 4, "low_confidence_static")
    b = L.sdar_generate(sdar, PROMPT, 12, 4, 4, "low_confidence_dynamic", threshold=1.01)
    assert a == b


def test_sdar_dynamic_with_zero_threshold_commits_block_at_once(sdar):
    out, nfe = L.sdar_generate(sdar, PROMPT, 12, 4, 4, "low_confidence_dynamic", threshold=-1.0)
    num_blocks = -(-(len(PROMPT) + 12) // 4)
    assert nfe == 1 + (num_blocks - 1) * 2 and MASK_ID not in out


def test_sdar_sequential_left_to_right(sdar):
    rec = Recorder(sdar)
    L.sdar_generate(rec, [5, 6, 7, 8], 8, 4, 2, "sequential")
    # calls: prefill, block1: 2 denoise + store, block2: 2 denoise + store
    assert len(rec.calls) == 7
    block1 = [c["ids"].tolist() for c in rec.calls[1:4]]
    assert block1[0] == [MASK_ID] * 4
    assert block1[1][:2] != [MASK_ID] * 2 and block1[1][2:] == [MASK_ID] * 2
    assert MASK_ID not in block1[2]
    assert rec.calls[1]["past_len"] == 4 and rec.calls[4]["past_len"] == 8


def test_sdar_clip_to_masks(sdar):
    # P = 5, B = 4, steps 1: block 1 holds 1 prompt token + 3 masks, sched = [4]
    P = len(PROMPT)
    rec = Recorder(sdar)
    L.sdar_generate(rec, PROMPT, 3, 4, 1, "low_confidence_static", clip_to_masks=True)
    # calls: prefill, denoise, store
    assert len(rec.calls) == 3
    assert rec.calls[2]["ids"][0].item() == PROMPT[4]  # prompt token kept
    rec = Recorder(sdar)
    L.sdar_generate(rec, PROMPT, 3, 4, 1, "low_confidence_static", clip_to_masks=False)
    x0 = torch.argmax(rec.calls[1]["logits"], dim=-1)
    # §4.7: topk(4) also picks the -inf prompt position and overwrites it with x0
    assert rec.calls[2]["ids"][0].item() == x0[0].item()
    assert rec.calls[2]["positions"][0].item() == P - 1


def test_sdar_stop_token_ids(sdar):
    out, _ = L.sdar_generate(sdar, [5, 6, 7, 8], 12, 4, 4, "low_confidence_static")
    stop = out[0]
    out2, nfe2 = L.sdar_generate(sdar, [5, 6, 7, 8], 12, 4, 4, "low_confidence_static", stop_token_ids=[stop])
    assert out2[:4] == out[:4] and out2[4:] == [MASK_ID] * 8
    assert nfe2 == 1 + 5


# ------------------------------------------------------------------------------------------- D2F


def test_d2f_one_token_per_forward(llada):
    out, nfe = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 1.0, 1.01, True, EOS_ID)
    assert len(out) == 12 and MASK_ID not in out
    assert nfe == 12


def test_d2f_everything_passes(llada):
    out, nfe = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 0.9, -1.0, False, None)
    assert len(out) == 12 and MASK_ID not in out and nfe == 3


def test_d2f_block_add_threshold_zero_adds_a_block_every_step(llada):
    rec = Recorder(llada)
    L.d2f_generate(rec, PROMPT, 16, 4, 0.0, 0.95, 0.9, False, None)
    lengths = [c["ids"].shape[0] for c in rec.calls]
    P = len(PROMPT)
    assert lengths[:4] == [P + 4, P + 8, P + 12, P + 16]
    assert all(n == P + 16 for n in lengths[4:])


def test_d2f_stop_adding_after_eos(llada):
    out, _ = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 0.9, -1.0, False, None)
    eos = out[0]
    out2, nfe2 = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 0.9, -1.0, True, eos)
    assert out2 == out[:4] and nfe2 == 1


def test_d2f_attention_mask_layout(llada):
    rec = Recorder(llada)
    masks = []
    orig = rec.forward

    def spy(ids, positions, attn_mask, past=None):
        masks.append(attn_mask.clone())
        return orig(ids, positions, attn_mask, past)

    rec.forward = spy
    L.d2f_generate(rec, [1, 2, 3], 8, 4, 0.0, 0.9, 0.9, False, None)
    m = masks[1]  # prompt (3) + 2 blocks of 4
    assert m.shape == (11, 11)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # prompt sees only itself
    assert m[3:7, :7].all() and not m[3:7, 7:].any()  # block 1: prompt + itself
    assert m[7:, :].all()  # block 2: everything before + itself


@pytest.mark.parametrize(
    "add,dec,skip", [(0.1, 0.95, 0.2), (0.5, 0.5, 0.15), (1.0, 1.0, 0.3), (0.0, 0.0, 0.1)]
)
def test_d2f_equals_multi_bd_when_prompt_is_one_block(llada, add, dec, skip):
    prompt = [5, 6, 7, 8]  # P == B: both layouts coincide
    a = L.d2f_generate(llada, prompt, 16, 4, add, dec, skip, True, EOS_ID)
    b = L.multi_bd_generate(llada, prompt, 16, 4, 100, add, dec, skip, EOS_ID, True)
    assert a == b


# ---------------------------------------------------------------------------------------- MultiBD


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8], [5, 6, 7]])
def test_multi_bd_one_token_per_forward(sdar, prompt):
    P, B, max_new = len(prompt), 4, 10
    out, nfe = L.multi_bd_generate(sdar, prompt, max_new, B, 2, 0.0, 1.0, 1.01, None, False)
    end_len = -(-(P + max_new) // B) * B
    assert nfe == end_len - P
    assert len(out) == max_new and MASK_ID not in out


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8], [5, 6, 7]])
@pytest.mark.parametrize("thr", [0.1, 0.2, 1.01])
def test_multi_bd_buffer_one_equals_sdar_dynamic(sdar, prompt, thr):
    B, max_new = 4, 10
    a_out, a_nfe = L.sdar_generate(sdar, prompt, max_new, B, B, "low_confidence_dynamic", threshold=thr)
    b_out, b_nfe = L.multi_bd_generate(sdar, prompt, max_new, B, 1, 0.5, 0.9, thr, None, False)
    assert a_out == b_out
    prefill = 1 if len(prompt) >= B else 0
    # With one buffer slot, MultiBD also spends one store-only forward per finished block, except after
    # the last block (nothing left to add); its prompt is stored by its first forward, not a prefill.
    assert a_nfe == b_nfe + prefill + 1


@pytest.mark.parametrize("buffer_size", [1, 2, 3])
def test_multi_bd_respects_buffer(sdar, buffer_size):
    rec = Recorder(sdar)
    B = 4
    out, nfe = L.multi_bd_generate(rec, PROMPT, 16, B, buffer_size, 0.0, 0.5, 0.15, None, False)
    assert MASK_ID not in out and len(out) == 16
    for call in rec.calls:
        ids = call["ids"].tolist()
        n_blocks = len(ids) // B
        # a store-only forward (every buffered block decoded) has no open block
        first_open = next((b for b in range(n_blocks) if MASK_ID in ids[b * B : (b + 1) * B]), n_blocks)
        assert n_blocks - first_open <= buffer_size
    assert max(c["ids"].shape[0] for c in rec.calls) == -(-(len(PROMPT) + 16) // B) * B


def test_multi_bd_stop_adding_after_eos(sdar):
    out, _ = L.multi_bd_generate(sdar, [5, 6, 7, 8], 12, 4, 3, 0.0, 0.9, -1.0, None, False)
    eos = out[0]
    out2, nfe2 = L.multi_bd_generate(sdar, [5, 6, 7, 8], 12, 4, 3, 0.0, 0.9, -1.0, eos, True)
    assert out2 == out[:4] and nfe2 == 1


# ------------------------------------------------------------------------------------ Fast-dLLM v2
# The loop is model-agnostic (it applies the token shift and passes the masks itself): the tiny SDAR
# model serves. B = 4, S = 2, 8 new tokens asked = 2 blocks.


def _v2_counts(prompt_len: int, gen: int, block: int) -> tuple[int, int, int]:
    """(prefill calls, masks the blocks diffuse, output length) of the official loop without a stop."""
    num_blocks = gen // block
    prefill = 1 if prompt_len >= block else 0
    next_from_prefill = 1 if prefill and prompt_len % block == 0 else 0
    # positions P .. end of the last block; every block but the first starts with a store-forward token
    positions = num_blocks * block - prompt_len % block
    masks = positions - (num_blocks - 1) - next_from_prefill
    return prefill, masks, positions + 1  # + the final store forward's next token


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8], [5, 6, 7]])
def test_fast_dllm_v2_threshold_one_commits_one_token_per_forward(sdar, prompt):
    # Nothing is strictly above 1: each denoise call commits only the most probable mask.
    out, nfe = L.fast_dllm_v2_generate(sdar, prompt, 8, 4, 2, threshold=1.0)
    prefill, masks, length = _v2_counts(len(prompt), 8, 4)
    assert nfe == prefill + masks + 2  # + one store forward per block
    assert len(out) == length and MASK_ID not in out


def test_fast_dllm_v2_negative_threshold_commits_a_sub_block_per_forward(sdar):
    # P = 5: prefill [0, 4); block [4, 8): sub-blocks [4,6) (5 masked) and [6,8); block [8, 12): 8 comes
    # from the store forward, sub-blocks [8,10) and [10,12): one call each, + 2 store forwards.
    out, nfe = L.fast_dllm_v2_generate(sdar, PROMPT, 8, 4, 2, threshold=-1.0)
    assert nfe == 1 + 2 + 1 + 2 + 1 and len(out) == 8 and MASK_ID not in out


def test_fast_dllm_v2_calls_shift_and_next_token(sdar):
    rec = Recorder(sdar)
    out, _ = L.fast_dllm_v2_generate(rec, [5, 6, 7, 8], 8, 4, 2, threshold=1.0)
    prefill, first, *_ = rec.calls
    # P = B: the prompt is prefilled and its last row gives position 4 (the official `P > B` would not)
    assert prefill["ids"].tolist() == [5, 6, 7, 8] and prefill["past_len"] == 0
    assert out[0] == int(torch.argmax(prefill["logits"][-1]))
    # the first denoise call queries the whole block at its absolute positions over the stored prompt
    assert first["ids"].tolist() == [out[0], MASK_ID, MASK_ID, MASK_ID]
    assert first["positions"].tolist() == [4, 5, 6, 7] and first["past_len"] == 4
    # sub-block [4, 6) first: position 5 is read from row 0 (token shift), position 6/7 untouched
    assert out[1] == int(torch.argmax(first["logits"][0]))
    assert rec.calls[2]["ids"].tolist()[2:] == [MASK_ID, MASK_ID]
    # the store forward (block decoded, past = prompt) gives position 8 from its last row
    store = next(c for c in rec.calls if c["past_len"] == 4 and MASK_ID not in c["ids"].tolist())
    assert store["ids"].tolist() == out[:4] and out[4] == int(torch.argmax(store["logits"][-1]))
    assert rec.calls[-1]["past_len"] == 8 and rec.calls[-1]["ids"].tolist() == out[4:8]


def test_fast_dllm_v2_block_cache_queries_the_sub_block_against_the_block(sdar):
    rec = Recorder(sdar)
    out, nfe = L.fast_dllm_v2_generate(rec, PROMPT, 16, 4, 2, threshold=1.0, use_block_cache=True)
    assert MASK_ID not in out and nfe == len(rec.calls)
    sub_calls = [c for c in rec.calls if c["ids"].shape[0] == 2]
    assert sub_calls, "some sub-block calls should use the block cache"
    for call in sub_calls:
        start = int(call["positions"][0])
        block_start = start // 4 * 4
        # keys: the stored blocks + the block outside the sub-block; its first token is decoded
        assert start % 2 == 0 and call["past_len"] == block_start + 4 - 2
        assert int(call["ids"][0]) != MASK_ID
    # every other call is a whole block (prefill, full block calls, store forwards)
    assert all(c["ids"].shape[0] == 4 for c in rec.calls if c["ids"].shape[0] != 2)


def test_fast_dllm_v2_block_cache_of_one_sub_block_is_exact(sdar):
    # S = B: a sub-block call recomputes the whole block over the stored blocks only = the plain call.
    for prompt in (PROMPT, [5, 6, 7]):
        plain = L.fast_dllm_v2_generate(sdar, prompt, 8, 4, 4, threshold=0.2)
        cached = L.fast_dllm_v2_generate(sdar, prompt, 8, 4, 4, threshold=0.2, use_block_cache=True)
        assert cached == plain


def test_fast_dllm_v2_stop_token_ends_like_generate(sdar):
    free, nfe = L.fast_dllm_v2_generate(sdar, PROMPT, 16, 4, 2, threshold=1.0)
    stop = free[3]
    first = free.index(stop)
    out, nfe_stop = L.fast_dllm_v2_generate(sdar, PROMPT, 16, 4, 2, threshold=1.0, stop_token=stop)
    assert out[:first] == free[:first] and out[first] == stop and MASK_ID not in out[:first]
    assert nfe_stop < nfe


def test_fast_dllm_v2_sub_block_must_divide_block(sdar):
    with pytest.raises(ValueError, match="divide"):
        L.fast_dllm_v2_generate(sdar, PROMPT, 8, 4, 3)
