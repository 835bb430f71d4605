"""Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_7B; NVlabs/Fast-dLLM ``v2/``): block diffusion on Qwen2.5.

The checkpoint ships ``configuration.py`` / ``modeling.py`` as remote code: ``model_type``
"Fast_dLLM_Qwen", architectures ``Fast_dLLM_QwenForCausalLM`` (config class ``Fast_dLLM_QwenConfig``, a
Qwen2 config plus ``bd_size``, the diffusion block size, default 32). The tensors are Qwen2.5's, exactly as
Dream's: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` (q/k/v with bias, o without),
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
``lm_head``; so the modules are Dream's. What differs is the computation around them: at inference the
attention is block-causal (``eval_block_diff_mask``: query block >= key block, blocks of ``bd_size`` counted
from position 0), and the logits are token-shifted (position i is predicted from hidden i-1; the next
block's first token comes from the last hidden of the previous one). The mask token is 151665 (the
``generate`` default; some copies of the config also carry ``mask_token_id``). The family default is
the official decoding loop, strategy ``fast_dllm_v2`` (blocks of ``bd_size`` decoded in sub-blocks of 8,
threshold 0.9, the next block's first token from the store forward; diffulex/strategies/fast_dllm_v2.py).
"""

from __future__ import annotations

from typing import Any

from diffulex.models.dream import DreamModel, _head_dim
from diffulex.models.qwen_lm import qwen_spec
from diffulex.models.registry import ModelSpec, register_model

FAST_DLLM_V2_MASK_TOKEN_ID = 151665
FAST_DLLM_V2_DEFAULT_BLOCK_SIZE = 32  # Fast_dLLM_QwenConfig's bd_size default
_IM_END_ID = 151645  # <|im_end|>: the Qwen2.5-Instruct eos, and ``generate``'s stop token
_ENDOFTEXT_ID = 151643  # <|endoftext|>: pad


@register_model("Fast_dLLM_Qwen", "Fast_dLLM_QwenForCausalLM")
class FastDLLMV2Model(DreamModel):
    """Dream's Qwen2.5 modules and weight contract, with Fast-dLLM v2's block-causal, shifted spec."""

    family = "fast_dllm_v2"

    @classmethod
    def spec_from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Fast-dLLM v2's engine-facing facts from its HF config (Qwen2.5-Instruct's ids where absent)."""
        return qwen_spec(
            cls.family,
            cfg,
            head_dim=_head_dim(cfg),
            vocab_size=int(cfg.get("vocab_size", 151936)),
            mask_token_id=FAST_DLLM_V2_MASK_TOKEN_ID,
            eos_token_id=_IM_END_ID,
            pad_token_id=_ENDOFTEXT_ID,
            shift_logits=True,
            native_attention="block_causal",
            default_strategy="fast_dllm_v2",
            default_block_size=int(cfg.get("bd_size") or FAST_DLLM_V2_DEFAULT_BLOCK_SIZE),
            vanilla_schedule="dream",
        )
