"""SDAR-MoE (JetAstra/SDAR-30B-A3B-Chat): block diffusion on the Qwen3-MoE architecture.

The checkpoints (``model_type`` "sdar_moe", architectures ``SDARMoeForCausalLM``) are SDAR's layout with
the MLP of the sparse layers replaced by routed experts, under Qwen3-MoE's names:
``model.layers.{i}.mlp.gate.weight`` (the router, ``[num_experts, hidden]``) and
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` (``moe_intermediate_size`` wide). A layer is
sparse when ``num_experts > 0``, it is not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``;
the others keep SDAR's dense ``mlp.{gate,up,down}_proj`` (``intermediate_size`` wide). Routing: softmax
over the experts in fp32, top ``num_experts_per_tok``, renormalised when ``norm_topk_prob``
(``diffulex.layers.moe``). ``router_aux_loss_coef``/``output_router_logits`` only matter for training.
Attention, norms, head and the engine-facing facts (block-causal, mask id, block 4) are SDAR's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffulex.layers.moe import SparseMoeBlock
from diffulex.models.registry import register_model
from diffulex.models.sdar import SDARForCausalLM, SDARModel, _check_supported


def is_moe_layer(cfg: dict[str, Any], layer_index: int) -> bool:
    """Whether decoder layer ``layer_index`` has routed experts (Qwen3-MoE's rule)."""
    num_experts = int(cfg.get("num_experts") or 0)
    step = int(cfg.get("decoder_sparse_step") or 1)
    mlp_only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    return num_experts > 0 and layer_index not in mlp_only and (layer_index + 1) % step == 0


class SDARMoeModel(SDARModel):
    """SDAR's embedding, decoder layers and final norm, the MLP routed experts or dense per the config."""

    @staticmethod
    def build_mlp(cfg: dict[str, Any], layer_index: int) -> nn.Module:
        if is_moe_layer(cfg, layer_index):
            return SparseMoeBlock(
                int(cfg["hidden_size"]),
                int(cfg["moe_intermediate_size"]),
                int(cfg["num_experts"]),
                int(cfg["num_experts_per_tok"]),
                bool(cfg.get("norm_topk_prob", True)),
            )
        return SDARModel.build_mlp(cfg, layer_index)


@register_model("sdar_moe", "SDARMoeForCausalLM")
class SDARMoeForCausalLM(SDARForCausalLM):
    """The SDAR-MoE language model: SDAR's spec, logits and loading, over a model with routed experts.

    The official names are kept module for module (experts included), so SDAR's identity name map and
    merged-projection loading apply unchanged.
    """

    family = "sdar_moe"

    def check_config(self, hf_config: dict[str, Any]) -> None:
        _check_supported(hf_config)
        if int(hf_config.get("num_experts") or 0) > 0:
            for field in ("moe_intermediate_size", "num_experts_per_tok"):
                if field not in hf_config:
                    raise ValueError(f"SDAR-MoE config has num_experts but no {field}")

    def build_model(self, hf_config: dict[str, Any]) -> nn.Module:
        return SDARMoeModel(hf_config)
