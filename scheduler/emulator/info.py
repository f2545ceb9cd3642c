"""What the emulator reports about itself as SGLang does: ``/server_info``, ``/model_info``.

Pure: dicts from the emulator's configuration, spelled as the emulated SGLang version
spells them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from scheduler import __version__
from scheduler.sglang_versions import ATTN_DP_SIZE_SINCE, ROUTED_EXPERTS_SINCE

if TYPE_CHECKING:
    from scheduler.emulator.core import Emulator

#: What SGLang's /server_info and /model_info report as ``disaggregation_mode``.
DISAGGREGATION_MODE = {"mixed": "null", "prefill": "prefill", "decode": "decode"}
#: HF ``model_type`` and ``architectures`` of the model presets (for /model_info).
_HF_NAMES = {
    "deepseek-v3": ("deepseek_v3", ["DeepseekV3ForCausalLM"]),
    "deepseek-v2-lite": ("deepseek_v2", ["DeepseekV2ForCausalLM"]),
    "mixtral-8x7b": ("mixtral", ["MixtralForCausalLM"]),
    "qwen3-235b-a22b": ("qwen3_moe", ["Qwen3MoeForCausalLM"]),
}


def model_info(emulator: Emulator) -> dict[str, Any]:
    """``/model_info``: the fields SGLang 0.5.23's handler returns."""
    model_type, architectures = _HF_NAMES.get(emulator.model.name, (None, None))
    return {
        "model_path": emulator.model.name,
        "served_model_name": emulator.model.name,
        "tokenizer_path": emulator.config.tokenizer_path or emulator.model.name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "load_format": "auto",
        "reasoning_parser": None,
        "tool_call_parser": None,
        "disaggregation_mode": DISAGGREGATION_MODE[emulator.role],
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": model_type,
        "architectures": architectures,
    }


def server_info(emulator: Emulator) -> dict[str, Any]:
    """``/server_info``: the resolved server arguments SGLang reports that the
    middleware reads, as the emulated version spells them, plus an ``emulator`` block."""
    c = emulator.config
    ranks = c.num_ranks
    version = emulator.version
    if version >= ATTN_DP_SIZE_SINCE:
        dp: dict[str, Any] = {"attn_dp_size": ranks, "dp_size": 1}
    else:  # --enable-dp-attention --dp-size N, before --attn-dp-size
        dp = {"dp_size": ranks}
    routed = {"enable_return_routed_experts": True} if version >= ROUTED_EXPERTS_SINCE else {}
    return {
        "model_path": emulator.model.name,
        "served_model_name": emulator.model.name,
        "version": c.sglang_version,
        "tp_size": ranks,
        "ep_size": ranks,
        **dp,
        "enable_dp_attention": ranks > 1,
        "nnodes": c.nodes,
        "ep_num_redundant_experts": emulator.placement.num_slots - emulator.model.num_experts,
        "init_expert_location": emulator.placement_spec,
        "ep_dispatch_algorithm": "static",
        **routed,
        "load_balance_method": c.load_balance,
        "incremental_streaming_output": c.incremental_streaming_output,
        "disaggregation_mode": DISAGGREGATION_MODE[emulator.role],
        "disaggregation_bootstrap_port": emulator.bootstrap_port,
        "emulator": {
            "version": __version__,
            "role": emulator.role,
            "api_key_required": c.api_key is not None,
            "note": "moe-scheduler emulator: no model runs; routed experts are drawn "
            "from real per-class routing profiles, latency comes from the project's cost "
            "model (scheduler.accounting) over the expected traffic",
            "kv_transfer": "none: the prefill's bootstrap server pairs the PD legs "
            "(GET /kv/{room}) in place of mooncake/NIXL",
            "kv_timeout_s": c.kv_timeout_s,
            "gpus_per_node": c.gpus_per_node,
            "capacity_per_rank": c.capacity,
            "seed": c.seed,
            "time_scale": emulator.time_scale,
            "concentration": c.concentration,
            "profile": emulator.profile_source,
            "classes": sorted(emulator.workload.routing),
            "domain_to_class": emulator.workload.domain_to_class,
            "default_class": emulator.workload.default,
            "prompt_index_size": len(emulator.workload.index),
            "model": emulator.model.to_dict(),
            "cost_model": asdict(emulator.cost),  # the GpuSpec becomes a nested object
            "serving_overheads": asdict(emulator.overheads),
        },
    }
