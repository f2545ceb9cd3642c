"""moe-scheduler: workload-aware expert placement and request scheduling for SGLang MoE clusters."""

__version__ = "0.1.0"
