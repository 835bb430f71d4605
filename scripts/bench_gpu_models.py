"""The models and helpers of the H200 benchmark (``bench_gpu.py``): what its cases build and time.

``LLADA_8B`` is the model shape (``bench_parallel_checkpoints.py`` and ``profile_gpu.py`` use it too;
``--cpu-smoke`` shrinks it in place to ``TINY``); ``DEVICE`` is where everything runs (``bench_gpu.main``
sets ``bench_gpu_models.DEVICE`` to ``"cpu"`` for the smoke test). Here: the timing helpers (``sync``,
``median_ms``), the device ceilings, the random-weight LLaDA model and a Diffulex engine over it
(``build_model``, ``make_engine``), and the Hugging Face eager baseline (``bench_e2e_hf``: LLaMA of the
same shape with a bidirectional mask and the LLaDA loop).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from diffulex.config import EngineConfig
from diffulex.engine.engine import Engine
from diffulex.engine.model_runner import ModelRunner
from diffulex.models.llada import LLaDAModelLM

LLADA_8B = {
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
    "d_model": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 32,
    "mlp_hidden_size": 12288,
    "vocab_size": 126464,
    "embedding_size": 126464,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_sequence_length": 4096,
    "include_bias": False,
    "weight_tying": False,
    "mask_token_id": 126336,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
}


DEVICE = "cuda"
REPEATS = 3  # end-to-end runs per engine; the median is reported (HF eager is host-bound and noisy)
TINY = {
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 4,
    "mlp_hidden_size": 128,
    "vocab_size": 130000,
}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def ceilings() -> dict:
    from triton.testing import do_bench

    src = torch.randn(1 << 30, device=DEVICE, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (copy_ms / 1000)
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    gemm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"copy_bandwidth_gbs": bandwidth / 1e9, "gemm_tflops": 2 * n**3 / (gemm_ms / 1000) / 1e12}


def build_model() -> tuple[LLaDAModelLM, int]:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    with torch.device(DEVICE):
        model = LLaDAModelLM(LLADA_8B)
    torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.02)
            else:
                param.fill_(1.0)  # norm weights
    model.eval().requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, weight_bytes


def make_engine(model, folder: Path, **options) -> Engine:
    config = EngineConfig(
        model=str(folder),
        dtype="bfloat16" if DEVICE == "cuda" else "float32",
        device=DEVICE,
        page_size=32,
        enable_prefix_caching=False,
        max_model_len=2048,
        kv_cache_memory_gb=options.pop("kv_gb", 40.0),
        **options,
    )
    runner = ModelRunner(config, model_and_spec=(model, model.spec))
    return Engine(config, runner=runner)


def bench_e2e_hf() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=LLADA_8B["d_model"],
        intermediate_size=LLADA_8B["mlp_hidden_size"],
        num_hidden_layers=LLADA_8B["n_layers"],
        num_attention_heads=LLADA_8B["n_heads"],
        num_key_value_heads=LLADA_8B["n_kv_heads"],
        vocab_size=LLADA_8B["vocab_size"],
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: no fp32 copy of 8B parameters
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(previous)
    prompt_len, gen, block, steps = 128, 256, 32, 64
    mask_id = 126336
    total = prompt_len + gen
    # A 4-D additive mask of zeros: every position sees every position (LLaDA's bidirectional attention).
    bidirectional = torch.zeros(1, 1, total, total, device=DEVICE, dtype=model.dtype)

    @torch.inference_mode()
    def generate() -> int:
        x = torch.full((1, total), mask_id, device=DEVICE, dtype=torch.long)
        x[0, :prompt_len] = torch.arange(1000, 1000 + prompt_len)
        forwards = 0
        per_block = steps // (gen // block)
        for b in range(gen // block):
            lo, hi = prompt_len + b * block, prompt_len + (b + 1) * block
            for _ in range(per_block):
                logits = model(input_ids=x, attention_mask=bidirectional).logits[0]
                forwards += 1
                masked = x[0] == mask_id
                probs = torch.softmax(logits.float(), dim=-1)
                conf, x0 = probs.max(dim=-1)
                conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
                conf[:lo] = -1.0
                conf[hi:] = -1.0
                chosen = torch.topk(conf, block // per_block).indices
                x[0, chosen] = x0[chosen]
        return forwards

    generate()
    runs = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        forwards = generate()
        sync()
        runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)
    forward_ms = median_ms(
        lambda: model(
            input_ids=torch.zeros(1, total, dtype=torch.long, device=DEVICE), attention_mask=bidirectional
        ),
        10,
    )
    forward_ms_32 = median_ms(
        lambda: model(input_ids=torch.zeros(1, 32, dtype=torch.long, device=DEVICE), attention_mask=None), 10
    )
    return {
        "e2e_tps_hf": gen / seconds,
        "e2e_s_hf": seconds,
        "e2e_s_runs_hf": runs,
        "hf_forward_ms_32": forward_ms_32,
        "e2e_forwards_hf": forwards,
        "hf_forward_ms_384": forward_ms,
    }
